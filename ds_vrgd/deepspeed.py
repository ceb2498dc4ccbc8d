"""DeepSpeed adapter: the only module that touches DeepSpeed internals.

:func:`register` (run on import; when: :mod:`ds_vrgd`) lets a ds_config name the VR types and plain
``deepspeed.initialize`` build them; :func:`attach` then gives the engine's VR optimizer a
:class:`~ds_vrgd.partitioned.PartitionedMoments` source over its ZeRO partitions. Every internal
patched or read is in :data:`DEEPSPEED_INTERNALS`, checked at import with the version
(:func:`check_internals`, :func:`check_version`). Behaviour and limits: docs/deepspeed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from packaging.version import Version

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.runtime.zero import partition_parameters, stage_1_and_2
from deepspeed.runtime.zero import utils as zero_utils
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import logger

from ds_vrgd.gsnr import LOG_FIELDS
from ds_vrgd.optim import VR_OPTIMIZERS, VROptimizer
from ds_vrgd.partitioned import REPLICATED, Layer, OwnedSlice, PartitionedMoments, Reduction

SUPPORTED_DEEPSPEED = (Version("0.19.8"), Version("0.20"))
MONITOR_PREFIX = "Train/Samples/"

ATTRIBUTE, ASSIGNED = "attribute", "assigned"
DEEPSPEED_INTERNALS = (
    (DeepSpeedEngine, "_configure_basic_optimizer", ("self", "model_parameters")),  # replaced by register()
    (DeepSpeedEngine, "_is_supported_optimizer", ("self", "optimizer_name")),  # replaced by register()
    (DeepSpeedEngine, "_configure_optimizer", ("self", "client_optimizer", "model_parameters")),  # replaced
    (DeepSpeedEngine, "_take_model_step", ("self", "lr_kwargs")),  # wrapped by attach(): samples dropped after it
    # wrapped by attach(): universal checkpoints with the VR state (ds_vrgd.universal.restoring)
    (DeepSpeedEngine, "_load_zero_checkpoint", ("self", "load_dir", "tag", "load_optimizer_states")),
    (DeepSpeedEngine, "load_universal_checkpoint", ("self",)),
    # wrapped by attach(): one call is one micro-step, i.e. one sample per rank (the arguments are passed
    # through; DeepSpeed's nvtx decorator hides their names)
    (DeepSpeedEngine, "backward", ("args", "kwargs")),
    (DeepSpeedEngine, "optimizer_name optimizer_params zero_optimization zero_optimization_stage "
                      "zero_optimization_partition_gradients zero_reduce_bucket_size zero_offload_optimizer "
                      "zero_offload_param zero_cpu_offload zero_partial_offload super_offload zero_hpz_partition_size "
                      "zero_quantized_weights zero_quantized_gradients fp16_enabled bfloat16_enabled "
                      "train_micro_batch_size_per_gpu is_gradient_accumulation_boundary", ("self",)),
    (DeepSpeedEngine, "clip_fp32_gradients", ("self",)),  # wrapped by attach(): the rescale of ZeRO 0's gradient
    (DeepSpeedEngine, "communication_data_type", ATTRIBUTE),  # a property: the dtype the gradient is reduced in
    (DeepSpeedEngine, "optimizer basic_optimizer mpu pipeline_parallelism sequence_parallel_size _config "
                      "_step_applied global_samples monitor gradient_average", ASSIGNED),
    (PipelineEngine, "micro_batches", ASSIGNED),  # its last backward pass is the step's last micro-step
    (DeepSpeedConfig, "zero_config", ASSIGNED),
    (DeepSpeedZeroConfig, "zenflow", ATTRIBUTE),
    (PipelineModule, "tied_comms", ASSIGNED),
    (PipelineEngine, "_INSTRUCTION_MAP", ATTRIBUTE),  # its BackwardPass entry is wrapped like backward
    (schedule, "BackwardPass", ATTRIBUTE),
    (zero_utils, "ZERO_SUPPORTED_OPTIMIZERS", ATTRIBUTE),  # extended by register()
    (DeepSpeedZeroOptimizer, "round_robin_bit16_groups round_robin_bit16_offsets parallel_partitioned_bit16_groups "
                             "single_partition_of_fp32_groups real_dp_process_group", ASSIGNED),
    # wrapped by attach() (the rescale of the reduced gradient, where the mean comes from it)
    (DeepSpeedZeroOptimizer, "unscale_and_clip_grads", ("self", "grad_groups_flat", "total_norm")),
    (DeepSpeedZeroOptimizer_Stage3, "unscale_and_clip_grads", ("args", "kwargs")),  # (sub_group_id, total_norm)
    (BF16_Optimizer, "get_grads_for_norm", ("self", "for_clipping")),
    (BF16_Optimizer, "bf16_groups bf16_groups_flat fp32_groups_flat_partition real_dp_process_group grad_acc_dtype",
     ASSIGNED),
    (FP16_UnfusedOptimizer, "fp16_groups fp32_groups loss_scale_config custom_loss_scaler", ASSIGNED),
    # replaced by register(): a VR optimizer makes its state at its first step, not in a zero-gradient step
    (FP16_UnfusedOptimizer, "initialize_optimizer_states", ("self",)),
    (stage_1_and_2, "grad_accum", ASSIGNED),  # ZeRO 1 accumulates the gradient there
    (DeepSpeedZeroOptimizer_Stage3, "fp16_groups fp32_partitioned_groups_flat grad_position", ASSIGNED),
    (DeepSpeedZeroOptimizer_Stage3, "get_param_id", ("self", "param")),
    (DeepSpeedZeroOptimizer_Stage3, "_get_sub_group_process_group", ("self", "sub_group_id")),
    (partition_parameters, "ds_numel ds_shape", ASSIGNED),
)
"""The DeepSpeed internals ds_vrgd patches or reads, as (owner, space-separated names, kind); kind is
a method's parameter names, ATTRIBUTE (of the class or module itself) or ASSIGNED (set on instances at
run time; with a module as owner, set by that module on parameters). Checked by :func:`check_internals`;
a name imported above fails the import by itself."""


def _supported() -> str:
    low, high = SUPPORTED_DEEPSPEED
    return f"deepspeed>={low},<{high}"


def check_version(version: str = deepspeed.__version__) -> None:
    """Raise ImportError unless ``version`` (default: the installed DeepSpeed's) is in :data:`SUPPORTED_DEEPSPEED`."""
    low, high = SUPPORTED_DEEPSPEED
    if not low <= Version(Version(version).base_version) < high:
        raise ImportError(
            f"ds_vrgd supports {_supported()} (it patches engine internals); found {version}. "
            f"Install a supported version: pip install '{_supported()}'"
        )


def _source(owner: Any) -> str:
    """A module's source, or that of a class's methods as they are now (unwrapped: the functions
    :func:`register` installs count as the DeepSpeed ones they wrap)."""
    if inspect.ismodule(owner):
        return inspect.getsource(owner)
    return "\n".join(inspect.getsource(inspect.unwrap(f)) for f in vars(owner).values() if inspect.isfunction(f))


def _problem(owner: Any, name: str, kind: Any, source: str) -> Optional[str]:
    """What is wrong with one internal (``source``: the owner's, for ASSIGNED), or None."""
    if kind == ASSIGNED:  # `<object>.<name> = ...` or `<object>.<name>: T = ...`
        return None if re.search(rf"\.{re.escape(name)}\b\s*(?::[^=\n]*)?=(?!=)", source) else "never assigned"
    if kind == ATTRIBUTE:  # a pydantic config field is no class attribute
        return None if hasattr(owner, name) or name in getattr(owner, "model_fields", {}) else "missing"
    method = getattr(owner, name, None)
    if not callable(method):
        return "missing method"
    found = tuple(inspect.signature(method).parameters)
    return None if found == kind else f"parameters {found}, expected {kind}"


def check_internals(internals: tuple = DEEPSPEED_INTERNALS) -> None:
    """Raise ImportError naming every entry of ``internals`` (default :data:`DEEPSPEED_INTERNALS`; the same
    (owner, names, kind) rows) the installed DeepSpeed lacks.

    A method must exist with exactly the listed parameter names (``inspect.signature``, which sees
    through the ``functools.wraps`` of :func:`register`); an ATTRIBUTE must exist on its class or
    module. An ASSIGNED attribute has no value before DeepSpeed builds an object, so its check is
    textual: the class's methods (``__init__`` and the rest) or the module must assign it. That
    catches a rename or removal, not an assignment moved to a path that no longer runs.
    """
    problems = []
    for owner, names, kind in internals:
        source = _source(owner) if kind == ASSIGNED else ""
        problems += [f"{getattr(owner, '__qualname__', owner.__name__)}.{name}: {problem}"
                     for name in names.split() if (problem := _problem(owner, name, kind, source))]
    if problems:
        raise ImportError(
            f"ds_vrgd supports {_supported()}, but the installed deepspeed {deepspeed.__version__} lacks internals "
            f"it relies on: {'; '.join(problems)}"
        )


check_version()
check_internals()


# ------------------------------------------------------------ construction
def vr_optimizer_class(name: Any) -> Optional[type[VROptimizer]]:
    """The VR optimizer a ds_config ``optimizer.type`` names (any case, surrounding whitespace
    ignored), or None for anything else."""
    if not isinstance(name, str):
        return None
    return next((cls for vr_name, cls in VR_OPTIMIZERS.items() if vr_name.lower() == name.strip().lower()), None)


def unknown_optimizer_type(name: Any) -> ValueError:
    """The error for an optimizer type that is neither a VR type nor one DeepSpeed knows: it quotes
    the name, lists the VR and DeepSpeed types and suggests a close one."""
    vr_names = list(VR_OPTIMIZERS)
    known = {n.lower(): n for n in vr_names + DEEPSPEED_OPTIMIZERS}
    close = difflib.get_close_matches(str(name).strip().lower(), list(known), n=1)
    hint = f"; did you mean {known[close[0]]!r}?" if close else ""
    return ValueError(
        f"ds_config optimizer type {name!r} is not a VR optimizer ({', '.join(vr_names)}; any case), "
        f"a DeepSpeed optimizer ({', '.join(DEEPSPEED_OPTIMIZERS)}) or a torch.optim class name{hint}"
    )


def build_optimizer(name: str, model_parameters: Any, params: Optional[dict]) -> VROptimizer:
    """The VR optimizer ``name``d in a ds_config (see :func:`vr_optimizer_class`) over ``model_parameters``,
    from its ``params`` (validated by the optimizer; "auto" values other than lr take the defaults, with a
    warning). ValueError for an unknown name, ``"lr": "auto"`` or a misplaced key."""
    cls = vr_optimizer_class(name)
    if cls is None:
        raise unknown_optimizer_type(name)
    params = dict(params or {})
    if params.get("lr") == "auto":
        raise ValueError(
            f'ds_config optimizer {cls.__name__}: "lr" is "auto", which only Hugging Face Trainer/accelerate '
            "fill in; set a number when calling deepspeed.initialize directly"
        )
    auto = sorted(key for key, value in params.items() if value == "auto")
    if auto:
        # accelerate without Trainer fills lr and weight_decay only; the rest take the defaults
        logger.warning(f"ds_config optimizer {cls.__name__}: {auto} left as \"auto\"; using the defaults")
        params = {key: value for key, value in params.items() if value != "auto"}
    if "max_grad_norm" in params:
        raise ValueError(
            f'ds_config optimizer {cls.__name__}: "max_grad_norm" is not an optimizer option; '
            'use the top-level "gradient_clipping" key'
        )
    return cls(model_parameters, **params)


SUPPORTED_WRAPPERS = (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer, FP16_UnfusedOptimizer,
                      VROptimizer)
"""What DeepSpeed may wrap a VR optimizer in: ZeRO 1/2 and 3, BF16_Optimizer (bf16 with fp32 gradient
accumulation at ZeRO 1, bf16 pipelines at ZeRO 0), FP16_UnfusedOptimizer (fp16 and bf16 at ZeRO 0), or
nothing (fp32 at ZeRO 0)."""


def _reject_unsupported(engine: DeepSpeedEngine, optimizer: VROptimizer | type[VROptimizer]) -> None:
    """ValueError listing the engine settings a VR optimizer cannot run under (each with what is
    supported) and, once DeepSpeed built its optimizer, a wrapper not in :data:`SUPPORTED_WRAPPERS`.
    ``optimizer``: the VR optimizer, or its class when called before DeepSpeed built anything."""
    name = optimizer.__name__ if isinstance(optimizer, type) else type(optimizer).__name__
    problems = [problem for problem in _config_problems(engine) if problem]
    wrapper = engine.optimizer
    if not problems and wrapper is not None and not isinstance(wrapper, SUPPORTED_WRAPPERS):
        problems.append(f"DeepSpeed's optimizer wrapper {type(wrapper).__name__} (supported: ZeRO stages 0-3, "
                        "BF16_Optimizer, FP16_UnfusedOptimizer)")
    if problems:
        raise ValueError(f"{name} cannot run with this DeepSpeed config: " + "; ".join(problems))


def _config_problems(engine: DeepSpeedEngine) -> list[Optional[str]]:
    """One message per unsupported setting (None where the setting is fine)."""
    stage, zero = engine.zero_optimization_stage(), engine._config.zero_config

    def device(offload) -> str:
        return "none" if offload is None else getattr(offload.device, "value", offload.device)  # enum or str

    return [
        (device(engine.zero_offload_optimizer()) not in ("none", "cpu")
         and f"zero_optimization.offload_optimizer.device={device(engine.zero_offload_optimizer())} (supported: cpu)"),
        (device(engine.zero_offload_param()) not in ("none", "cpu")
         and f"zero_optimization.offload_param.device={device(engine.zero_offload_param())} (supported: cpu)"),
        (engine.zero_cpu_offload() and engine.zero_partial_offload() != 1.0
         and f"zero_optimization.offload_optimizer.ratio={engine.zero_partial_offload()} (supported: 1.0)"),
        engine.super_offload() and "zero_optimization.offload_optimizer.super_offload (unsupported)",
        zero.zenflow is not None and "zero_optimization.zenflow (unsupported)",
        (engine.zero_hpz_partition_size() > 1
         and f"zero_optimization.zero_hpz_partition_size={engine.zero_hpz_partition_size()} (ZeRO++ hpZ; supported: 1)"),
        (engine.zero_quantized_weights() or engine.zero_quantized_gradients())
        and "zero_optimization.zero_quantized_weights/zero_quantized_gradients (ZeRO++ qwZ/qgZ; unsupported)",
        (engine.pipeline_parallelism and getattr(engine.module, "tied_comms", None)
         and f"weights tied across pipeline stages ({', '.join(engine.module.tied_comms)}): a stage sees only its "
             "part of their gradient samples; untie them or use one stage"),
        (getattr(engine, "sequence_parallel_size", 1) > 1
         and "sequence parallelism (supported: data and Megatron-style tensor parallelism)"),
        (engine.mpu is not None and stage == 3
         and "ZeRO-3 with a model-parallel mpu (supported with tensor parallelism: stages 0-2)"),
        (engine.pipeline_parallelism and stage == 0 and engine.fp16_enabled() and not _scales_unfused_loss()
         and "fp16 pipeline parallelism at ZeRO 0: this DeepSpeed does not scale the loss there (PR 8393); "
             "use bf16, or ZeRO stage 1"),
    ]


# ----------------------------------------------------------------- layout
def _names(engine: DeepSpeedEngine) -> dict[int, str]:
    return {id(p): name for name, p in engine.module.named_parameters()}


def _flat_group_layers(params: list, offsets: list[int], partition_sizes: list[int], rank: int, owner: torch.Tensor,
                       names: dict[int, str], group: int) -> list[Layer]:
    """Layers of flat group ``group`` split into consecutive rank partitions (ZeRO 1/2, BF16_Optimizer): each
    parameter, at ``offsets`` in the flat group, in the slices of the partitions it overlaps; this rank's
    partition is ``owner`` (its fp32 copy)."""
    bounds, start = [], 0
    for size in partition_sizes:
        bounds.append((start, start + size))
        start += size
    layers = []
    for param, offset in zip(params, offsets):
        slices = []
        for r, (low, high) in enumerate(bounds):
            first, last = max(low, offset), min(high, offset + param.numel())
            if first < last:
                slices.append(OwnedSlice(r, first - offset, last - first, owner if r == rank else None, first - low))
        name = names.get(id(param), f"group{group}.param{len(layers)}")
        layers.append(Layer(name, param, tuple(slices), param.numel(), param.ndim))
    return layers


def _zero_layers(zero: DeepSpeedZeroOptimizer, names: dict[int, str]) -> list[Layer]:
    """Layers of a ZeRO 1/2 optimizer: each parameter's slices in each rank's flat partition."""
    layers = []
    for group, params in enumerate(zero.round_robin_bit16_groups):
        layers += _flat_group_layers(
            params, zero.round_robin_bit16_offsets[group],
            [partition.numel() for partition in zero.parallel_partitioned_bit16_groups[group]],
            dist.get_rank(group=zero.real_dp_process_group[group]), zero.single_partition_of_fp32_groups[group],
            names, group)
    return layers


def _bf16_layers(bf16: BF16_Optimizer, names: dict[int, str]) -> list[Layer]:
    """Layers of a BF16_Optimizer: its bf16 parameters lie in order in one flat tensor per group, cut into
    equal rank partitions; this rank's fp32 partition is the owner."""
    layers = []
    for group, params in enumerate(bf16.bf16_groups):
        world = dist.get_world_size(group=bf16.real_dp_process_group[group])
        offsets = [sum(p.numel() for p in params[:i]) for i in range(len(params))]
        layers += _flat_group_layers(
            params, offsets, [bf16.bf16_groups_flat[group].numel() // world] * world,
            dist.get_rank(group=bf16.real_dp_process_group[group]), bf16.fp32_groups_flat_partition[group],
            names, group)
    return layers


def _unfused_layers(wrapper: FP16_UnfusedOptimizer, names: dict[int, str]) -> list[Layer]:
    """Layers of an FP16_UnfusedOptimizer (fp16/bf16 at ZeRO 0): the hooks on each half-precision model
    parameter, its fp32 master copy (what the VR optimizer steps) the owner on every rank."""
    return [
        Layer(names.get(id(p), f"param_{i}"), p, (OwnedSlice(REPLICATED, 0, p.numel(), master, 0),), p.numel(), p.ndim)
        for i, (p, master) in enumerate(
            pair for lows, masters in zip(wrapper.fp16_groups, wrapper.fp32_groups) for pair in zip(lows, masters))
    ]


def _zero3_layers(zero: DeepSpeedZeroOptimizer_Stage3, names: dict[int, str]) -> list[Layer]:
    """Layers of a ZeRO-3 optimizer. A parameter lies in one fp32 sub-group; rank r holds elements
    [r * ps, (r + 1) * ps) of the flattened parameter (ps = ``partition_numel()``, the last rank's
    slice padded), at ``grad_position[param id][1]`` of its sub-group's flat fp32 partition."""
    layers = []
    for sub_group, params in enumerate(zero.fp16_groups):
        group = zero._get_sub_group_process_group(sub_group)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        owner = zero.fp32_partitioned_groups_flat[sub_group]
        for param in params:
            _, offset, size = zero.grad_position[zero.get_param_id(param)]
            slices = tuple(
                OwnedSlice(r, r * size, min(size, param.ds_numel - r * size), owner if r == rank else None, offset)
                for r in range(world) if r * size < param.ds_numel
            )
            name = names.get(id(param), f"subgroup{sub_group}.param{len(layers)}")
            layers.append(Layer(name, param, slices, param.ds_numel, len(param.ds_shape)))
    return layers


def _whole_layer(layer: Layer, tensor_parallel_size: int) -> Layer:
    """A layer as a whole: a tensor-parallel shard is one of ``tensor_parallel_size`` equal shards."""
    if not _is_sharded(layer.param):
        return layer
    return dataclasses.replace(layer, numel=layer.numel * tensor_parallel_size, sharded=True)


def _replicated_layers(optimizer: VROptimizer, names: dict[int, str]) -> list[Layer]:
    """Layers without ZeRO: every rank owns every parameter whole."""
    return [
        Layer(names.get(id(p), f"param_{i}"), p, (OwnedSlice(REPLICATED, 0, p.numel(), p, 0),), p.numel(), p.ndim)
        for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
    ]


def _own_group(group=None):
    """A process group of our own over the ranks of ``group`` (None: all ranks), so that our collectives never
    interleave with the engine's on one communicator. Collective: every rank calls it, each with its group."""
    if group is None:
        return dist.new_group(ranks=list(range(dist.get_world_size())))
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, dist.get_process_group_ranks(group))
    mine, _ = dist.new_subgroups_by_enumeration(sorted({tuple(ranks) for ranks in every}))
    return mine


def _parallel_groups(engine: DeepSpeedEngine) -> tuple:
    """(data-parallel group, tensor-parallel group or None) of our own: the samples come from the
    data-parallel ranks; the tensor-parallel ranks of one replica see the same data. The tensor group is a
    Megatron mpu's, or the "slice" group of DeepSpeed's pipeline grid (whose model-parallel group spans
    the pipeline stages too, which hold other layers)."""
    mpu = engine.mpu
    if mpu is None:
        return _own_group(), None
    tensor_group = next(getattr(mpu, name) for name in TENSOR_GROUP_GETTERS if hasattr(mpu, name))()
    return _own_group(mpu.get_data_parallel_group()), _own_group(tensor_group)


TENSOR_GROUP_GETTERS = ("get_tensor_model_parallel_group", "get_slice_parallel_group", "get_model_parallel_group")
"""Where an ``mpu`` keeps its tensor-parallel group, first match: Megatron's name, DeepSpeed's pipeline grid's,
Megatron's older name."""


def _is_sharded(param: torch.Tensor) -> bool:
    """Megatron's mark of a tensor-parallel shard (DeepSpeed's gradient-norm code reads it too)."""
    return bool(getattr(param, "tensor_model_parallel", False))


# ------------------------------------------------------------ attachment
def _local_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """This rank's gradient of ``param`` accumulated so far in the step under ZeRO 0/1: p.grad, and
    ``grad_accum`` where ZeRO 1 moves it to accumulate in another dtype."""
    accumulated = getattr(param, "grad_accum", None)
    if accumulated is None:
        return param.grad
    return accumulated if param.grad is None else accumulated + param.grad


def _scales_unfused_loss() -> bool:
    """Whether DeepSpeed's ``engine.backward`` scales the loss for FP16_UnfusedOptimizer (fp16 at ZeRO 0):
    0.19.8 does not (it scales only for ZeRO optimizers, yet the wrapper's step divides every gradient by
    the loss scale: DeepSpeed PR 8393); a version that does routes the loss through ``optimizer.backward``."""
    return "self.optimizer.backward(" in inspect.getsource(inspect.unwrap(DeepSpeedEngine.backward))


def _loss_scaled(wrapper: FP16_UnfusedOptimizer, backward: Callable) -> Callable:
    """``engine.backward`` with the loss multiplied by the wrapper's current loss scale, as its step expects
    (its unscaling then gives the true gradient, and an overflow of the scaled one is skipped); returns the
    loss as DeepSpeed does (divided by the accumulation steps, unscaled)."""

    @functools.wraps(backward)
    def scaled_backward(loss, *args, **kwargs):
        scale = wrapper.loss_scale_config.cur_scale
        return backward(loss * scale, *args, **kwargs) / scale

    return scaled_backward


def _one_micro_step(source: PartitionedMoments, backward: Callable) -> Callable:
    """Wrap ``engine.backward`` (or a pipeline engine's backward-pass instruction): each call is one
    micro-step of the source, whatever autograd runs inside."""

    @functools.wraps(backward)
    def backward_micro_step(*args, **kwargs):
        source.begin_micro_step()
        result = backward(*args, **kwargs)
        source.end_micro_step()
        return result

    return backward_micro_step


def _unscaled_fp16(engine: DeepSpeedEngine) -> bool:
    """fp16 at ZeRO 0 (FP16_UnfusedOptimizer with a loss scale) in a DeepSpeed whose backward does not scale the
    loss (:func:`_scales_unfused_loss`): ds_vrgd scales it."""
    wrapper = engine.optimizer
    return (isinstance(wrapper, FP16_UnfusedOptimizer) and wrapper.loss_scale_config.use_grad_scaling
            and not wrapper.custom_loss_scaler and not _scales_unfused_loss())


def _layers(engine: DeepSpeedEngine, optimizer: VROptimizer, names: dict[int, str]) -> list[Layer]:
    """The layers as the engine's optimizer wrapper partitions them (:data:`SUPPORTED_WRAPPERS`)."""
    wrapper = engine.optimizer
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        return _zero3_layers(wrapper, names)
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        return _zero_layers(wrapper, names)
    if isinstance(wrapper, BF16_Optimizer):
        return _bf16_layers(wrapper, names)
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        return _unfused_layers(wrapper, names)
    return _replicated_layers(optimizer, names)


VRGD_SETTINGS = {"local_sums": ("auto", True, False)}
"""The keys of the ds_config's optional top-level ``"vrgd"`` section and their values (docs/deepspeed.md,
"How the second moment travels")."""


def _settings(engine: DeepSpeedEngine) -> dict:
    """The ds_config's ``"vrgd"`` section over its defaults; ValueError naming a bad key or value."""
    given = engine._config._param_dict.get("vrgd") or {}
    if not isinstance(given, dict):
        raise ValueError(f'ds_config "vrgd" must be an object like {{"local_sums": "auto"}}, got {given!r}')
    for key, value in given.items():
        if key not in VRGD_SETTINGS:
            raise ValueError(f'ds_config "vrgd" has no key {key!r}; valid keys: {", ".join(VRGD_SETTINGS)}')
        if not any(type(value) is type(choice) and value == choice for choice in VRGD_SETTINGS[key]):
            raise ValueError(f'ds_config "vrgd.{key}" is {json.dumps(value)}; expected one of '
                             f'{", ".join(map(json.dumps, VRGD_SETTINGS[key]))}')
    return {key: given.get(key, choices[0]) for key, choices in VRGD_SETTINGS.items()}


def _mean_from_gradient(engine: DeepSpeedEngine) -> bool:
    """Whether the gradient the VR optimizer steps is an fp32 sum of the samples averaged over the ranks, so
    that only g^2 travels: fp32 training (or BF16_Optimizer with fp32 accumulation) whose gradient is also
    reduced in fp32 (docs/design.md §3, "Where the mean comes from")."""
    if not engine.gradient_average or engine.communication_data_type != torch.float32 or engine.fp16_enabled():
        return False
    if isinstance(engine.optimizer, BF16_Optimizer):
        return engine.optimizer.grad_acc_dtype == torch.float32
    return not engine.bfloat16_enabled()


class _RescaleProbe:
    """The factor by which the engine rescaled the reduced gradient before the optimizer step (clipping,
    unscaling), read off one element: its value when :meth:`watch` is called just before the rescale,
    against its value at the step. A product by a factor rounds once, so the ratio is the factor to
    within 2 units of fp32 rounding (docs/design.md §3)."""

    SAMPLE = 4096

    def __init__(self) -> None:
        self._element: Optional[tuple[torch.Tensor, int, float]] = None

    def watch(self, tensors) -> None:
        """Remember a nonzero element of the first of ``tensors`` (nested lists allowed) that has one."""
        self._element = None
        for tensor in _flat_list(tensors):
            if tensor is None or not tensor.is_contiguous() or tensor.numel() == 0:
                continue
            flat = tensor.view(-1)
            stride = max(1, flat.numel() // self.SAMPLE)
            index = int(flat[::stride].abs().argmax()) * stride
            value = float(flat[index])
            if value != 0.0:
                self._element = (flat, index, value)
                return

    def factor(self) -> float:
        """The rescale applied since :meth:`watch` (1.0 if nothing was watched this step)."""
        if self._element is None:
            return 1.0
        flat, index, value = self._element
        return float(flat[index]) / value

    def reset(self) -> None:
        self._element = None


def _flat_list(tensors) -> list:
    if isinstance(tensors, (list, tuple)):
        return [t for item in tensors for t in _flat_list(item)]
    return [tensors]


def _watch_rescale(engine: DeepSpeedEngine, probe: _RescaleProbe) -> None:
    """Have ``probe`` watch the gradient just before the engine's optimizer wrapper (or, at ZeRO 0, the
    engine) rescales it: clipping and loss-scale unscaling are the only changes between the reduction
    and the optimizer step."""
    wrapper = engine.optimizer
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        _before(wrapper, "unscale_and_clip_grads",
                lambda sub_group, *_: probe.watch([wrapper.fp32_partitioned_groups_flat[sub_group].grad]))
    elif isinstance(wrapper, DeepSpeedZeroOptimizer):
        _before(wrapper, "unscale_and_clip_grads", lambda grads, *_: probe.watch(grads))
    elif isinstance(wrapper, BF16_Optimizer):
        get_grads_for_norm = wrapper.get_grads_for_norm

        @functools.wraps(get_grads_for_norm)
        def grads_for_norm_watched(for_clipping=False):
            grads = get_grads_for_norm(for_clipping=for_clipping)
            if for_clipping:  # the tensors clip_tensors_by_global_norm rescales next
                probe.watch(grads)
            return grads

        wrapper.get_grads_for_norm = grads_for_norm_watched
    elif isinstance(wrapper, VROptimizer):
        _before(engine, "clip_fp32_gradients",
                lambda: probe.watch([p.grad for p in engine.module.parameters() if p.grad is not None]))


def _before(owner: Any, name: str, call: Callable) -> None:
    """Make ``owner.name(...)`` call ``call(...)`` with the same arguments first (an instance attribute)."""
    method = getattr(owner, name)

    @functools.wraps(method)
    def watched(*args, **kwargs):
        call(*args, **kwargs)
        return method(*args, **kwargs)

    setattr(owner, name, watched)


def _transport(engine: DeepSpeedEngine, local_sums: Any, layers: list[Layer]) -> tuple[bool, bool]:
    """(local sums, raw samples) for the ds_config's ``vrgd.local_sums`` (docs/deepspeed.md, "How the second
    moment travels"). "auto": at ZeRO 0 local sums (in Σg² itself); at ZeRO 2/3 raw samples every micro-step
    (no buffer of the model's size); where the engine keeps each rank's gradient but partitions the optimizer
    (ZeRO 1, BF16_Optimizer) whichever sends fewer bytes per step: GA raw samples, or the fp32 sums once
    (ties: the raw samples, which overlap every backward pass, not only the last, and need no fp32 buffers of
    the model's size). False: every micro-step (raw where partitioned); True: sums."""
    partitioned = any(s.rank != REPLICATED for layer in layers for s in layer.slices)
    if local_sums != "auto":
        return local_sums, partitioned and not local_sums
    if not partitioned:
        return True, False
    if engine.zero_optimization_partition_gradients():
        return False, True
    raw_bytes = engine.gradient_accumulation_steps() * _sample_dtype(layers).itemsize
    sums_bytes = 4 * (1 if _mean_from_gradient(engine) else 2)
    return raw_bytes > sums_bytes, raw_bytes <= sums_bytes


def _sample_dtype(layers: list[Layer]) -> torch.dtype:
    """The dtype the samples travel in raw: the parameters' (their gradients'), fp32 if they differ."""
    dtypes = {layer.param.dtype for layer in layers}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _last_micro_step(engine: DeepSpeedEngine) -> Callable[[int], bool]:
    """Whether the k-th micro-step of a step is its last: a pipeline's last backward pass of
    ``train_batch``, else the engine's accumulation boundary (False throughout the backward passes of
    ``managed_gradient_accumulation: false``: the sums then travel before the step)."""
    if isinstance(engine, PipelineEngine):
        return lambda k: k >= engine.micro_batches
    return lambda k: engine.is_gradient_accumulation_boundary()


def attach(engine: DeepSpeedEngine) -> None:
    """Connect ``engine.basic_optimizer`` (a VR optimizer) to the engine's partitions.

    Installs a :class:`~ds_vrgd.partitioned.PartitionedMoments` source and layout (what travels and
    when: docs/deepspeed.md, "How the second moment travels"), makes each ``engine.backward`` call one
    micro-step, completes the reductions before every model step and drops the samples and writes the
    monitor after it, loads universal checkpoints with the VR state (:func:`ds_vrgd.universal.restoring`),
    and sets ``engine.vr_optimizer``. ValueError for a setting it cannot run under.
    """
    optimizer: VROptimizer = engine.basic_optimizer
    _reject_unsupported(engine, optimizer)
    settings = _settings(engine)
    names = _names(engine)
    layers = _layers(engine, optimizer, names)
    bucket = int(engine.zero_reduce_bucket_size()) if engine.zero_optimization() else int(5e8)
    capture = any(group["vr"] for group in optimizer.param_groups)
    partitions_gradients = engine.zero_optimization_partition_gradients()
    local_grad = None if partitions_gradients or isinstance(engine.optimizer, BF16_Optimizer) else _local_grad
    device = torch.device(get_accelerator().current_device_name())
    data_group, tensor_group = _parallel_groups(engine)
    if tensor_group is not None:
        layers = [_whole_layer(layer, dist.get_world_size(tensor_group)) for layer in layers]
    probe = _RescaleProbe()
    local_sums, raw = _transport(engine, settings["local_sums"], layers)
    sample_sums = raw or not _mean_from_gradient(engine)
    if not sample_sums:
        _watch_rescale(engine, probe)
    reduction = Reduction(sample_sums=sample_sums, local_sums=local_sums, last_micro_step=_last_micro_step(engine),
                          grad_rescale=probe.factor, raw_samples=_sample_dtype(layers) if raw else None)
    source = PartitionedMoments(layers, data_group, bucket, device, capture, local_grad=local_grad,
                                tensor_parallel_group=tensor_group, reduction=reduction, due=optimizer.samples_due)
    optimizer.use_moments(source, layout=source)
    if isinstance(engine, PipelineEngine):  # train_batch() runs one BackwardPass instruction per micro-batch
        backward_pass = type(engine)._INSTRUCTION_MAP[schedule.BackwardPass]
        engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP,
                                   schedule.BackwardPass: _one_micro_step(source, backward_pass)}
    else:
        backward = engine.backward
        if _unscaled_fp16(engine):
            backward = _loss_scaled(engine.optimizer, backward)
        engine.backward = _one_micro_step(source, backward)
    optimizer.micro_batch_size = engine.train_micro_batch_size_per_gpu()

    take_model_step = engine._take_model_step

    @functools.wraps(take_model_step)
    def take_model_step_then_reset(*args, **kwargs):
        try:
            source.flush()
            return take_model_step(*args, **kwargs)
        finally:
            _monitor(engine, optimizer)
            source.reset()
            probe.reset()

    engine._take_model_step = take_model_step_then_reset
    load_zero_checkpoint = engine._load_zero_checkpoint

    @functools.wraps(load_zero_checkpoint)
    def load_zero_checkpoint_with_vr_state(load_dir, tag, load_optimizer_states=True):
        if not engine.load_universal_checkpoint():
            return load_zero_checkpoint(load_dir, tag, load_optimizer_states=load_optimizer_states)
        from ds_vrgd.universal import restoring  # here: it imports this module and DeepSpeed's converter

        with restoring(engine, os.path.join(load_dir, tag), load_optimizer_states):
            return load_zero_checkpoint(load_dir, tag, load_optimizer_states=load_optimizer_states)

    engine._load_zero_checkpoint = load_zero_checkpoint_with_vr_state
    engine.vr_optimizer = optimizer


def _monitor(engine: DeepSpeedEngine, optimizer: VROptimizer) -> None:
    """Write the last step's GSNR statistics to DeepSpeed's monitor (TensorBoard/CSV/W&B)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled or not engine._step_applied:
        return
    stats = optimizer.gsnr_stats()
    if stats.get("n", 0) < 2 or stats.get("step") != _optimizer_step(optimizer):
        return
    events = [(MONITOR_PREFIX + name, float(stats[key] or 0.0), engine.global_samples)
              for name, key in LOG_FIELDS.items()]
    monitor.write_events(events)


def _optimizer_step(optimizer: VROptimizer) -> int:
    steps = [int(s["step"].item()) for s in optimizer.state.values() if "step" in s]
    return max(steps, default=0)


# ----------------------------------------------------------- registration
@functools.lru_cache(maxsize=None)
def register() -> None:
    """Teach DeepSpeed the VR optimizer names (idempotent).

    DeepSpeed's config keeps ``optimizer.type`` as written (it lower-cases only its own names), and
    its one check of the name, in ``_do_sanity_check``, asserts ``_is_supported_optimizer``: so the
    patched predicate accepts VR names in any case with surrounding whitespace and raises
    :func:`unknown_optimizer_type` for a name nobody knows, and the patched builder normalises the
    same way. Before DeepSpeed wraps a VR optimizer (ZeRO, fp16/bf16), the config is checked for
    settings it cannot run under (:func:`_reject_unsupported`).
    """
    configure_basic = DeepSpeedEngine._configure_basic_optimizer
    is_supported = DeepSpeedEngine._is_supported_optimizer
    configure = DeepSpeedEngine._configure_optimizer

    @functools.wraps(configure_basic)
    def configure_basic_optimizer(self, model_parameters):
        name = self.optimizer_name()
        if vr_optimizer_class(name) is not None:
            return build_optimizer(name, model_parameters, self.optimizer_params())
        return configure_basic(self, model_parameters)

    @functools.wraps(is_supported)
    def is_supported_optimizer(self, optimizer_name):
        if vr_optimizer_class(optimizer_name) is not None or is_supported(self, optimizer_name):
            return True
        raise unknown_optimizer_type(optimizer_name)

    @functools.wraps(configure)
    def configure_optimizer(self, client_optimizer, model_parameters):
        if client_optimizer is None:
            planned = vr_optimizer_class(self.optimizer_name())
        else:
            planned = type(client_optimizer) if isinstance(client_optimizer, VROptimizer) else None
        if planned is not None:
            _reject_unsupported(self, planned)
        configure(self, client_optimizer, model_parameters)
        if isinstance(self.basic_optimizer, VROptimizer):
            attach(self)

    initialize_states = FP16_UnfusedOptimizer.initialize_optimizer_states

    @functools.wraps(initialize_states)
    def initialize_optimizer_states(self):
        # DeepSpeed takes a zero-gradient step to make the state; for a VR optimizer that would count a
        # step (and decay the fp32 master weights once), so it is left to the first real step
        if not isinstance(self.optimizer, VROptimizer):
            initialize_states(self)

    DeepSpeedEngine._configure_basic_optimizer = configure_basic_optimizer
    DeepSpeedEngine._is_supported_optimizer = is_supported_optimizer
    DeepSpeedEngine._configure_optimizer = configure_optimizer
    FP16_UnfusedOptimizer.initialize_optimizer_states = initialize_optimizer_states
    zero_utils.ZERO_SUPPORTED_OPTIMIZERS.extend(VR_OPTIMIZERS.values())


CPU_ALLREDUCE_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""The shared-memory segment DeepSpeed's CPU communication op (csrc/cpu/comm/shm.cpp) creates per rank when all
ranks are on one machine: mapped by every rank at initialisation, never unlinked (66 MiB of /dev/shm per rank
per run, kept until reboot)."""


def shutdown() -> None:
    """End the distributed run on this rank, after its last collective.

    Destroys the process group if one is up (a clean gloo teardown: docs/deepspeed.md, "Ending a training
    script") and unlinks this rank's CPU all-reduce buffer (:data:`CPU_ALLREDUCE_BUFFER`; rank from the group,
    else ``RANK``). Every rank mapped every buffer at initialisation, so removing the names frees the memory
    once the processes exit. Where DeepSpeed made no such buffer (accelerators, ranks on several machines,
    launchers that do not set ``LOCAL_SIZE``) there is nothing to unlink.
    """
    if deepspeed.comm.is_initialized():  # DeepSpeed's destroy also drops its references to the groups
        rank = deepspeed.comm.get_rank()
        deepspeed.comm.destroy_process_group()
    elif dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
    else:
        rank = int(os.environ.get("RANK", "0"))
    if hasattr(os, "getuid"):
        buffer = CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                             port=os.environ.get("MASTER_PORT", ""), rank=rank)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(buffer)


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` (same arguments and return value) with the VR types registered."""
    register()
    return deepspeed.initialize(*args, **kwargs)


register()  # importing the adapter is asking for it (see ds_vrgd's docstring)
