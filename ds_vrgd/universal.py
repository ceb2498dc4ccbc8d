"""DeepSpeed universal checkpoints that keep the VR optimizers' state (docs/deepspeed.md, "Checkpoints").

DeepSpeed's ``ds_to_universal`` turns a ZeRO 1/2/3 checkpoint into one that ``"checkpoint": {"load_universal":
true}`` loads on another data-parallel size, but it names Adam's state (``exp_avg``, ``exp_avg_sq``; and ``step``)
where it extracts, merges and, at ZeRO-3, loads: it fails on VRSGD/VRLARS (``KeyError: 'exp_avg'``) and drops
``momentum_buffer``, ``gsnr_q_ema`` and ``gsnr_rho`` without a word (upstream: DeepSpeed issue 8608).

``python -m ds_vrgd.universal --input_folder CKPT/global_stepN --output_folder CKPT/global_stepN_universal`` takes
DeepSpeed's arguments and runs DeepSpeed's converter with every per-element state carried (:func:`convert`).
:func:`restoring`, around the engine's load (installed by :func:`ds_vrgd.deepspeed.attach`), loads every such state
at ZeRO-3 too and refuses a checkpoint that lacks state the VR optimizer keeps. The DeepSpeed internals used:
:data:`UNIVERSAL_INTERNALS`, checked at import.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import types
from typing import Any, Callable, Iterator

import torch

from deepspeed.checkpoint import (
    AFFINE_MAP, AFFINE_MAP_PARAMS, BASE_OPTIMIZER_STATE, DeepSpeedCheckpoint, OPTIMIZER_STATE_DICT, PARAM_GROUPS,
    PARAM_SLICE_MAPPINGS, PIPELINE_REPLICATED_PARAMETER_PATTERNS, SINGLE_PARTITION_OF_FP32_GROUPS,
    UNIVERSAL_CHECKPOINT_INFO, ds_to_universal,
)
from deepspeed.checkpoint.affine import SCALE_POWER_BY_STATE
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

from ds_vrgd.deepspeed import ASSIGNED, check_internals
from ds_vrgd.optim import VRLAMB, VRAdam, VROptimizer
from ds_vrgd.optim.options import VR_DEFAULTS

ADAM_STATES = ("fp32", "exp_avg", "exp_avg_sq")
"""The state names DeepSpeed hard-codes (a tuple constant of the functions in :data:`STATE_TUPLE_USERS`)."""

STATE_TUPLE_USERS = (ds_to_universal.merge_tp_slices, ds_to_universal.merge_zero3_slices,
                     DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
"""DeepSpeed's functions that loop over :data:`ADAM_STATES`; run here as copies that loop over the checkpoint's
states instead (:func:`_over_states`)."""

MARKER = "ds_vrgd_universal.json"
"""Written by :func:`convert` into the output's ``zero/`` folder: every per-element state was carried."""

UNIVERSAL_INTERNALS = (
    # replaced while convert() runs: the same work for every state the optimizer keeps
    (ds_to_universal, "extract_zero_shards", ("dir", "ds_checkpoint", "indices_3D")),
    (ds_to_universal, "extract_zero_shards_stage3",
     ("optim_files_grid", "param_shapes_grid", "dp_degree", "temp_dir", "indices", "exclude_param_names")),
    (ds_to_universal, "merge_tp_slices", ("uc_info", "dir", "slice_dir", "tp_degree", "name_and_shapes")),
    (ds_to_universal, "merge_zero3_slices", ("dp_degree", "dir", "slice_dir", "name")),
    # called by the replacements, as DeepSpeed's own extraction calls them
    (ds_to_universal, "dump_param_fragment",
     ("dir", "tp_index", "dp_index", "state_name", "state_flat_tensor", "param_name", "offset", "numel")),
    (ds_to_universal, "_zero_partitioned_param_info", ("unpartitioned_numel", "world_size")),
    (ds_to_universal, "_shape_numel", ("shape",)),
    (ds_to_universal, "parse_arguments", ()),
    (ds_to_universal, "main", ("args",)),
    (DeepSpeedCheckpoint, "get_zero_checkpoint_state", ("self", "pp_index", "tp_index", "dp_index",
                                                         "strip_tensor_paddings")),
    (DeepSpeedCheckpoint, "get_checkpoint_info", ("self", "info_key")),
    # replaced on the instance by restoring() (a copy over the checkpoint's states)
    (DeepSpeedZeroOptimizer_Stage3, "load_hp_checkpoint_state_from_checkpoint_dir_stage3", ("self", "checkpoint_dir")),
    (DeepSpeedZeroOptimizer_Stage3, "fp16_groups fp32_partitioned_groups_flat param_names optimizer", ASSIGNED),
)
"""What this module patches or reads in DeepSpeed, as :data:`ds_vrgd.deepspeed.DEEPSPEED_INTERNALS` (same kinds);
the state tuple inside :data:`STATE_TUPLE_USERS` is checked next to it."""



def _check_state_tuples() -> None:
    """ImportError unless every function of :data:`STATE_TUPLE_USERS` still holds the tuple :data:`ADAM_STATES`."""
    lacking = [f.__qualname__ for f in STATE_TUPLE_USERS if ADAM_STATES not in f.__code__.co_consts]
    if lacking:
        raise ImportError(f"ds_vrgd.universal: the installed deepspeed no longer loops over {ADAM_STATES} in "
                          f"{', '.join(lacking)}; universal checkpoints of VR optimizers need an update of this module")


check_internals(UNIVERSAL_INTERNALS)
_check_state_tuples()

_MERGE_TP_SLICES, _MERGE_ZERO3_SLICES = ds_to_universal.merge_tp_slices, ds_to_universal.merge_zero3_slices


def _over_states(function: Callable, states: tuple[str, ...]) -> Callable:
    """A copy of ``function`` whose loop over :data:`ADAM_STATES` runs over ``states``: the same code with that
    tuple constant replaced, so everything else it does (TP merge patterns, ZeRO-3 partitioning) stays DeepSpeed's."""
    code = function.__code__
    consts = tuple(states if const == ADAM_STATES else const for const in code.co_consts)
    return types.FunctionType(code.replace(co_consts=consts), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


# ------------------------------------------------------------- conversion
def _carried(state: dict, extent: int, where: str, keep_step: bool) -> dict:
    """The entries of one flat partition's optimizer ``state`` a universal checkpoint carries: every flat tensor
    covering the partition's ``extent`` elements (per-element state), and ``step`` if ``keep_step``. Other state
    cannot be cut per parameter, nor put back by DeepSpeed's loaders: ValueError naming it."""
    carried = {}
    for key, value in state.items():
        if key == "step":
            if keep_step:
                carried[key] = value
        elif torch.is_tensor(value) and value.dim() == 1 and value.numel() >= extent:
            carried[key] = value
        else:
            raise ValueError(
                f"ds_vrgd.universal: optimizer state {key!r} of {where} is neither per-element (a flat tensor of "
                f"the fp32 partition's size) nor 'step' ({value!r:.60}); a universal checkpoint cannot carry it")
    return carried


def _extract_zero_shards(dir: str, ds_checkpoint, indices_3D: tuple) -> None:
    """DeepSpeed's ``extract_zero_shards`` (ZeRO 1/2) with the states named by the optimizer state itself: each
    parameter's fragment of the fp32 partition and of every carried state, per (pp, tp, dp) rank."""
    pp_index, tp_index, dp_index = indices_3D
    optim_sd = ds_checkpoint.get_zero_checkpoint_state(pp_index=pp_index, tp_index=tp_index,
                                                       dp_index=dp_index)[OPTIMIZER_STATE_DICT]
    info = ds_checkpoint.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO)
    pipeline_replicated = info.get(PIPELINE_REPLICATED_PARAMETER_PATTERNS, [])
    states = optim_sd[BASE_OPTIMIZER_STATE]["state"]
    for group, fp32 in enumerate(optim_sd[SINGLE_PARTITION_OF_FP32_GROUPS]):
        mappings = optim_sd[PARAM_SLICE_MAPPINGS][group]
        extent = max((m.start + m.numel for m in mappings.values()), default=0)
        flat_state = dict(_carried(states.get(group, {}), extent, f"param group {group}", keep_step=True), fp32=fp32)
        for name, fragment in mappings.items():
            if pp_index > 0 and any(re.match(pattern, name) for pattern in pipeline_replicated):
                continue  # tied weights replicated in the first and last pipeline stages
            for key, value in flat_state.items():
                ds_to_universal.dump_param_fragment(dir, tp_index, dp_index, key, value, name, fragment.start,
                                                    fragment.numel)


def _extract_zero_shards_stage3(optim_files_grid: list, param_shapes_grid: list, dp_degree: int, temp_dir: str,
                                indices: tuple, exclude_param_names=None) -> None:
    """DeepSpeed's ``extract_zero_shards_stage3`` with the states named by the optimizer state itself (``step``
    stays out, as there: the ZeRO-3 loader takes it from the saved optimizer state)."""
    tp_index, dp_index = indices
    exclude_param_names = exclude_param_names or set()
    optim_sd = torch.load(optim_files_grid[tp_index][dp_index], map_location="cpu",
                          weights_only=False)[OPTIMIZER_STATE_DICT]
    partition_groups = optim_sd.get("ds_zero_partition_groups") or []
    states = optim_sd[OPTIMIZER_STATE_DICT]["state"]
    for idx, sub_group_shape in enumerate(param_shapes_grid[tp_index]):
        fp32 = optim_sd["fp32_flat_groups"][idx]
        flat_state = dict(_carried(states.get(idx, {}), fp32.numel(), f"sub-group {idx}", keep_step=False), fp32=fp32)
        metadata = partition_groups[idx] if idx < len(partition_groups) else {}
        count, rank = metadata.get("partition_count", dp_degree), metadata.get("partition_rank", dp_index)
        offset = 0
        for name, shape in sub_group_shape.items():
            numel = ds_to_universal._shape_numel(shape)
            partitioned, _ = ds_to_universal._zero_partitioned_param_info(numel, count)
            if name not in exclude_param_names:
                for key, value in flat_state.items():
                    ds_to_universal.dump_param_fragment(temp_dir, tp_index, dp_index, key, value, name, offset,
                                                        max(0, min(partitioned, numel - rank * partitioned)))
            offset += partitioned


def _fragment_states(slice_base_path: str) -> tuple[str, ...]:
    """The states extracted for one parameter (files ``<tp>/<state>.<dp>``): fp32 first, ``step`` left to
    DeepSpeed's own handling."""
    found = {os.path.basename(path).rsplit(".", 1)[0] for path in glob.glob(os.path.join(slice_base_path, "*", "*.*"))}
    return ("fp32", *sorted(found - {"fp32", "step"}))


def _merge_tp_slices(uc_info: dict, dir: str, slice_dir: str, tp_degree: int, name_and_shapes: tuple):
    """DeepSpeed's ``merge_tp_slices`` (ZeRO 1/2, and ZeRO-3 with tensor parallelism) over every extracted state
    of the parameter. An AutoTP affine map scales each state by its own power, known to DeepSpeed for Adam's
    only: ValueError for other states there."""
    states = _fragment_states(os.path.join(slice_dir, name_and_shapes[0]))
    unknown = [state for state in states if state not in SCALE_POWER_BY_STATE]
    if unknown and uc_info.get(AFFINE_MAP, {}).get(AFFINE_MAP_PARAMS):
        raise ValueError(f"ds_vrgd.universal: the checkpoint's AutoTP affine maps cannot rescale the state {unknown}")
    return _over_states(_MERGE_TP_SLICES, states)(uc_info, dir, slice_dir, tp_degree, name_and_shapes)


def _merge_zero3_slices(dp_degree: int, dir: str, slice_dir: str, name: str) -> None:
    """DeepSpeed's ``merge_zero3_slices`` over every extracted state of the parameter."""
    _over_states(_MERGE_ZERO3_SLICES, _fragment_states(os.path.join(slice_dir, name)))(dp_degree, dir, slice_dir, name)


@contextlib.contextmanager
def _replaced(owner: Any, **replacements) -> Iterator[None]:
    """Set attributes of ``owner`` for the duration of the block, then put the previous values back."""
    previous = {name: getattr(owner, name) for name in replacements}
    for name, value in replacements.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(owner, name, value)


def convert(args) -> None:
    """DeepSpeed's ``ds_to_universal.main(args)`` carrying every per-element optimizer state, then :data:`MARKER`.

    Its extraction and merge functions are replaced by this module's for the duration: module-level functions,
    so that its worker processes (``--num_extract_workers``, ``--num_merge_workers``) unpickle them by name, under
    any start method, and each finds the state names in its own input (the optimizer state, the fragments).
    """
    with _replaced(ds_to_universal, extract_zero_shards=_extract_zero_shards,
                   extract_zero_shards_stage3=_extract_zero_shards_stage3,
                   merge_tp_slices=_merge_tp_slices, merge_zero3_slices=_merge_zero3_slices):
        ds_to_universal.main(args)
    with open(os.path.join(args.output_folder, "zero", MARKER), "w") as f:
        json.dump({"converter": "ds_vrgd.universal", "per_element_state": "all"}, f)


def main() -> None:
    """``python -m ds_vrgd.universal``: DeepSpeed's ``ds_to_universal`` arguments, then :func:`convert`."""
    convert(ds_to_universal.parse_arguments())


# ---------------------------------------------------------------- loading
STATE_DESCRIPTIONS = {
    "exp_avg": "Adam's first moment", "exp_avg_sq": "Adam's second moment",
    "momentum_buffer": "the momentum buffer, momentum > 0", "gsnr_q_ema": "the GSNR EMA, gsnr_ema > 0",
    "gsnr_rho": "the rho held between statistics steps, gsnr_interval > 1",
}
"""The per-element state of the VR optimizers, for the error of :func:`restoring`."""


def kept_state(optimizer: VROptimizer, group: dict) -> set[str]:
    """The per-element state ``optimizer`` keeps for a param ``group`` (its options) once it has stepped past
    warm-up with GSNR samples (docs/design.md §2): Adam's moments (VRAdam, VRAdamW, VRLAMB), the momentum buffer
    (VRSGD, VRLARS), the GSNR EMA and the held rho."""
    group = {**VR_DEFAULTS, **group}
    kept = {"exp_avg", "exp_avg_sq"} if isinstance(optimizer, (VRAdam, VRLAMB)) else set()
    if group.get("momentum"):
        kept.add("momentum_buffer")
    if group["vr"] and group["gamma"] != 0.0:
        kept |= {"gsnr_q_ema"} if group["gsnr_ema"] > 0.0 else set()
        kept |= {"gsnr_rho"} if group["gsnr_interval"] > 1 else set()
    return kept


def _folder_states(zero_dir: str, name: str) -> set[str]:
    """The per-element states a universal checkpoint holds for parameter ``name`` (``zero/<name>/<state>.pt``)."""
    return {file[:-3] for file in os.listdir(os.path.join(zero_dir, name)) if file.endswith(".pt")} - {"fp32", "step"}


def missing_state(engine: DeepSpeedEngine, folder: str) -> dict[str, list[str]]:
    """State -> the trainable parameters whose state the universal checkpoint ``folder`` lacks, for the VR
    optimizer of ``engine``; empty for a :func:`convert` output (it carries all there was). For another converter's
    (DeepSpeed's), what the optimizer keeps by the saved param groups' options (:func:`kept_state`, every group's
    for every parameter: strict where groups differ)."""
    zero_dir = os.path.join(folder, "zero")
    if os.path.isfile(os.path.join(zero_dir, MARKER)):
        return {}
    groups = torch.load(os.path.join(zero_dir, "optimizer_state.pt"), map_location="cpu",
                        weights_only=False)[PARAM_GROUPS]
    kept = set().union(*(kept_state(engine.vr_optimizer, group) for group in groups))
    missing: dict[str, list[str]] = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            for state in sorted(kept - _folder_states(zero_dir, name)):
                missing.setdefault(state, []).append(name)
    return missing


def _missing_error(engine: DeepSpeedEngine, folder: str, missing: dict[str, list[str]]) -> ValueError:
    lacking = "; ".join(f"{state} ({STATE_DESCRIPTIONS.get(state, 'per-element state')}) of {len(names)} "
                        f"parameter(s), e.g. {names[0]}" for state, names in missing.items())
    return ValueError(
        f"{type(engine.vr_optimizer).__name__} cannot resume from the universal checkpoint {folder}: "
        f"it lacks {lacking}. "
        "DeepSpeed's ds_to_universal carries only exp_avg, exp_avg_sq and step. Convert the ZeRO checkpoint with "
        f"`python -m ds_vrgd.universal --input_folder CKPT/global_stepN --output_folder {folder}` instead "
        "(same arguments)")


@contextlib.contextmanager
def restoring(engine: DeepSpeedEngine, folder: str, load_optimizer_states: bool = True) -> Iterator[None]:
    """Around the engine's ZeRO load of the universal checkpoint ``folder`` (``_load_zero_checkpoint``).

    Before: ValueError naming the state the checkpoint lacks and the fix (:func:`missing_state`). At ZeRO-3,
    DeepSpeed's loader runs over the checkpoint's states instead of Adam's (the same for every parameter: DeepSpeed
    gives every param group the options of the first there; ValueError otherwise), and afterwards each fp32
    sub-group gets a step tensor of its own (DeepSpeed gives them all one, which every sub-group's step would
    advance). ZeRO 1/2 load every state of the folder by themselves.
    """
    zero = engine.optimizer
    zero3 = isinstance(zero, DeepSpeedZeroOptimizer_Stage3)
    if zero3 and not load_optimizer_states:  # the weights only (ZeRO 1/2 load the optimizer state regardless)
        yield
        return
    missing = missing_state(engine, folder)
    if missing:
        raise _missing_error(engine, folder, missing)
    if not zero3:
        yield
        return
    zero_dir = os.path.join(folder, "zero")
    found = {name: _folder_states(zero_dir, name)
             for name in (zero.param_names[p] for group in zero.fp16_groups for p in group)}
    if len({frozenset(states) for states in found.values()}) > 1:
        raise ValueError(f"ZeRO-3 universal load: DeepSpeed restores the same optimizer state for every parameter, "
                         f"but {folder} holds different ones: {found}")
    states = ("fp32", *sorted(next(iter(found.values()), set())))
    load = _over_states(DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3, states)
    with _replaced(zero, load_hp_checkpoint_state_from_checkpoint_dir_stage3=types.MethodType(load, zero)):
        yield
    for flat in zero.fp32_partitioned_groups_flat:
        state = zero.optimizer.state[flat]
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


if __name__ == "__main__":
    # run as ds_vrgd.universal, not __main__: DeepSpeed's workers unpickle the replaced functions by that name
    from ds_vrgd.universal import main as _main

    _main()
