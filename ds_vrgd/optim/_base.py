"""The shared VR optimizer: GSNR factor in front of a base update rule.

:class:`VROptimizer` does everything that is common to VR-SGD, VR-Adam(W),
VR-LARS and VR-LAMB: validation, sample capture, the GSNR factor rho
(:mod:`ds_vrgd.gsnr`), warmup/EMA of the factor, the non-finite guard,
statistics and state. A subclass only implements :meth:`_update`, the base
rule, given the pieces of one param group and rho (None means rho = 1).

Pieces: the optimizer updates *pieces*, each a view of one tensor it owns
(``group["params"]``) that lies inside one model layer. In plain PyTorch each
parameter is one piece and one layer (:class:`WholeParamLayout`). The
DeepSpeed adapter installs a layout whose owned tensors are flat ZeRO
partitions cut into pieces at layer boundaries, with a cross-rank reduce, so
per-layer sums (GSNR layer mean, LARS/LAMB norms) stay exact.

One step, all groups together::

    G_p = grad piece, Q_p = squared-sample sum piece, c_p = grad scale
    r, partial sums [3, P]        -- gsnr_ratio, element-wise (~9 passes)
    per-layer sums [3, L]         -- one index_add + one small all-reduce
    q = r / mean_k r_k; EMA; rho = clamp(q, 1-gamma, 1+gamma)
    base rule with rho            -- subclass

Non-finite gradients: if any gradient piece of the step has an inf/NaN
element, the whole step is skipped (parameters, moments and step counts
unchanged), a RuntimeWarning is issued and ``skipped_steps`` is incremented.
This costs one norm pass over the gradients and one host sync per step.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ds_vrgd import gsnr
from ds_vrgd._tensor_lists import ListOps, TensorList
from ds_vrgd.capture import BackwardHookMoments, MomentSource

VR_DEFAULTS = dict(gamma=0.1, eps_gsnr=1e-20, gsnr_warmup_steps=0, gsnr_ema=0.0, vr=True)


@dataclass(frozen=True)
class Piece:
    """Elements [offset, offset + numel) of the flattened owned tensor ``owner``, in ``layer``."""

    owner: Tensor
    offset: int
    numel: int
    layer: int

    def of(self, tensor: Tensor) -> Tensor:
        """The piece's view of a tensor shaped like the owner (the owner itself, its grad, state)."""
        if self.offset == 0 and self.numel == tensor.numel():
            return tensor
        return tensor.view(-1).narrow(0, self.offset, self.numel)


class WholeParamLayout:
    """Each parameter is one layer and one piece; no cross-rank reduce."""

    def __init__(self, optimizer: "VROptimizer"):
        self._optimizer = optimizer

    def _params(self) -> list[tuple[str, Tensor]]:
        named = []
        for group in self._optimizer.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            named.extend(zip(names, group["params"]))
        return [(name or f"param_{i}", p) for i, (name, p) in enumerate(named)]

    def pieces(self, params: list[Tensor]) -> list[Piece]:
        index = {id(p): i for i, (_, p) in enumerate(self._params())}
        return [Piece(p, 0, p.numel(), index[id(p)]) for p in params]

    def table(self, pieces: list[Piece]) -> gsnr.LayerTable:
        named = self._params()
        return gsnr.LayerTable(
            piece_layer=[piece.layer for piece in pieces],
            layer_numel=[p.numel() for _, p in named],
            layer_ndim=[p.ndim for _, p in named],
            layer_names=[name for name, _ in named],
        )


class GroupPieces:
    """The pieces of one param group with gradients, and views of their state."""

    def __init__(self, optimizer: "VROptimizer", group: dict, pieces: list[Piece], table: gsnr.LayerTable):
        self.group = group
        self.pieces = pieces
        self.table = table
        self.params: TensorList = [piece.of(piece.owner) for piece in pieces]
        self.grads: TensorList = [piece.of(piece.owner.grad) for piece in pieces]
        self._state = optimizer.state

    def __len__(self) -> int:
        return len(self.pieces)

    def state(self, key: str, dtype: Optional[torch.dtype] = None) -> TensorList:
        """Views of the per-element state ``key`` (created as zeros like the owner)."""
        views = []
        for piece in self.pieces:
            owner_state = self._state[piece.owner]
            if key not in owner_state:
                owner_state[key] = torch.zeros_like(piece.owner, dtype=dtype, memory_format=torch.preserve_format)
            views.append(piece.of(owner_state[key]))
        return views

    def step(self) -> int:
        """The step number t (from 1) of this group's current update."""
        return int(self._state[self.pieces[0].owner]["step"].item())

    def is_matrix(self) -> list[bool]:
        """Per piece: does its layer have ndim > 1 (LARS/LAMB ``exclude_1d``)."""
        return [self.table.layer_ndim[layer] > 1 for layer in self.table.piece_layer]

    def layer_norms(self, tensor_lists: list[TensorList], ops: ListOps) -> list[list[float]]:
        """Per list, per piece: the L2 norm of the piece's whole layer (summed over pieces and ranks)."""
        partial = torch.stack([ops.norms(tensors) ** 2 for tensors in tensor_lists])
        layer = self.table.layer_sums(partial).sqrt().tolist()
        return [self.table.per_piece(values) for values in layer]


def _check_range(name: str, value: Any, low: float, high: float = math.inf, *, low_open=False, high_open=True) -> None:
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not isinstance(value, (int, float)) or isinstance(value, bool) or below or above or math.isnan(value):
        interval = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
        raise ValueError(f"Invalid {name}: {value!r}; expected a number in {interval}")


def validate_vr_options(options: dict) -> None:
    """Check the options every VR optimizer shares (raise ValueError naming the bad one)."""
    _check_range("lr", options["lr"], 0.0)
    _check_range("weight_decay", options["weight_decay"], 0.0)
    _check_range("gamma", options["gamma"], 0.0)
    _check_range("eps_gsnr", options["eps_gsnr"], 0.0)
    _check_range("gsnr_ema", options["gsnr_ema"], 0.0, 1.0)
    warmup = options["gsnr_warmup_steps"]
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"Invalid gsnr_warmup_steps: {warmup!r}; expected an integer >= 0")
    if not isinstance(options["vr"], bool):
        raise ValueError(f"Invalid vr: {options['vr']!r}; expected True or False")


def validate_betas(betas: Any) -> None:
    """betas must be two numbers in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2) in [0, 1)")
    for i, beta in enumerate(betas):
        _check_range(f"betas[{i}]", beta, 0.0, 1.0)


def validate_eps(eps: Any) -> None:
    """eps must be > 0."""
    _check_range("eps", eps, 0.0, low_open=True)


def reject_unknown(cls: type, unknown: dict) -> None:
    """ValueError for keyword arguments the optimizer does not take, listing the valid ones."""
    if unknown:
        valid = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params", "unknown")]
        raise ValueError(
            f"{cls.__name__} got unknown option(s) {sorted(unknown)}; valid options are: {', '.join(valid)}"
        )


class VROptimizer(Optimizer):
    """Base class of the VR optimizers (see module docstring)."""

    def __init__(self, params: Iterable, defaults: dict, foreach: Optional[bool] = None):
        validate_vr_options(defaults)
        defaults = dict(defaults, foreach=foreach)
        self._moments: MomentSource = BackwardHookMoments()
        super().__init__(params, defaults)
        self._layout = WholeParamLayout(self)
        self.skipped_steps = 0
        self.micro_batch_size: Optional[int] = None
        self._stats: Optional[gsnr.GsnrStats] = None
        self._warned_few_samples = False

    # ----------------------------------------------------------------- setup
    def add_param_group(self, param_group: dict) -> None:
        for key in ("lr", "weight_decay", "gamma", "eps_gsnr", "gsnr_ema", "gsnr_warmup_steps", "vr"):
            if key in param_group:
                validate_vr_options({**self.defaults, **param_group})
                break
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for param in group["params"]:
            if param.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse parameters")
        if group["vr"] and isinstance(self._moments, BackwardHookMoments):
            self._moments.watch(group["params"])

    def use_moments(self, source: MomentSource, layout: Any = None) -> None:
        """Replace the sample source (and the piece layout); the DeepSpeed/DDP adapters call this."""
        self._moments.close()
        self._moments = source
        if layout is not None:
            self._layout = layout

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._moments.reset()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, keeping fp32 state (the GSNR EMA) in fp32 for low-precision parameters."""
        fp32 = {
            index: value["gsnr_q_ema"].float().clone()
            for index, value in state_dict["state"].items()
            if "gsnr_q_ema" in value
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        order = [i for group in state_dict["param_groups"] for i in group["params"]]
        for index, value in fp32.items():
            param = params[order.index(index)]
            self.state[param]["gsnr_q_ema"] = value.to(param.device)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in VR_DEFAULTS.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param group; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups, table = self._collect_pieces()
        if groups:
            rhos = self._gsnr_factors(groups, table)
            if rhos is not None:
                for pieces, rho in zip(groups, rhos):
                    self._advance_step(pieces)
                    self._update(pieces.group, pieces, rho, ListOps(self._use_foreach(pieces.group)))
        self._moments.step_done()
        return loss

    def _update(self, group: dict, pieces: GroupPieces, rho: Optional[TensorList], ops: ListOps) -> None:
        """The base rule: update ``pieces.params`` in place with the element-wise factor rho."""
        raise NotImplementedError

    def _use_foreach(self, group: dict) -> bool:
        return True if group["foreach"] is None else bool(group["foreach"])

    def _collect_pieces(self) -> tuple[list[GroupPieces], Optional[gsnr.LayerTable]]:
        per_group = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                if param.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            per_group.append((group, self._layout.pieces(params)))
        all_pieces = [piece for _, pieces in per_group for piece in pieces]
        if not all_pieces:
            return [], None
        table = self._layout.table(all_pieces)
        out, start = [], 0
        for group, pieces in per_group:
            if pieces:
                indices = range(start, start + len(pieces))
                out.append(GroupPieces(self, group, pieces, table.subset(indices)))
            start += len(pieces)
        return out, table

    def _advance_step(self, pieces: GroupPieces) -> None:
        for owner in {id(p.owner): p.owner for p in pieces.pieces}.values():
            state = self.state[owner]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
            state["step"] += 1

    def _gsnr_active(self, pieces: GroupPieces, n: int) -> bool:
        group = pieces.group
        if not group["vr"] or group["gamma"] == 0.0 or n < 2:
            return False
        state = self.state[pieces.pieces[0].owner]
        done = int(state["step"].item()) if "step" in state else 0
        return done >= group["gsnr_warmup_steps"]

    def _warn_few_samples(self, n: int) -> None:
        if self._warned_few_samples:
            return
        self._warned_few_samples = True
        warnings.warn(
            f"{type(self).__name__}: {n} gradient sample(s) in this step; GSNR needs at least 2 "
            "(several backward() calls per step, data-parallel ranks or gradient accumulation), "
            "so this step uses rho = 1 (the base optimizer). Warned once.",
            UserWarning,
            stacklevel=4,
        )

    def _gsnr_factors(self, groups: list[GroupPieces], table: gsnr.LayerTable) -> Optional[list[Optional[TensorList]]]:
        """rho per group (None = 1), or None when the step must be skipped for non-finite gradients.

        One reduction of [5, L] per-layer sums: sum r, sum m^2, sum v (GSNR groups), ||G||^2
        (all groups: the non-finite guard) and the element count of GSNR layers.
        """
        n = self._moments.num_samples()
        if n < 2 and any(g.group["vr"] for g in groups):
            self._warn_few_samples(n)
        active = [self._gsnr_active(g, n) for g in groups]
        ratios, partials = [], []
        for pieces, on in zip(groups, active):
            grad_norms = ListOps(True).norms(pieces.grads)
            if on:
                ratio, partial = self._group_ratio(pieces, n, grad_norms)
            else:
                ratio, partial = None, torch.zeros(3, len(pieces), device=grad_norms.device)
            numel = torch.tensor([float(p.numel) if on else 0.0 for p in pieces.pieces], device=grad_norms.device)
            ratios.append(ratio)
            partials.append(torch.cat([partial, (grad_norms**2).unsqueeze(0), numel.unsqueeze(0)]))
        sums = table.layer_sums(torch.cat(partials, dim=1)).tolist()
        if not all(math.isfinite(x) for x in sums[3]):
            self._skip()
            return None
        normalisers = gsnr.layer_normalisers(sums[gsnr.SUM_R], table.layer_numel)
        rhos = [self._factor(g, r, normalisers) if r is not None else None for g, r in zip(groups, ratios)]
        if any(active):
            self._record_stats(groups, rhos, table, sums, n)
        return rhos

    def _group_ratio(self, pieces: GroupPieces, n: int, grad_norms: Tensor) -> tuple[TensorList, Tensor]:
        """r of the group's pieces; grad_norms [P] are the pieces' ||G|| (owner norm = root-sum-square)."""
        owner_sq_norms: dict[int, float] = {}
        owners: dict[int, Tensor] = {}
        for piece, norm in zip(pieces.pieces, grad_norms.tolist()):
            owners[id(piece.owner)] = piece.owner
            owner_sq_norms[id(piece.owner)] = owner_sq_norms.get(id(piece.owner), 0.0) + norm * norm
        keys = list(owners)
        scales = self._moments.grad_scales([owners[k] for k in keys], [math.sqrt(owner_sq_norms[k]) for k in keys])
        scale_of = dict(zip(keys, scales))
        sq_of = {key: self._moments.sq_sum(owner) for key, owner in owners.items()}
        sq, mean_scales = [], []
        for piece in pieces.pieces:
            q, c = sq_of[id(piece.owner)], scale_of[id(piece.owner)]
            sq.append(piece.of(q) if q is not None else torch.zeros_like(piece.of(piece.owner), dtype=torch.float32))
            mean_scales.append(1.0 / (c * n) if c > 0 else 0.0)
        ops = ListOps(self._use_foreach(pieces.group))
        return gsnr.gsnr_ratio(pieces.grads, sq, grad_norms**2, mean_scales, n, pieces.group["eps_gsnr"], ops)

    def _factor(self, pieces: GroupPieces, r: TensorList, normalisers: list) -> TensorList:
        group = pieces.group
        ops = ListOps(self._use_foreach(group))
        gsnr.normalise_(r, pieces.table.per_piece(normalisers), ops)
        if group["gsnr_ema"] > 0.0:
            state = self.state[pieces.pieces[0].owner]
            state["gsnr_ema_steps"] = state.get("gsnr_ema_steps", 0) + 1
            ema = pieces.state("gsnr_q_ema", torch.float32)
            gsnr.ema_(r, ema, group["gsnr_ema"], state["gsnr_ema_steps"], ops)
        ops.clamp_(r, *gsnr.factor_bounds(group["gamma"]))
        return r

    def _record_stats(self, groups, rhos, table: gsnr.LayerTable, sums: list, n: int) -> None:
        counts = []
        for pieces, rho in zip(groups, rhos):
            if rho is None:
                counts.append(torch.zeros(2, len(pieces), device=pieces.grads[0].device))
            else:
                counts.append(gsnr.bound_counts(rho, *gsnr.factor_bounds(pieces.group["gamma"])))
        at_bounds = table.layer_sums(torch.cat(counts, dim=1)).tolist()
        layers = [i for i, numel in enumerate(sums[4]) if numel > 0]
        step = max(int(self.state[g.pieces[0].owner].get("step", torch.tensor(0.0)).item()) for g in groups) + 1

        def pick(row):
            return [row[i] for i in layers]

        stats = gsnr.GsnrStats(
            step=step,
            n=n,
            layer_names=pick(table.layer_names),
            layer_numel=[int(x) for x in pick(sums[4])],
            sum_r=pick(sums[gsnr.SUM_R]),
            sum_m2=pick(sums[gsnr.SUM_M2]),
            sum_v=pick(sums[gsnr.SUM_V]),
            at_low=pick(at_bounds[0]),
            at_high=pick(at_bounds[1]),
        )
        same_step = self._stats is not None and self._stats.step == step
        self._stats = self._stats.merged(stats) if same_step else stats

    def _skip(self) -> None:
        self.skipped_steps += 1
        warnings.warn(
            f"{type(self).__name__}: non-finite gradient (inf/NaN); step skipped, parameters and "
            f"optimizer state unchanged ({self.skipped_steps} skipped so far)",
            RuntimeWarning,
            stacklevel=3,
        )

    # ----------------------------------------------------------------- stats
    def gsnr_stats(self, micro_batch_size: Optional[int] = None) -> dict:
        """Statistics of the last step that computed GSNR (see :meth:`GsnrStats.as_dict`)."""
        if self._stats is None:
            return {"step": 0, "n": 0, "layers": {}, "skipped_steps": self.skipped_steps}
        self._stats.skipped_steps = self.skipped_steps
        return self._stats.as_dict(micro_batch_size or self.micro_batch_size)

    # ------------------------------------------------------- shared by rules
    @staticmethod
    def _trust_ratios(
        pieces: GroupPieces,
        updates: TensorList,
        ops: ListOps,
        exclude_1d: bool,
        coefficient: float = 1.0,
        max_ratio: float = math.inf,
    ) -> list[float]:
        """Per piece: min(coefficient * ||W|| / ||update||, max_ratio) of its layer.

        1 where either norm is 0, and for layers with ndim <= 1 when exclude_1d.
        Norms are per layer, summed over pieces and ranks (one small reduce).
        """
        weight_norms, update_norms = pieces.layer_norms([pieces.params, updates], ops)
        matrix = pieces.is_matrix()
        ratios = []
        for w, u, is_matrix in zip(weight_norms, update_norms, matrix):
            if (exclude_1d and not is_matrix) or w == 0.0 or u == 0.0:
                ratios.append(1.0)
            else:
                ratios.append(min(coefficient * w / u, max_ratio))
        return ratios

    @staticmethod
    def _adam_moments(pieces: GroupPieces, direction: TensorList, ops: ListOps) -> tuple[TensorList, TensorList, float]:
        """Adam's moment update of d; returns (m, sqrt(v_hat) + eps, 1 - beta1^t).

        m <- b1 m + (1 - b1) d;  v <- b2 v + (1 - b2) d^2;  m_hat = m / (1 - b1^t).
        """
        group = pieces.group
        (beta1, beta2), t = group["betas"], pieces.step()
        exp_avg, exp_avg_sq = pieces.state("exp_avg"), pieces.state("exp_avg_sq")
        ops.lerp_(exp_avg, direction, 1.0 - beta1)
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, direction, direction, 1.0 - beta2)
        denom = ops.sqrt(exp_avg_sq)
        ops.mul_(denom, 1.0 / math.sqrt(1.0 - beta2**t))
        ops.add_scalar_(denom, group["eps"])
        return exp_avg, denom, 1.0 - beta1**t

    @staticmethod
    def _decayed_pieces(pieces: GroupPieces, exclude_1d: bool) -> list[int]:
        """Indices of the pieces that take weight decay (all, or only ndim > 1 with exclude_1d)."""
        return [i for i, is_matrix in enumerate(pieces.is_matrix()) if is_matrix or not exclude_1d]
