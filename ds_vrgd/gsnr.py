"""GSNR math on lists of tensor pieces: moments -> bounded factor rho, statistics.

It knows no optimizer and no DeepSpeed. A *piece* is a tensor inside one *layer* (a parameter W): a
whole parameter, a tile, or a ZeRO partition's slice; a :class:`LayerTable` maps pieces to layers and
sums per-layer vectors across ranks, so per-layer quantities stay exact. Phase 1 :func:`gsnr_ratio`,
then per-layer sums, then phase 2 :func:`bound_factor_`. The math: docs/design.md §2; the estimator's
numerics (the sums G and Q, the cap ``gsnr_max``, z = n a^2): docs/design.md §3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ds_vrgd._tensor_lists import ListOps, TensorList

GSNR_MAX = 1e3
"""Default cap on the per-element GSNR r (docs/design.md §3: what fp32 sums resolve, with margin)."""

Reduce = Callable[[Tensor], None]
"""In-place SUM of a small fp32 tensor across the ranks that share the layers."""

PARTIAL_ROWS = ("sum_r", "sum_m2", "sum_v", "grad_sq", "at_cap")
"""Row names of :attr:`GsnrRatio.partial`: per-piece sums of r, m^2, v, G^2 and of the elements at the cap."""


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

    def per_piece(self, layer_values: Sequence, pieces: slice = slice(None)) -> list:
        """[L] values -> one value per piece (of all pieces, or of a slice of them)."""
        return [layer_values[layer] for layer in self.piece_layer[pieces]]


def factor_bounds(gamma: float) -> tuple[float, float]:
    """The clamp interval [max(0, 1 - gamma), 1 + gamma] of rho."""
    return max(0.0, 1.0 - gamma), 1.0 + gamma


@dataclass
class GsnrRatio:
    """Phase-1 result for a list of pieces.

    ratio:   [P] fp32 tensors r / z (the Q buffers, overwritten; :func:`bound_factor_` turns them into rho).
    scale:   [P] z = n a^2 of each piece, so that r = z * ratio.
    partial: [5, P] per-piece sums, rows :data:`PARTIAL_ROWS`: r, m^2, v, G^2 and the count of
             elements at the cap.
    """

    ratio: TensorList
    scale: list[float]
    partial: Tensor


def gsnr_ratio(
    sums: TensorList,
    sq_sums: TensorList,
    mean_scales: Sequence[float],
    n: int,
    eps_gsnr: float,
    gsnr_max: Optional[float],
    ops: ListOps,
) -> GsnrRatio:
    """Phase 1: per-element r / z of each piece and the per-piece partial sums (docs/design.md §3).

    sums[p]:        G, any float dtype, = c_p * sum of samples (the gradient, or the
                    fp32 sum of the samples that the capture keeps for low-precision gradients).
    sq_sums[p]:     Q (fp32, same shape) = sum of squared samples. Overwritten
                    by the ratio (Q is not needed after this call).
    mean_scales[p]: a_p = 1 / (c_p * n), so that m = a_p * G.
    gsnr_max:       cap on r (None: no cap).

    With z = n a^2: v = max(Q - z G^2, 0) / n and r = z G^2 / (n v + n eps), so
    ``ratio = min(G^2 / (max(Q - z G^2, 0) + n eps), gsnr_max / z)``.
    """
    z = [n * a * a for a in mean_scales]
    u = ops.square_fp32(sums)
    grad_sq = ops.sums(u)
    ops.add_scaled_(sq_sums, u, [-k for k in z])  # Q - z G^2 = n v (before clamping)
    ops.clamp_min_(sq_sums, 0.0)
    sum_nv = ops.sums(sq_sums)
    ops.add_scalar_(sq_sums, n * eps_gsnr)
    ops.div_into_(u, sq_sums)  # the ratio replaces Q
    device = grad_sq.device
    at_cap = torch.zeros(len(z), device=device)
    if gsnr_max is not None:
        caps = [gsnr_max / k if k > 0.0 else math.inf for k in z]
        ops.clamp_max_(sq_sums, caps)
        at_cap = sampled_counts(sq_sums, caps, ops.count_ge)
    sum_ratio = ops.sums(sq_sums)
    z_t = torch.tensor(z, dtype=torch.float32, device=device)
    a2 = torch.tensor([a * a for a in mean_scales], dtype=torch.float32, device=device)
    partial = torch.stack([sum_ratio * z_t, grad_sq * a2, sum_nv / n, grad_sq, at_cap])
    return GsnrRatio(sq_sums, z, partial)


def layer_normalisers(sum_r: Sequence[float], layer_numel: Sequence[int]) -> list[Optional[float]]:
    """1 / mean_k(r_k) per layer, or None where the mean is 0 or not finite (then q = 1)."""
    out: list[Optional[float]] = []
    for total, numel in zip(sum_r, layer_numel):
        mean = total / numel if numel else 0.0
        out.append(1.0 / mean if mean > 0.0 and math.isfinite(mean) and math.isfinite(1.0 / mean) else None)
    return out


def bound_factor_(
    ratio: TensorList,
    scales: Sequence[Optional[float]],
    gamma: float,
    ops: ListOps,
    ema: Optional[tuple[TensorList, float, Sequence[int]]] = None,
) -> Tensor:
    """Phase 2, in place: ratio -> rho; returns [2, P] counts of elements at the lower/upper bound.

    scales[p] = z_p / mean_k(r_k) of the piece's layer (q = ratio * scale), or
    None for a layer without a usable mean (q = 1). ``ema = (buffers, beta, t)``
    (t: the EMA step count of each piece) replaces q by its bias-corrected EMA
    across steps: buffers <- beta*buffers + (1-beta)*q; q <- buffers / (1 - beta^t).
    """
    scaled = [i for i, s in enumerate(scales) if s is not None]
    ops.mul_([ratio[i] for i in scaled], [scales[i] for i in scaled])
    for i, scale in enumerate(scales):
        if scale is None:
            ratio[i].fill_(1.0)
    if ema is not None:
        buffers, beta, t = ema
        ops.lerp_(buffers, ratio, 1.0 - beta)
        ops.copy_(ratio, buffers)
        ops.div_scalar_(ratio, [1.0 - beta**steps for steps in t])
    low, high = factor_bounds(gamma)
    ops.clamp_(ratio, low, high)
    return bound_counts(ratio, low, high, ops)


COUNT_SAMPLE = 1 << 16
"""Pieces larger than this have their counts estimated from a strided sample of about this size."""


def sampled_counts(xs: TensorList, bounds, count: Callable) -> Tensor:
    """[P] ``count(pieces, bounds)`` (elements at a bound), estimated for large pieces.

    Exact for pieces of at most :data:`COUNT_SAMPLE` elements; a larger piece
    counts every k-th element (k odd, so a power-of-two row length cannot alias
    with it) and scales up: a fraction's standard error is below 0.002. The
    counts are statistics only; sampling keeps them a small part of the step.
    """
    samples, weights = [], []
    for x in xs:
        flat = x.reshape(-1)
        stride = max(1, flat.numel() // COUNT_SAMPLE) | 1
        samples.append(flat[::stride] if stride > 1 else flat)
        weights.append(flat.numel() / samples[-1].numel())
    weight = torch.tensor(weights, device=xs[0].device if xs else None)
    return count(samples, bounds) * weight


def bound_counts(rho: TensorList, low: float, high: float, ops: ListOps) -> Tensor:
    """[2, P] numbers of elements of each piece at the lower / upper bound of rho (see :func:`sampled_counts`)."""
    return torch.stack([sampled_counts(rho, low, ops.count_le), sampled_counts(rho, high, ops.count_ge)])


def rho_from_moments(
    mean: Tensor, second_moment: Tensor, gamma: float, eps_gsnr: float = 1e-20, gsnr_max: Optional[float] = GSNR_MAX
) -> Tensor:
    """rho for one layer from its mean m and second moment s (same shape), in fp32.

    Reference entry point for the math above (one piece, one layer, one sample
    of scale 1, so z = 1, G = m and Q = s).
    """
    ops = ListOps(foreach=False)
    phase1 = gsnr_ratio([mean.float()], [second_moment.float().clone()], [1.0], 1, eps_gsnr, gsnr_max, ops)
    normaliser = layer_normalisers([phase1.partial[PARTIAL_ROWS.index("sum_r"), 0].item()], [mean.numel()])[0]
    scale = None if normaliser is None else phase1.scale[0] * normaliser
    bound_factor_(phase1.ratio, [scale], gamma, ops)
    return phase1.ratio[0]


LOG_FIELDS = {
    "gsnr_n": "n",
    "gsnr_mean": "gsnr_mean",
    "gsnr_frac_low": "frac_low",
    "gsnr_frac_high": "frac_high",
    "gsnr_frac_capped": "frac_capped",
    "noise_ratio": "noise_ratio",
    "b_simple": "b_simple",
}
"""Log name (Trainer logs, log.jsonl, DeepSpeed monitor) -> key of :meth:`GsnrStats.as_dict`."""


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
    at_cap: list[float]
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
            at_cap=self.at_cap + other.at_cap,
        )

    def as_dict(self, micro_batch_size: Optional[int] = None) -> dict:
        """Plain dict: per-layer mean GSNR, bound and cap fractions, noise ratio, B_simple.

        ``frac_capped``: the fraction of elements whose r reached ``gsnr_max``
        (their samples agree beyond what the estimator resolves).
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
                "frac_capped": cap / numel,
            }
            for name, numel, r, low, high, cap in zip(
                self.layer_names, self.layer_numel, self.sum_r, self.at_low, self.at_high, self.at_cap
            )
            if numel
        }
        return {
            "step": self.step,
            "n": self.n,
            "gsnr_mean": sum(v["gsnr_mean"] for v in layers.values()) / max(len(layers), 1),
            "frac_low": sum(self.at_low) / total if total else 0.0,
            "frac_high": sum(self.at_high) / total if total else 0.0,
            "frac_capped": sum(self.at_cap) / total if total else 0.0,
            "noise_ratio": noise_ratio,
            "b_simple": None if micro_batch_size is None else micro_batch_size * noise_ratio,
            "skipped_steps": self.skipped_steps,
            "layers": layers,
        }
