"""The shared VR optimizer: the GSNR factor in front of a base update rule.

:class:`VROptimizer` does what VR-SGD, VR-Adam(W), VR-LARS and VR-LAMB share
(capture, the factor rho of :mod:`ds_vrgd.gsnr`, the non-finite guard,
statistics, state); a subclass writes only its rule (:meth:`VROptimizer._direction`,
and for LARS/LAMB :meth:`VROptimizer._apply`). The three phases of a step and
their two per-layer reductions: docs/design.md §4, "How a step runs".
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ds_vrgd import gsnr
from ds_vrgd._tensor_lists import ListOps, Scratch, TensorList
from ds_vrgd.capture import BackwardHookMoments, MomentSource
from ds_vrgd.layout import Layout, WholeParamLayout
from ds_vrgd.optim.blocks import (
    FIRST_ROWS, SECOND_ROWS, Block, GroupStep, LayerSums, PieceSums, Ratios, Updates, block_runs, tiles,
)
from ds_vrgd.optim.options import VR_DEFAULTS, split_vr_options, validate_vr_options

CPU_TILE_NUMEL = 1 << 20
"""Elements per block on CPU: 4 MiB of fp32 per tensor, so the handful of tensors a block's chain of
ops touches stays in a 32 MiB L3; measured on BERT-base, 2^20-2^21 beat 2^18 (per-op overhead) and
2^22 (cache misses)."""

FP32_STATE = ("gsnr_q_ema", "gsnr_rho")
"""Per-element VR state kept in fp32 whatever the parameter's dtype: the EMA of q and the rho held
between statistics steps."""


def statistics_step(t: int, group: dict) -> bool:
    """Whether optimizer step t (counted from 1) of ``group`` computes GSNR statistics: the first step
    after ``gsnr_warmup_steps`` and every ``gsnr_interval``-th one after it (docs/design.md §2)."""
    warmup = group["gsnr_warmup_steps"]
    return t > warmup and (t - warmup - 1) % group["gsnr_interval"] == 0


def statistics_steps_through(t: int, group: dict) -> int:
    """How many of steps 1..t are statistics steps: the EMA's step count after step t (so the EMA's bias
    correction needs no state of its own, and checkpoints of every format carry it with the step count)."""
    warmup = group["gsnr_warmup_steps"]
    return 0 if t <= warmup else 1 + (t - warmup - 1) // group["gsnr_interval"]


class VROptimizer(Optimizer):
    """Base class of the VR optimizers: a torch Optimizer whose step scales the rule's update by rho.

    Args:
        params: parameters or param groups, as for any torch optimizer (a group may override any option).
        defaults: the rule's own options (lr, betas, ...).
        foreach: multi-tensor kernels; None = on for accelerators, off on CPU (which runs in tiles).
        vr_options: the shared keyword options, :class:`ds_vrgd.optim.options.VROptions`.
    Raises ValueError naming the option for an unknown name or a bad value.
    """

    uses_layer_norms = False
    """True for rules that need per-layer ||W|| and ||update|| (LARS, LAMB): phase 3 runs."""

    def __init__(self, params: Iterable, defaults: dict, foreach: Optional[bool], vr_options: dict):
        defaults = {**defaults, **split_vr_options(type(self), vr_options), "foreach": foreach}
        self._validate(defaults)
        self._moments: MomentSource = BackwardHookMoments(self.samples_due)
        super().__init__(params, defaults)
        self._layout = WholeParamLayout(self)
        self.skipped_steps = 0
        self.micro_batch_size: Optional[int] = None
        self._stats: Optional[gsnr.GsnrStats] = None
        self._warned_few_samples = False
        self._scratch = Scratch(CPU_TILE_NUMEL)

    # ----------------------------------------------------------------- setup
    def _validate(self, options: dict) -> None:
        """Raise ValueError naming the first bad option of ``options`` (the defaults, or a param group
        over the defaults): the shared ones here (:func:`validate_vr_options`), the rule's in subclasses."""
        validate_vr_options(options)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group after validating the group's options (the defaults fill the rest)."""
        self._validate({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for param in group["params"]:
            if param.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse parameters")
        if group["vr"] and isinstance(self._moments, BackwardHookMoments):
            self._moments.watch(group["params"], group.get("param_names"))

    def use_moments(self, source: MomentSource, layout: Optional[Layout] = None) -> None:
        """Replace the sample source (and the piece layout); the DeepSpeed/DDP adapters call this.
        The source asks :meth:`samples_due` before capturing a step's samples."""
        self._moments.close()
        self._moments = source
        if layout is not None:
            self._layout = layout

    def samples_due(self) -> bool:
        """Whether the next step computes GSNR statistics for some group, so that its backward passes
        are samples (False on the steps of warm-up and between the steps of ``gsnr_interval``: the
        sources then capture and reduce nothing)."""
        t = self._steps_done() + 1
        return any(group["vr"] and group["gamma"] != 0.0 and statistics_step(t, group) for group in self.param_groups)

    def _steps_done(self, params: Optional[list[Tensor]] = None) -> int:
        """Steps taken by ``params`` (default: all parameters): their largest step count (torch counts per
        parameter). Between steps all of DeepSpeed's ZeRO-3 fp32 sub-groups have the same count, but each
        is in the param groups only during its own step() call, so the default reads every state."""
        states = self.state.values() if params is None else (self.state[p] for p in params)
        return max((int(state["step"]) for state in states if "step" in state), default=0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._moments.reset()

    def state_dict(self) -> dict:
        """torch's state dict, and under ``"vr"`` the last statistics (:meth:`gsnr_stats`) and the count of
        skipped steps, so that a resumed run reports them as the uninterrupted one does."""
        state = super().state_dict()
        state["vr"] = {"skipped_steps": self.skipped_steps,
                       "stats": None if self._stats is None else dataclasses.asdict(self._stats)}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, keeping :data:`FP32_STATE` (the GSNR EMA, the held rho) in fp32 for low-precision
        parameters, and the statistics and skipped-step count of :meth:`state_dict` (absent: none)."""
        fp32 = {
            (index, key): value[key].float().clone()
            for index, value in state_dict["state"].items()
            for key in FP32_STATE
            if key in value
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        order = [i for group in state_dict["param_groups"] for i in group["params"]]
        for (index, key), value in fp32.items():
            param = params[order.index(index)]
            self.state[param][key] = value.to(param.device)
        vr = state_dict.get("vr", {})
        self.skipped_steps = vr.get("skipped_steps", 0)
        self._stats = gsnr.GsnrStats(**vr["stats"]) if vr.get("stats") else None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in VR_DEFAULTS.items():
                group.setdefault(key, value)

    # ----------------------------------------------------- the base rule API
    def _direction(self, group: dict, block: Block, rho: Optional[TensorList], ops: ListOps) -> Optional[TensorList]:
        """Phase 2: the rule's update of ``block`` with the element-wise factor rho (None = 1).

        Returns None after updating the parameters (SGD, Adam), or, for rules
        with ``uses_layer_norms``, the update direction, which phase 3 applies
        with the layer's trust ratio (the parameters are not changed yet).
        """
        raise NotImplementedError

    def _trust_ratio(self, group: dict, weight_norm: float, update_norm: float) -> float:
        """LARS/LAMB: the trust ratio of a layer with ndim > 1 (see :func:`trust_ratio`)."""
        raise NotImplementedError

    def _apply(self, group: dict, block: Block, update: TensorList, trust: list[float], ops: ListOps) -> None:
        """Phase 3 (LARS/LAMB): apply phase 2's direction ``update`` with one trust ratio per piece."""
        raise NotImplementedError

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param group; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        n = self._moments.num_samples()
        plan = self._plan(n)
        if plan is not None:
            self._run(*plan, n)
        self._moments.step_done()
        return loss

    def _plan(self, n: int) -> Optional[tuple[list[GroupStep], gsnr.LayerTable]]:
        """The groups' blocks and the step's layer table for n samples; None when there is nothing to do."""
        per_group, all_pieces = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                if param.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            pieces = self._layout.pieces(params)
            on_cpu = any(p.device.type == "cpu" for p in params)
            cut = [tile for piece in pieces for tile in tiles(piece, CPU_TILE_NUMEL)] if on_cpu else pieces
            per_group.append((group, params, cut, on_cpu))
            all_pieces.extend(cut)
        table = self._layout.table(all_pieces)
        if not all_pieces and table.reduce is None:
            return None
        steps, first = [], 0
        for group, params, pieces, on_cpu in per_group:
            self._init_steps(params)
            foreach = (not on_cpu) if group["foreach"] is None else bool(group["foreach"])
            blocks = [Block(self.state, chunk, first + start, table)
                      for start, chunk in block_runs(pieces, CPU_TILE_NUMEL if on_cpu else None)]
            ops = ListOps(foreach, None if foreach else self._scratch)
            steps.append(GroupStep(group, blocks, ops, *self._rho_source(group, n)))
            first += len(pieces)
        return steps, table

    def _init_steps(self, params: list[Tensor]) -> None:
        for param in params:
            self.state[param].setdefault("step", torch.tensor(0.0))

    def _run(self, groups: list[GroupStep], table: gsnr.LayerTable, n: int) -> None:
        first, ratios = self._phase1(groups, table, n)
        sums = first.layer_sums()
        if not all(math.isfinite(x) for x in sums["grad_sq"]):
            self._skip()
            return
        for g in groups:
            self._advance_steps(g)
        normalisers = gsnr.layer_normalisers(sums["sum_r"], table.layer_numel)
        second, updates = self._phase2(groups, table, ratios, normalisers)
        if any(g.gsnr for g in groups) or self.uses_layer_norms:
            second_sums = second.layer_sums()
            if self.uses_layer_norms:
                self._phase3(groups, table, updates, second_sums)
            if any(g.gsnr for g in groups):
                self._record_stats(groups, table, sums, second_sums, n)

    def _phase1(self, groups: list[GroupStep], table: gsnr.LayerTable, n: int) -> tuple[PieceSums, Ratios]:
        """Per block the GSNR ratio (where GSNR is on); the sums of :data:`FIRST_ROWS` per piece
        (only ||grad||^2 where GSNR is off: the non-finite guard needs it)."""
        partial = PieceSums(FIRST_ROWS, table, self._reduce_device())
        ratios: Ratios = []
        for g in groups:
            # the gradient's scale matters only where the mean comes from the gradient (no sample sums)
            owners = [p for p in g.group["params"]
                      if p.grad is not None and self._moments.sample_sum(p) is None] if g.gsnr else []
            mean_scales = {id(p): 1.0 / (c * n) if c > 0 else 0.0
                           for p, c in zip(owners, self._moments.grad_scales(owners))}
            ratios.append([])
            for block in g.each_block():
                ratio, grad_sq_known = None, False
                if g.gsnr:
                    ratio, from_sample_sums = self._ratio(g, block, n, mean_scales)
                    partial.put(block.columns, **dict(zip(gsnr.PARTIAL_ROWS, ratio.partial)),
                                numel=torch.tensor([float(p.numel) for p in block.pieces]))
                    grad_sq_known = not from_sample_sums
                if not grad_sq_known:  # the guard must see the gradient itself
                    partial.put(block.columns, grad_sq=g.ops.sq_norms(block.grads))
                ratios[-1].append(ratio)
        return partial, ratios

    def _ratio(
        self, g: GroupStep, block: Block, n: int, mean_scales: dict[int, float]
    ) -> tuple[gsnr.GsnrRatio, bool]:
        """Phase 1 of a block; mean_scales: a = 1 / (c n) per owner id whose mean comes from its gradient.

        The mean comes from the source's fp32 sum of the samples where it keeps
        one (low-precision gradients, DeepSpeed; a = 1 / n), else from the
        gradient. Returns the ratio and whether any piece used sample sums.
        """
        sq, sums, scales = [], [], []
        for piece, grad in zip(block.pieces, block.grads):
            q = self._moments.sq_sum(piece.owner)
            sq.append(piece.of(q) if q is not None else torch.zeros_like(piece.of(piece.owner), dtype=torch.float32))
            sample_sum = self._moments.sample_sum(piece.owner)
            sums.append(grad if sample_sum is None else piece.of(sample_sum))
            scales.append(mean_scales[id(piece.owner)] if sample_sum is None else 1.0 / n)
        group = g.group
        ratio = gsnr.gsnr_ratio(sums, sq, scales, n, group["eps_gsnr"], group["gsnr_max"], g.ops)
        return ratio, any(s is not grad for s, grad in zip(sums, block.grads))

    def _phase2(
        self, groups: list[GroupStep], table: gsnr.LayerTable, ratios: Ratios, normalisers: list
    ) -> tuple[PieceSums, Updates]:
        """Per block rho (from phase 1's ratio, in place) and the rule's update; returns the sums of
        :data:`SECOND_ROWS` per piece and the LARS/LAMB directions for phase 3."""
        second = PieceSums(SECOND_ROWS, table, self._reduce_device())
        updates: Updates = []
        for g, group_ratios in zip(groups, ratios):
            group, ops = g.group, g.ops
            updates.append([])
            for block, ratio in zip(g.each_block(), group_ratios):
                rho = None
                if ratio is not None:
                    at_low, at_high = self._factor(g, block, ratio, normalisers)
                    second.put(block.columns, at_low=at_low, at_high=at_high)
                    rho = ratio.ratio
                    if group["gsnr_interval"] > 1:  # held until the next statistics step
                        ops.copy_(block.state("gsnr_rho", torch.float32), rho)
                elif g.held:
                    # a copy the rule may write over; kept, not a block temporary: LARS/LAMB write their
                    # direction into rho and phase 3 reads it after later blocks have reused the scratch
                    rho = ops.clone(block.state("gsnr_rho", torch.float32, fill=1.0), keep=True)
                update = self._direction(group, block, rho, ops)
                if self.uses_layer_norms:
                    second.put(block.columns, weight_sq=ops.sq_norms(block.params), update_sq=ops.sq_norms(update))
                updates[-1].append(update)
        return second, updates

    def _factor(self, g: GroupStep, block: Block, ratio: gsnr.GsnrRatio, normalisers: list) -> Tensor:
        """rho of a block in place (over ``ratio.ratio``); returns its [2, P] bound counts."""
        scales = []
        for z, layer in zip(ratio.scale, (p.layer for p in block.pieces)):
            inverse_mean = normalisers[layer]
            scales.append(None if inverse_mean is None else z * inverse_mean)
        ema = None
        if g.group["gsnr_ema"] > 0.0:
            steps = [statistics_steps_through(t, g.group) for t in block.steps]
            ema = (block.state("gsnr_q_ema", torch.float32), g.group["gsnr_ema"], steps)
        return gsnr.bound_factor_(ratio.ratio, scales, g.group["gamma"], g.ops, ema)

    def _phase3(self, groups: list[GroupStep], table: gsnr.LayerTable, updates: Updates, sums: LayerSums) -> None:
        """LARS/LAMB: trust ratio per layer from the reduced norms, then each block's update."""
        weight, update = sums.sqrt("weight_sq", "update_sq")
        exempt = [ndim <= 1 for ndim in table.layer_ndim]
        for g, group_updates in zip(groups, updates):
            ratios = [1.0 if (exempt[layer] and g.group["exclude_1d"]) else self._trust_ratio(g.group, w, u)
                      for layer, (w, u) in enumerate(zip(weight, update))]
            for block, block_update in zip(g.each_block(), group_updates):
                self._apply(g.group, block, block_update, table.per_piece(ratios, block.columns), g.ops)

    def _reduce_device(self) -> torch.device:
        """Where the per-layer sums live: the device of the parameters (DeepSpeed's ZeRO-3 fills one group at a time)."""
        return next((group["params"][0].device for group in self.param_groups if group["params"]), torch.device("cpu"))

    def _advance_steps(self, g: GroupStep) -> None:
        for param in g.group["params"]:
            if param.grad is not None:
                self.state[param]["step"] += 1

    def _rho_source(self, group: dict, n: int) -> tuple[bool, bool]:
        """(GSNR computed this step, rho held from the last statistics step) for a group; neither: rho = 1.

        A statistics step with n < 2 warns (once) and takes rho = 1. A held step uses the stored rho
        (none stored yet: rho = 1)."""
        if not group["vr"] or group["gamma"] == 0.0:
            return False, False
        t = self._steps_done(group["params"]) + 1
        if statistics_step(t, group):
            if n < 2:
                self._warn_few_samples(n)
            return n >= 2, False
        held = t > group["gsnr_warmup_steps"] and any(
            "gsnr_rho" in self.state[p] for p in group["params"] if p.grad is not None)
        return False, held

    def _warn_few_samples(self, n: int) -> None:
        if self._warned_few_samples:
            return
        self._warned_few_samples = True
        warnings.warn(
            f"{type(self).__name__}: {n} gradient sample(s) in this step; GSNR needs at least 2 "
            "(several backward() calls per step, data-parallel ranks or gradient accumulation), "
            "so this step uses rho = 1 (the base optimizer). Warned once.",
            UserWarning,
            stacklevel=7,
        )

    def _record_stats(
        self, groups: list[GroupStep], table: gsnr.LayerTable, first: LayerSums, second: LayerSums, n: int
    ) -> None:
        layers = [i for i, numel in enumerate(first["numel"]) if numel > 0]
        owners = [p for g in groups for p in g.group["params"] if "step" in self.state[p]]
        step = max(int(self.state[p]["step"]) for p in owners)

        def pick(row):
            return [row[i] for i in layers]

        stats = gsnr.GsnrStats(
            step=step,
            n=n,
            layer_names=pick(table.layer_names),
            layer_numel=[int(x) for x in pick(first["numel"])],
            **{name: pick(first[name]) for name in ("sum_r", "sum_m2", "sum_v", "at_cap")},
            **{name: pick(second[name]) for name in ("at_low", "at_high")},
        )
        same_step = self._stats is not None and self._stats.step == step
        self._stats = self._stats.merged(stats) if same_step else stats

    def _skip(self) -> None:
        self.skipped_steps += 1
        warnings.warn(
            f"{type(self).__name__}: non-finite gradient (inf/NaN); step skipped, parameters and "
            f"optimizer state unchanged ({self.skipped_steps} skipped so far)",
            RuntimeWarning,
            stacklevel=4,
        )

    # ----------------------------------------------------------------- stats
    def gsnr_stats(self, micro_batch_size: Optional[int] = None) -> dict:
        """Statistics of the last step that computed GSNR (see :meth:`GsnrStats.as_dict`)."""
        if self._stats is None:
            return {"step": 0, "n": 0, "layers": {}, "skipped_steps": self.skipped_steps}
        self._stats.skipped_steps = self.skipped_steps
        return self._stats.as_dict(micro_batch_size or self.micro_batch_size)
