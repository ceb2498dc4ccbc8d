"""What a pretraining run will do, decided and checked before DeepSpeed starts: :func:`plan_run` turns the
command line, the ds_config (optimizer, batch sizes, the ``"ds_vrgd"`` recipe section) and the data's meta.json
into a :class:`Plan`, or raises ValueError/FileNotFoundError naming the fix (docs/pretraining.md, "2. Training").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_vrgd.optim import VR_OPTIMIZERS
from ds_vrgd.pretrain import report
from ds_vrgd.pretrain.data import read_meta
from ds_vrgd.pretrain.models import PRESETS, bert_config

RECIPE_KEY = "ds_vrgd"
RECIPE_FIELDS = {"description", "phase", "model", "steps", "warmup_proportion", "decay_power", "max_seq_len",
                 "max_predictions", "reference_world_size"}
DEFAULT_WARMUP, DEFAULT_POWER = 0.2843, 0.5  # NVIDIA's phase-1 LAMB recipe
NEEDED_MODULES = ("deepspeed", "transformers", "datasets", "tqdm", "matplotlib")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
CHECKPOINTS, RUN = "checkpoints", "run.json"


@dataclass(frozen=True)
class Plan:
    """A validated run: everything decided before DeepSpeed starts."""

    data: str
    output: str
    config_path: str
    config: dict  # passed to deepspeed.initialize
    meta: dict  # the data's meta.json
    model: str
    optimizer: str
    peak_lr: float
    world_size: int
    global_batch: int
    micro_batch: int
    gas: int
    steps: int
    warmup_proportion: float
    decay_power: float
    init_from: str | None
    resume: bool
    overwrite: bool
    seed: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int

    @property
    def seq_len(self) -> int:
        """Tokens per sequence of the data."""
        return self.meta["max_seq_len"]


def load_ds_config(path: str | Path) -> dict:
    """The ds_config at ``path``; FileNotFoundError/ValueError naming the fix if missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"DeepSpeed config {str(path)!r} does not exist; pass --deepspeed_config with a file from ds_configs/, "
            "e.g. ds_configs/cpu_demo_zero2_vrlamb.json"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {str(path)!r} is not valid JSON ({err}); fix the syntax there") from None
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config {str(path)!r} must be a JSON object {{...}}, not {type(config).__name__}")
    return config


def check_optimizer(config: dict, path: str) -> tuple[str, float]:
    """(name, peak lr) of the config's optimizer: a VR type's class name, or another type as written.

    Raises ValueError listing the valid types for an unknown one, naming a bad
    VR option (built once on a dummy parameter), for a missing lr and for a
    "scheduler" block (the trainer sets the schedule).
    """
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    from ds_vrgd.deepspeed import build_optimizer, vr_optimizer_class

    block = config.get("optimizer")
    name = block.get("type") if isinstance(block, dict) else None
    known = isinstance(name, str) and (
        vr_optimizer_class(name) is not None or name.lower() in DEEPSPEED_OPTIMIZERS or hasattr(torch.optim, name)
    )
    if not known:
        vr_types = ", ".join(VR_OPTIMIZERS)
        raise ValueError(
            f'{path}: unknown optimizer type {name!r}; set "optimizer": {{"type": ...}} to one of {vr_types} '
            f"(GSNR statistics; \"params\": {{\"vr\": false}} gives the plain base, e.g. LAMB from VRLAMB), "
            f"a DeepSpeed type ({', '.join(DEEPSPEED_OPTIMIZERS)}) or a torch.optim class name"
        )
    lr = block.get("params", {}).get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"{path}: optimizer.params.lr is {lr!r}; set it to the schedule's peak learning rate (> 0)")
    if "scheduler" in config:
        raise ValueError(
            f'{path}: has a "scheduler" block, but the trainer sets the schedule (warmup + polynomial decay: '
            f'--warmup-proportion/--decay-power or the "{RECIPE_KEY}" section); remove "scheduler"'
        )
    if vr_optimizer_class(name) is None:
        return name, float(lr)
    try:
        optimizer = build_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], block.get("params"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    return type(optimizer).__name__, float(lr)


def batch_sizes(config: dict, world_size: int, path: str) -> tuple[int, int, int]:
    """(train_batch_size, micro-batch per rank, accumulation steps) from any two of the config's three.

    Raises ValueError naming the numbers when they do not divide or disagree.
    """
    given = {key: config.get(key) for key in BATCH_KEYS}
    for key, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f'{path}: {key} is {value!r}; use a positive integer ("auto" is for HF Trainer only)')
    train, micro, gas = given.values()
    if micro is None and train is None:
        raise ValueError(f"{path}: set train_batch_size and/or train_micro_batch_size_per_gpu")
    if micro is None:
        gas = gas or 1
        micro = _divide(train, gas * world_size, f"gradient_accumulation_steps {gas} x world size {world_size}", path)
    elif gas is None:
        gas = 1 if train is None else _divide(
            train, micro * world_size, f"train_micro_batch_size_per_gpu {micro} x world size {world_size}", path
        )
    train = micro * gas * world_size if train is None else train
    if train != micro * gas * world_size:
        raise ValueError(
            f"{path}: train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
            f"{gas} x world size {world_size} = {micro * gas * world_size}; remove gradient_accumulation_steps to "
            "let it follow, or fix one of the three"
        )
    return train, micro, gas


def _divide(total: int, by: int, what: str, path: str) -> int:
    """total // by, or ValueError if ``by`` does not divide ``total`` (``what`` names the divisor)."""
    if total % by:
        raise ValueError(
            f"{path}: train_batch_size {total} is not divisible by {what} = {by}; choose a train_batch_size that is "
            f"a multiple of {by}, or change the micro-batch or the number of ranks"
        )
    return total // by


def check_recipe(config: dict, meta: dict, path: str, data: str) -> dict:
    """The config's ``"ds_vrgd"`` section, checked against the data's sequence length and prediction cap."""
    recipe = config.get(RECIPE_KEY, {})
    unknown = sorted(set(recipe) - RECIPE_FIELDS)
    if unknown:
        raise ValueError(f'{path}: unknown keys {unknown} in "{RECIPE_KEY}"; valid keys: {sorted(RECIPE_FIELDS)}')
    for key, have, flag in (("max_seq_len", meta["max_seq_len"], "--max-seq-len"),
                            ("max_predictions", meta["masking_spec"]["max_predictions"], "--max-predictions")):
        want = recipe.get(key)
        if want is not None and want != have:
            raise ValueError(
                f"{path} is a recipe with {key} {want} but {data} has {key} {have}; use the config of that phase, "
                f"or prepare the data with {flag} {want}"
            )
    return recipe


def check_output(output: str, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an output holding a run needs --resume (continue) or --overwrite (replace)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one")
    if resume or overwrite:
        return
    if Path(output, report.SUMMARY).is_file():
        state = "a finished run (summary.json)"
    elif Path(output, CHECKPOINTS, "latest").is_file():
        state = "an interrupted run (checkpoints/latest)"
    else:
        return
    raise ValueError(
        f"--output {output} holds {state}; pass --resume to continue it (e.g. with a larger --max-steps), "
        "--overwrite to replace it, or another --output"
    )


def check_resume(output: str, world_size: int, micro_batch: int) -> None:
    """A resumed run must split the data like the run it continues (the data position counts micro-batches)."""
    run = Path(output, RUN)
    if not (run.is_file() and Path(output, CHECKPOINTS, "latest").is_file()):
        return
    earlier = json.loads(run.read_text())
    if (earlier["world_size"], earlier["micro_batch"]) != (world_size, micro_batch):
        raise ValueError(
            f"--resume: {output} was trained on {earlier['world_size']} ranks with micro-batch "
            f"{earlier['micro_batch']}, this run has {world_size} and {micro_batch}; resume with the same number of "
            "ranks and micro-batch, or start a new --output"
        )


def checkpoint_dir(path: str) -> Path:
    """The DeepSpeed checkpoint directory of a run directory or of a checkpoint directory itself."""
    for candidate in (Path(path, CHECKPOINTS), Path(path)):
        if Path(candidate, "latest").is_file():
            return candidate
    raise FileNotFoundError(
        f"--init-from {path} holds no DeepSpeed checkpoint (no 'latest' in it or in its {CHECKPOINTS}/); "
        "pass the --output directory of a finished phase-1 run"
    )


def check_init_from(path: str, model: str, vocab_size: int) -> str:
    """The checkpoint directory to initialise from, checked against the phase-1 run's run.json if present."""
    directory = checkpoint_dir(path)
    run = directory.parent / RUN
    if directory.name == CHECKPOINTS and run.is_file():
        earlier = json.loads(run.read_text())
        mine, theirs = (model, vocab_size), (earlier["model"], earlier["meta"]["vocab_size"])
        if mine != theirs:
            raise ValueError(
                f"--init-from {path} trained model {theirs[0]!r} with vocab {theirs[1]}, this run builds {mine[0]!r} "
                f"with vocab {mine[1]}; use the same --model and prepare phase-2 data with --tokenizer "
                f"<phase-1 data>/tokenizer"
            )
    return str(directory)


def with_monitor_paths(config: dict, output: str) -> dict:
    """A copy of ``config`` whose enabled TensorBoard/CSV monitors without output_path write to OUTPUT/monitor."""
    config = json.loads(json.dumps(config))
    for key in ("tensorboard", "csv_monitor"):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
            section["output_path"] = str(Path(output, "monitor"))
    return config


def check_installed() -> None:
    """Raise ValueError naming the extra to install if a module the run needs (up to its plot) is missing."""
    missing = [name for name in NEEDED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"BERT pretraining needs {', '.join(missing)}; pip install 'ds-vrgd[all]'")


def plan_run(args: argparse.Namespace, world_size: int) -> Plan:
    """Check every input (cheaply, before DeepSpeed starts) and decide the run.

    ``args``: from :func:`parse_args`; ``world_size``: the number of ranks. Returns the :class:`Plan`;
    ValueError/FileNotFoundError naming the fix for bad input.
    """
    check_installed()
    check_output(args.output, args.resume, args.overwrite)
    meta = read_meta(args.data)
    path = args.deepspeed_config
    config = load_ds_config(path)
    optimizer, lr = check_optimizer(config, path)
    train, micro, gas = batch_sizes(config, world_size, path)
    recipe = check_recipe(config, meta, path, args.data)
    model = args.model or recipe.get("model")
    if model is None:
        raise ValueError(f"no model: pass --model ({', '.join(PRESETS)}) or set \"model\" in {path}'s \"{RECIPE_KEY}\"")
    bert_config(model, meta["vocab_size"], max_seq_len=meta["max_seq_len"])  # preset and position embeddings
    rows = meta["counts"]["train"]["rows"]
    if rows < micro * world_size:
        raise ValueError(
            f"{args.data} has {rows} training sequences, fewer than one micro-batch per rank ({micro} x {world_size}); "
            "prepare more text or lower train_micro_batch_size_per_gpu"
        )
    steps = args.max_steps or recipe.get("steps")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f'no step count: pass --max-steps N or set "steps" in {path}\'s "{RECIPE_KEY}" section')
    warmup = _first(args.warmup_proportion, recipe.get("warmup_proportion"), DEFAULT_WARMUP)
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup proportion {warmup} must be in [0, 1); pass --warmup-proportion 0.1, for example")
    if args.resume:
        check_resume(args.output, world_size, micro)
    init_from = check_init_from(args.init_from, model, meta["vocab_size"]) if args.init_from else None
    config = with_monitor_paths({**config, **dict(zip(BATCH_KEYS, (train, micro, gas)))}, args.output)
    return Plan(
        data=args.data, output=args.output, config_path=path, config=config, meta=meta, model=model,
        optimizer=optimizer, peak_lr=lr, world_size=world_size, global_batch=train, micro_batch=micro, gas=gas,
        steps=steps, warmup_proportion=warmup,
        decay_power=_first(args.decay_power, recipe.get("decay_power"), DEFAULT_POWER),
        init_from=init_from, resume=args.resume, overwrite=args.overwrite, seed=args.seed, eval_every=args.eval_every,
        eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
    )


def _first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)
