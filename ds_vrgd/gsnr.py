"""GSNR math on lists of tensor pieces: moments -> bounded factor rho, statistics.

This module knows no optimizer and no DeepSpeed. Its inputs are *pieces*:
1-D or N-D tensors that each belong to one *layer* (one parameter tensor W of
the model). A piece is a whole parameter in plain PyTorch, or the slice of a
parameter that lies in this rank's ZeRO partition. A :class:`LayerTable` says
which layer each piece belongs to, how many elements each layer has in total,
and how to sum a small per-layer vector across ranks, so that per-layer
quantities are exact even when a layer is split between ranks.

For one layer with J elements and n gradient samples g^(1..n) (DESIGN.md §2)::

    m_j   = (1/n) sum_i g_j^(i)                 mean
    s_j   = (1/n) sum_i (g_j^(i))^2             second moment
    v_j   = max(s_j - m_j^2, 0)                 variance
    r_j   = m_j^2 / (v_j + eps_gsnr)            GSNR
    q_j   = r_j / mean_k(r_k)                   layer-normalised (1 if mean_k r_k = 0)
    rho_j = clamp(q_j, max(0, 1 - gamma), 1 + gamma)

Inputs are the *sums* G = c * sum_i g^(i) (the gradient as the optimizer sees
it, up to a known scale c: loss scale, 1/world_size, clipping) and
Q = sum_i (g^(i))^2 at the scale of the samples. Then m = G / (c n) and
s = Q / n: any common scaling of the samples cancels in r, as it must.

An element with v = 0 gets r = m^2 / eps_gsnr (finite in fp32 for |m| < ~1e9);
a layer whose sum of r is not finite or is 0 gets q = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ds_vrgd._tensor_lists import ListOps, TensorList

Reduce = Callable[[Tensor], None]
"""In-place SUM of a small fp32 tensor across the ranks that share the layers."""

# Rows of the per-layer sums computed in one pass of :func:`gsnr_ratio`.
SUM_R, SUM_M2, SUM_V = 0, 1, 2


@dataclass
class LayerTable:
    """Which layer each piece belongs to.

    piece_layer: [P] layer index of each piece (indices into the layer lists).
    layer_numel: [L] total element count of each layer (over all ranks).
    layer_ndim:  [L] ndim of each layer's parameter (LARS/LAMB ``exclude_1d``).
    layer_names: [L] names used in statistics.
    reduce:      sums a [K, L] tensor across ranks in place; None for one process.
    """

    piece_layer: list[int]
    layer_numel: list[int]
    layer_ndim: list[int]
    layer_names: list[str]
    reduce: Optional[Reduce] = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_numel)

    def layer_sums(self, per_piece: Tensor) -> Tensor:
        """[K, P] per-piece partial sums -> [K, L] per-layer sums over all ranks (fp32)."""
        per_piece = per_piece.float()
        sums = torch.zeros(per_piece.shape[0], self.num_layers, device=per_piece.device)
        index = torch.tensor(self.piece_layer, dtype=torch.long, device=per_piece.device)
        sums.index_add_(1, index, per_piece)
        if self.reduce is not None:
            self.reduce(sums)
        return sums

    def per_piece(self, layer_values: Sequence[float]) -> list[float]:
        """[L] values -> [P] values, each piece taking its layer's value."""
        return [layer_values[layer] for layer in self.piece_layer]

    def subset(self, pieces: Sequence[int]) -> "LayerTable":
        """The table of the pieces at the given indices (same layers, same reduce)."""
        return LayerTable(
            [self.piece_layer[i] for i in pieces],
            self.layer_numel,
            self.layer_ndim,
            self.layer_names,
            self.reduce,
        )


def factor_bounds(gamma: float) -> tuple[float, float]:
    """The clamp interval [max(0, 1 - gamma), 1 + gamma] of rho."""
    return max(0.0, 1.0 - gamma), 1.0 + gamma


def gsnr_ratio(
    grads: TensorList,
    sq_sums: TensorList,
    grad_sq_norms: Tensor,
    mean_scales: Sequence[float],
    n: int,
    eps_gsnr: float,
    ops: ListOps,
) -> tuple[TensorList, Tensor]:
    """Per-element GSNR r of each piece and its per-piece partial sums.

    grads[p]:         G, any float dtype, = c_p * sum of samples.
    sq_sums[p]:       Q (fp32, same shape) = sum of squared samples. Overwritten
                      (it is scratch after this call).
    grad_sq_norms[p]: ||G_p||^2 (the caller has it from its finiteness check).
    mean_scales[p]:   a_p = 1 / (c_p * n), so that m = a_p * G.
    Returns (r, partial) with r a new fp32 list and partial a [3, P] tensor of
    sum_j r_j, sum_j m_j^2 and sum_j v_j per piece (rows SUM_R, SUM_M2, SUM_V).

    Computed in units of G to save passes: with u = G^2 and w = Q / (n a^2),
    v = a^2 max(w - u, 0) and r = u / (max(w - u, 0) + eps / a^2). Seven
    element-wise passes (square, scale, subtract, clamp, add, divide) and two
    sums (of v and of r).
    """
    inv_a2 = [1.0 / (a * a) if a > 0.0 else 1.0 for a in mean_scales]
    a2 = torch.tensor([1.0 / k for k in inv_a2], dtype=torch.float32, device=grad_sq_norms.device)
    u = ops.square_fp32(grads)
    ops.mul_(sq_sums, [k / n for k in inv_a2])  # w = s / a^2
    ops.sub_(sq_sums, u)
    ops.clamp_min_(sq_sums, 0.0)  # v / a^2
    sum_v = ops.norms(sq_sums, 1).to(a2.device) * a2
    ops.add_scalar_(sq_sums, [eps_gsnr * k for k in inv_a2])
    ops.div_tensors_(u, sq_sums)  # r = m^2 / (v + eps)
    sum_r = ops.norms(u, 1).to(a2.device)
    return u, torch.stack([sum_r, grad_sq_norms.float() * a2, sum_v])


def layer_normalisers(sum_r: Sequence[float], layer_numel: Sequence[int]) -> list[Optional[float]]:
    """1 / mean_k(r_k) per layer, or None where the mean is 0 or not finite (then q = 1)."""
    out: list[Optional[float]] = []
    for total, numel in zip(sum_r, layer_numel):
        mean = total / numel if numel else 0.0
        out.append(1.0 / mean if mean > 0.0 and math.isfinite(mean) and math.isfinite(1.0 / mean) else None)
    return out


def normalise_(r: TensorList, piece_normalisers: Sequence[Optional[float]], ops: ListOps) -> None:
    """In place r -> q = r / mean_k(r_k); pieces of a layer without a usable mean get q = 1."""
    scaled = [i for i, inv in enumerate(piece_normalisers) if inv is not None]
    ops.mul_([r[i] for i in scaled], [piece_normalisers[i] for i in scaled])
    for i, inv in enumerate(piece_normalisers):
        if inv is None:
            r[i].fill_(1.0)


def ema_(q: TensorList, ema: TensorList, beta: float, ema_steps: int, ops: ListOps) -> None:
    """EMA of q across steps: ema <- beta*ema + (1-beta)*q; q <- ema / (1 - beta^t) (bias-corrected)."""
    ops.lerp_(ema, q, 1.0 - beta)
    for q_piece, ema_piece in zip(q, ema):
        q_piece.copy_(ema_piece)
    ops.mul_(q, 1.0 / (1.0 - beta**ema_steps))


def bound_counts(rho: TensorList, low: float, high: float) -> Tensor:
    """[2, P] counts of elements of each piece at the lower and at the upper bound."""
    if not rho:
        return torch.zeros(2, 0)
    at_low = torch.stack([(x <= low).sum() for x in rho])
    at_high = torch.stack([(x >= high).sum() for x in rho])
    return torch.stack([at_low, at_high]).float()


def rho_from_moments(mean: Tensor, second_moment: Tensor, gamma: float, eps_gsnr: float = 1e-20) -> Tensor:
    """rho for one layer from its mean m and second moment s (same shape), in fp32.

    Reference entry point for the math above (one piece, one layer, no ranks).
    """
    ops = ListOps(foreach=False)
    sq = [second_moment.float().clone()]
    mean_norm = torch.linalg.vector_norm(mean.float()).reshape(1)
    r, partial = gsnr_ratio([mean], sq, mean_norm**2, [1.0], 1, eps_gsnr, ops)
    normalise_(r, layer_normalisers([partial[SUM_R, 0].item()], [mean.numel()]), ops)
    ops.clamp_(r, *factor_bounds(gamma))
    return r[0]


@dataclass
class GsnrStats:
    """Statistics of the last VR step, summed over all ranks.

    Per layer [L]: sum of r, m^2, v and counts at the bounds; numel; n samples.
    """

    step: int
    n: int
    layer_names: list[str]
    layer_numel: list[int]
    sum_r: list[float]
    sum_m2: list[float]
    sum_v: list[float]
    at_low: list[float]
    at_high: list[float]
    skipped_steps: int = 0

    def merged(self, other: "GsnrStats") -> "GsnrStats":
        """These statistics and another param group's of the same step (DeepSpeed steps groups one by one)."""
        return GsnrStats(
            step=self.step,
            n=self.n,
            layer_names=self.layer_names + other.layer_names,
            layer_numel=self.layer_numel + other.layer_numel,
            sum_r=self.sum_r + other.sum_r,
            sum_m2=self.sum_m2 + other.sum_m2,
            sum_v=self.sum_v + other.sum_v,
            at_low=self.at_low + other.at_low,
            at_high=self.at_high + other.at_high,
        )

    def as_dict(self, micro_batch_size: Optional[int] = None) -> dict:
        """Plain dict: per-layer mean GSNR and bound fractions, noise ratio, B_simple.

        noise_ratio = sum_j v_j / sum_j m_j^2 over all elements; B_simple =
        micro_batch_size * noise_ratio (McCandlish et al. 2018), where
        micro_batch_size is the number of examples behind one gradient sample.
        """
        total_m2, total_v = sum(self.sum_m2), sum(self.sum_v)
        noise_ratio = total_v / total_m2 if total_m2 > 0 else math.inf
        total = sum(self.layer_numel)
        layers = {
            name: {
                "gsnr_mean": r / numel,
                "frac_low": low / numel,
                "frac_high": high / numel,
            }
            for name, numel, r, low, high in zip(
                self.layer_names, self.layer_numel, self.sum_r, self.at_low, self.at_high
            )
            if numel
        }
        return {
            "step": self.step,
            "n": self.n,
            "gsnr_mean": sum(v["gsnr_mean"] for v in layers.values()) / max(len(layers), 1),
            "frac_low": sum(self.at_low) / total if total else 0.0,
            "frac_high": sum(self.at_high) / total if total else 0.0,
            "noise_ratio": noise_ratio,
            "b_simple": None if micro_batch_size is None else micro_batch_size * noise_ratio,
            "skipped_steps": self.skipped_steps,
            "layers": layers,
        }
