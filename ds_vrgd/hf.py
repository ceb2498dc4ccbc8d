"""Hugging Face Trainer helpers: GSNR samples across ranks and GSNR logs; none of the math.

``ds_vrgd.hf.add_gsnr(trainer)``, after building the Trainer, checks the optimizer choice
(:func:`check_optimizer_choice`) and puts :class:`GsnrCallback` first among its callbacks: at
train begin it installs the comm hook of :func:`ds_vrgd.ddp.enable_gsnr` where Trainer wrapped
the model in torch DDP, and it adds the GSNR statistics to every training log. Choosing the VR
optimizer, the logs and the errors: docs/huggingface.md.
"""

from __future__ import annotations

from typing import Optional

from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback

from ds_vrgd.ddp import enable_gsnr
from ds_vrgd.gsnr import LOG_FIELDS
from ds_vrgd.optim import VR_OPTIMIZERS, VROptimizer


PREFIX = "ds_vrgd.hf.add_gsnr: "
HOW_TO_CHOOSE = (
    'name a VR type in the DeepSpeed config ("optimizer": {"type": "VRLAMB", "params": {...}}, after import ds_vrgd) '
    "or, without DeepSpeed, pass Trainer(optimizer_cls_and_kwargs=(VRLAMB, {...}))"
)


def find_vr_optimizer(optimizer=None, model=None) -> Optional[VROptimizer]:
    """The ds_vrgd optimizer behind a Trainer's optimizer or wrapped model, or None.

    Looks at a DeepSpeed engine's ``vr_optimizer``, then follows ``.optimizer``
    through wrappers (accelerate's AcceleratedOptimizer and others).
    """
    if isinstance(getattr(model, "vr_optimizer", None), VROptimizer):
        return model.vr_optimizer
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, VROptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def gsnr_logs(optimizer: VROptimizer, micro_batch_size: Optional[int]) -> dict[str, float]:
    """The last step's GSNR statistics under :data:`ds_vrgd.gsnr.LOG_FIELDS` ({} before a step with n >= 2).

    ``micro_batch_size``: examples per sample, for ``b_simple`` (None: the optimizer's own, else no ``b_simple``).
    """
    stats = optimizer.gsnr_stats(micro_batch_size)
    if stats["n"] < 2:
        return {}
    return {key: float(stats[name]) for key, name in LOG_FIELDS.items() if stats[name] is not None}


def _given_to_trainer(trainer: Trainer) -> Optional[tuple[str, type]]:
    """The optimizer the user gave Trainer itself: (how, class), or None (Trainer builds args.optim)."""
    if trainer.optimizer is not None:
        cls = type(trainer.optimizer)
        return f"optimizers=({cls.__name__}(...), ...)", cls
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)  # absent in older transformers
    if cls_and_kwargs is not None:
        cls = cls_and_kwargs[0]
        return f"optimizer_cls_and_kwargs=({getattr(cls, '__name__', cls)}, ...)", cls
    return None


def _deepspeed_optimizer(trainer: Trainer) -> Optional[str]:
    """The optimizer type the DeepSpeed config names (None: no DeepSpeed, or no optimizer section)."""
    if not trainer.is_deepspeed_enabled:
        return None
    return trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("optimizer", {}).get("type")


def _optim_name(trainer: Trainer) -> str:
    """TrainingArguments.optim as the user writes it (``adamw_torch_fused``)."""
    return getattr(trainer.args.optim, "value", trainer.args.optim)


def _is_vr(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, VROptimizer)


def check_optimizer_choice(trainer: Trainer) -> None:
    """Raise ValueError, naming the fix, unless ``trainer`` will train with a VR optimizer.

    Under DeepSpeed, Trainer builds the optimizer the ds_config names and
    silently drops one given to Trainer; without an optimizer section it drops
    ``optimizers=`` too and uses ``optimizer_cls_and_kwargs`` or its default.
    """
    given = _given_to_trainer(trainer)
    named = _deepspeed_optimizer(trainer)
    if named is not None and given is not None:
        raise ValueError(
            f"{PREFIX}Trainer got {given[0]} and the DeepSpeed config also names optimizer {named!r}; Trainer "
            f"would silently train with {named!r}. Use one: drop the Trainer argument and name the VR type in the "
            'ds_config ("optimizer": {"type": "VRLAMB", ...}), or remove the ds_config\'s "optimizer" section and '
            "pass optimizer_cls_and_kwargs=(VRLAMB, {...})"
        )
    if named is not None:
        from ds_vrgd.deepspeed import vr_optimizer_class

        if vr_optimizer_class(named) is None:
            raise ValueError(f"{PREFIX}the DeepSpeed config names optimizer {named!r}, not a VR type "
                             f"({', '.join(VR_OPTIMIZERS)}); {HOW_TO_CHOOSE}")
        return
    if trainer.is_deepspeed_enabled and trainer.optimizer is not None:
        raise ValueError(
            f"{PREFIX}Trainer got {given[0]} under DeepSpeed, which drops it and builds its default optimizer "
            f"(optim={_optim_name(trainer)}); name the VR type in the ds_config "
            '("optimizer": {"type": "VRLAMB", ...}) or pass optimizer_cls_and_kwargs=(VRLAMB, {...})'
        )
    if given is None:
        raise ValueError(f"{PREFIX}Trainer would build its default optimizer (optim={_optim_name(trainer)}), "
                         f"not a VR one; {HOW_TO_CHOOSE}")
    if not _is_vr(given[1]):
        raise ValueError(f"{PREFIX}Trainer got {given[0]}, not a ds_vrgd VR optimizer; {HOW_TO_CHOOSE}")


class GsnrCallback(TrainerCallback):
    """Sets up the GSNR samples at train begin and adds the statistics to every training log.

    ``trainer``: the Trainer it serves. Must come before the reporting callbacks (:func:`add_gsnr`
    puts it first).
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.optimizer: Optional[VROptimizer] = None
        self._hooked: Optional[DistributedDataParallel] = None

    def on_train_begin(self, args, state, control, **kwargs):
        """Find the VR optimizer; on torch DDP install the comm hook that reduces the squared samples.

        ValueError if Trainer built a non-VR optimizer, or several processes run on neither DDP nor DeepSpeed.
        """
        wrapped = self.trainer.model_wrapped
        self.optimizer = find_vr_optimizer(self.trainer.optimizer, wrapped)
        if self.optimizer is None:
            raise ValueError(f"{PREFIX}Trainer built {type(self.trainer.optimizer).__name__}, "
                             f"not a VR optimizer; {HOW_TO_CHOOSE}")
        ddp = getattr(wrapped, "_orig_mod", wrapped)  # under torch.compile, the module it compiled
        if isinstance(ddp, DistributedDataParallel):
            if ddp is not self._hooked:  # a second train() reuses the hooked module
                enable_gsnr(ddp, self.optimizer)
                self._hooked = ddp
        elif args.world_size > 1 and not self.trainer.is_deepspeed_enabled:
            raise ValueError(
                f"{PREFIX}{args.world_size} processes but the model is wrapped in "
                f"{type(wrapped).__name__}; GSNR samples across ranks need torch DDP or DeepSpeed ZeRO 0-3"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the last step's GSNR statistics to a training log and to the entry Trainer just recorded."""
        if self.optimizer is None or logs is None or "loss" not in logs:
            return
        stats = gsnr_logs(self.optimizer, args.per_device_train_batch_size)
        logs.update(stats)
        state.log_history[-1].update(stats)  # Trainer.log appends a copy of logs right before on_log


def add_gsnr(trainer: Trainer) -> GsnrCallback:
    """Check the optimizer choice, give ``trainer`` GSNR samples across ranks and GSNR logs.

    Returns the :class:`GsnrCallback` (the one already added, on a second call). ValueError naming the fix
    when ``trainer`` would not train with a VR optimizer (docs/huggingface.md, "Errors").
    """
    check_optimizer_choice(trainer)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, GsnrCallback):
            return callback
    callback = GsnrCallback(trainer)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
