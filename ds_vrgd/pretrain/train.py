"""BERT masked-LM pretraining with DeepSpeed: optimizer, batch and recipe from a ds_config.

    deepspeed --num_gpus 2 --module ds_vrgd.pretrain --data runs/demo/data \\
        --deepspeed_config ds_configs/cpu_demo_zero2_vrlamb.json --output runs/demo

Every input is checked before DeepSpeed starts (:mod:`ds_vrgd.pretrain.plan`), then :func:`train` runs the plan.
Batch, recipe, schedule, checkpoints and outputs: docs/pretraining.md, "2. Training".
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import torch

from ds_vrgd import gsnr
from ds_vrgd.pretrain import report
from ds_vrgd.pretrain.data import MaskingSpec, MLMCollator, load_pretraining_data, stable_seed
from ds_vrgd.pretrain.models import PRESETS, MaskedPositionsMLM, build_bert_mlm
from ds_vrgd.pretrain.plan import CHECKPOINTS, DEFAULT_POWER, DEFAULT_WARMUP, RECIPE_KEY, RUN, Plan, plan_run

RUN_FILES = (CHECKPOINTS, RUN, report.LOG, report.SUMMARY, report.PLOT, "monitor")
# monitor events written elsewhere: the GSNR statistics by ds_vrgd.deepspeed, Train/Samples/lr by DeepSpeed
MONITORED_ELSEWHERE = {*gsnr.LOG_FIELDS, "lr"}


# --------------------------------------------------------------------------- schedule, data, loss


def warmup_poly_decay(steps: int, warmup_proportion: float, power: float) -> Callable[[int], float]:
    """The LR multiplier of optimizer step t (0-based), for ``LambdaLR``: NVIDIA's PolyWarmUpScheduler over
    ``steps`` with ``warmup_proportion`` and decay ``power`` (docs/pretraining.md, "2. Training", Schedule)."""

    def factor(step: int) -> float:
        progress = min((step + 1) / steps, 1.0)
        if progress < warmup_proportion:
            return progress / warmup_proportion
        return (1.0 - progress) ** power

    return factor


def parameter_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups: weights (the config's weight_decay) and biases/LayerNorm (weight_decay 0)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or "LayerNorm" in name else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def rank_micro_batches(rows: int, rank: int, world: int, micro: int, seed: int, start: int) -> Iterator[list[int]]:
    """Row indices of this rank's micro-batches, endlessly over epochs, from micro-batch ``start`` on.

    Epoch e is ``DistributedSampler(shuffle=True, seed, drop_last=True)`` at
    ``set_epoch(e)``, cut into micro-batches of ``micro`` (the last partial one
    dropped), so position ``start`` = e * per_epoch + offset resumes exactly.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // micro
    epoch, offset = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)
        for b in range(offset, per_epoch):
            yield indices[b * micro : (b + 1) * micro]
        epoch, offset = epoch + 1, 0


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM loss of logits [M, V] at the predicted positions against their targets [M].

    Returns (mean cross-entropy, differentiable scalar; detached float [3]:
    loss sum, correct argmax predictions, predicted tokens).
    """
    logits = logits.float()
    loss_sum = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum().float()
    sums = torch.stack([loss_sum.detach(), correct, loss_sum.new_tensor(targets.numel())])
    return loss_sum / max(targets.numel(), 1), sums


def _forward(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mlm_loss` of the engine's model on a collated batch."""
    logits, targets = engine(input_ids=batch["input_ids"].to(engine.device), labels=batch["labels"].to(engine.device))
    return mlm_loss(logits, targets)


def train_step(engine, batches: Iterator[dict]) -> torch.Tensor:
    """One optimizer step over ``gas`` micro-batches; returns the sums of :func:`mlm_loss` over all ranks [3]."""
    from deepspeed import comm as dist

    sums = torch.zeros(3, device=engine.device)
    for _ in range(engine.gradient_accumulation_steps()):
        loss, micro_sums = _forward(engine, next(batches))
        engine.backward(loss)
        engine.step()
        sums += micro_sums
    dist.all_reduce(sums)
    return sums


def evaluate(engine, dataset, collator: MLMCollator, max_batches: int) -> dict:
    """Held-out MLM loss and accuracy over up to ``max_batches`` micro-batches per rank (summed over ranks)."""
    from deepspeed import comm as dist
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=engine.world_size, rank=engine.global_rank, shuffle=False,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=engine.train_micro_batch_size_per_gpu(), sampler=sampler,
                        collate_fn=collator)
    sums = torch.zeros(3, device=engine.device)
    engine.eval()
    with torch.no_grad():
        for batch in islice(loader, max_batches):
            sums += _forward(engine, batch)[1]
    engine.train()
    dist.all_reduce(sums)
    loss_sum, correct, count = sums.tolist()
    if count == 0:
        return {"eval_mlm_loss": None, "eval_mlm_accuracy": None, "eval_tokens": 0}
    return {"eval_mlm_loss": loss_sum / count, "eval_mlm_accuracy": correct / count, "eval_tokens": int(count)}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(engine, directory: str, state: dict, keep: int) -> None:
    """Save ``step<N>`` with ``state`` as client_state, then point ``latest`` at it atomically; keep the last ``keep``."""
    from deepspeed import comm as dist

    tag = f"step{state['step']}"
    engine.save_checkpoint(directory, tag=tag, client_state=dict(state), save_latest=False)  # ends with a barrier
    if engine.global_rank == 0:
        tmp = Path(directory, "latest.tmp")
        tmp.write_text(tag)
        os.replace(tmp, Path(directory, "latest"))
        tags = sorted((int(m.group(1)), p) for p in Path(directory).iterdir() if (m := re.fullmatch(r"step(\d+)", p.name)))
        for _, old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    dist.barrier()


# --------------------------------------------------------------------------- the run


def prepare_output(plan: Plan) -> None:
    """Rank 0: clear a replaced run (--overwrite), create the directory, write run.json."""
    output = Path(plan.output)
    if plan.overwrite:
        for name in RUN_FILES:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / RUN).write_text(json.dumps(asdict(plan), indent=2) + "\n")


def build_engine(plan: Plan):
    """The DeepSpeed engine: the preset BERT, the config's optimizer, the warmup + decay LambdaLR."""
    import ds_vrgd

    mlm = build_bert_mlm(plan.model, plan.meta["vocab_size"], seed=plan.seed, max_seq_len=plan.seq_len)
    model = MaskedPositionsMLM(mlm)
    schedule = warmup_poly_decay(plan.steps, plan.warmup_proportion, plan.decay_power)
    engine, *_ = ds_vrgd.initialize(  # deepspeed.initialize with the VR types registered
        model=model, model_parameters=parameter_groups(model), config=plan.config,
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=schedule),
    )
    return engine


def restore(engine, plan: Plan) -> dict:
    """The training state: from the latest checkpoint (--resume), else fresh (module weights of --init-from)."""
    state = {"step": 0, "micro_batches": 0, "train_seconds": 0.0, "train_samples": 0,
             "initial_train_loss": None, "final_train_loss": None}
    directory = Path(plan.output, CHECKPOINTS)
    if plan.resume and (directory / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(directory))
        state.update({key: client_state[key] for key in state})
        engine.lr_scheduler.last_epoch -= 1
        engine.lr_scheduler.step()  # re-evaluate the restored step's lr: --max-steps may have changed
        if engine.global_rank == 0:
            report.trim_log(plan.output, state["step"])
    elif plan.init_from:
        engine.load_checkpoint(plan.init_from, load_module_only=True)
    return state


def gsnr_record(engine) -> dict:
    """The VR optimizer's GSNR statistics of the last step (None values without a VR optimizer or with n < 2)."""
    optimizer = getattr(engine, "vr_optimizer", None)
    stats = optimizer.gsnr_stats() if optimizer is not None else {}
    have = stats.get("n", 0) >= 2
    return {key: stats[name] if have else None for key, name in gsnr.LOG_FIELDS.items()}


def log_record(engine, plan: Plan, record: dict) -> None:
    """Rank 0: append a record to log.jsonl and write its numbers to DeepSpeed's monitor."""
    report.append_record(plan.output, record)
    if engine.monitor.enabled:
        prefix = "Train/Samples/" if record["event"] == "train" else "Eval/Samples/"
        skip = {"event", "step", *MONITORED_ELSEWHERE}
        events = [(prefix + k, float(v), engine.global_samples) for k, v in record.items()
                  if k not in skip and isinstance(v, (int, float))]
        engine.monitor.write_events(events)


def run_step(engine, batches: Iterator[dict], collator: MLMCollator, plan: Plan, state: dict, timed: bool) -> dict:
    """One optimizer step from a state seeded by (seed, rank, step); updates ``state``; returns its log record.

    ``timed``: count the step's time and samples in the run's throughput (not
    the first step of a process, which includes one-time set-up).
    """
    torch.manual_seed(stable_seed(plan.seed, "dropout", engine.global_rank, state["step"]))
    collator.reseed(state["step"])
    lr = engine.get_lr()[0]
    start = time.perf_counter()
    loss_sum, correct, count = train_step(engine, batches).tolist()
    seconds = time.perf_counter() - start
    loss = loss_sum / count
    state.update(step=state["step"] + 1, micro_batches=state["micro_batches"] + plan.gas, final_train_loss=loss)
    if timed:
        state.update(train_seconds=state["train_seconds"] + seconds,
                     train_samples=state["train_samples"] + plan.global_batch)
    if state["initial_train_loss"] is None:
        state["initial_train_loss"] = loss
    return {"event": "train", "step": state["step"], "loss": loss, "mlm_accuracy": correct / count, "lr": lr,
            "samples_per_second": plan.global_batch / seconds,
            "tokens_per_second": plan.global_batch * plan.seq_len / seconds, **gsnr_record(engine)}


def train(plan: Plan) -> dict:
    """Run (or continue) the plan on every rank; rank 0 writes the logs, summary and plot. Returns the summary."""
    import deepspeed
    from deepspeed import comm as dist
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    began = time.perf_counter()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        prepare_output(plan)
    dist.barrier()
    engine = build_engine(plan)
    state = restore(engine, plan)
    train_set, heldout = (load_pretraining_data(plan.data, split) for split in ("train", "heldout"))
    collator = MLMCollator(MaskingSpec.from_meta(plan.meta), seed=plan.seed, rank=rank)
    indices = rank_micro_batches(len(train_set), rank, world, plan.micro_batch, plan.seed, state["micro_batches"])
    batches = iter(DataLoader(train_set, batch_sampler=indices, collate_fn=collator))  # in-process: see reseed
    checkpoints = str(Path(plan.output, CHECKPOINTS))

    def run_eval() -> dict:
        result = evaluate(engine, heldout, collator, plan.eval_batches)
        if rank == 0:
            log_record(engine, plan, {"event": "eval", "step": state["step"], **result})
        return result

    bar = tqdm(total=plan.steps, initial=state["step"], desc="pretrain", unit="step", disable=rank != 0,
               mininterval=1.0)
    first = state["step"]
    while state["step"] < plan.steps:
        record = run_step(engine, batches, collator, plan, state, timed=state["step"] > first)
        step = state["step"]
        if rank == 0 and (step % plan.log_every == 0 or step in (1, plan.steps)):
            log_record(engine, plan, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['mlm_accuracy']:.3f}", lr=f"{record['lr']:.2e}")
        if plan.eval_every and step % plan.eval_every == 0 and step < plan.steps:
            run_eval()
        if plan.checkpoint_every and step % plan.checkpoint_every == 0 and step < plan.steps:
            save_checkpoint(engine, checkpoints, state, plan.keep_checkpoints)
    bar.close()
    if state["step"] > first:  # the final weights (phase 2 starts here); a finished run resumed has them
        save_checkpoint(engine, checkpoints, state, plan.keep_checkpoints)
    summary = summarize(engine, plan, state, run_eval(), time.perf_counter() - began)
    if rank == 0:
        report.write_summary(plan.output, summary)
        report.plot_run(plan.output, f"{plan.model} BERT, {summary['optimizer_label']}, batch {plan.global_batch}, "
                                     f"seq {plan.seq_len}")
    dist.barrier()
    return summary


def summarize(engine, plan: Plan, state: dict, evaluation: dict, wall_seconds: float) -> dict:
    """The run's summary.json content.

    ``vr`` is null for an optimizer that is not a VR type; ``samples_per_second``
    is the mean over the timed steps (all but the first of each process).
    """
    vr_optimizer = getattr(engine, "vr_optimizer", None)
    vr = bool(vr_optimizer.param_groups[0]["vr"]) if vr_optimizer is not None else None
    samples_per_second = state["train_samples"] / state["train_seconds"] if state["train_seconds"] else None
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {
        "optimizer": plan.optimizer, "vr": vr,
        "optimizer_label": f"{plan.optimizer} (vr off)" if vr is False else plan.optimizer,
        "zero_stage": engine.zero_optimization_stage(), "precision": precision, "world_size": engine.world_size,
        "global_batch_size": plan.global_batch, "micro_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.gas, "steps": state["step"], "seq_len": plan.seq_len,
        "model": plan.model, "parameters": sum(p.numel() for p in engine.module.parameters()),
        "peak_lr": plan.peak_lr, "warmup_proportion": plan.warmup_proportion, "decay_power": plan.decay_power,
        "initial_train_loss": state["initial_train_loss"], "final_train_loss": state["final_train_loss"],
        **evaluation,
        "samples_per_second": samples_per_second,
        "tokens_per_second": samples_per_second * plan.seq_len if samples_per_second else None,
        "train_seconds": state["train_seconds"], "wall_seconds": wall_seconds,
        "gsnr": gsnr_record(engine),
        "data": plan.data, "deepspeed_config": plan.config_path, "init_from": plan.init_from,
        "log": str(Path(plan.output, report.LOG)), "plot": str(Path(plan.output, report.PLOT)),
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see ``python -m ds_vrgd.pretrain --help``)."""
    p = argparse.ArgumentParser(prog="python -m ds_vrgd.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared data directory (python -m ds_vrgd.pretrain.data)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="ds_config JSON (ds_configs/)")
    p.add_argument("--output", required=True, help="run directory: checkpoints, log.jsonl, summary.json, plot")
    p.add_argument("--model", choices=list(PRESETS), help=f'BERT preset (default: the config\'s "{RECIPE_KEY}" model)')
    p.add_argument("--max-steps", type=int, help=f'optimizer steps (default: the config\'s "{RECIPE_KEY}" steps)')
    p.add_argument("--warmup-proportion", type=float, help=f"of the steps (default: recipe, else {DEFAULT_WARMUP})")
    p.add_argument("--decay-power", type=float, help=f"polynomial decay power (default: recipe, else {DEFAULT_POWER})")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=20, help="held-out micro-batches per rank per evaluation")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints to keep (0: all)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/latest if there is one")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --output")
    p.add_argument("--init-from", metavar="RUN_DIR", help="phase 2: start from this run's final module weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=1, help="log.jsonl/monitor every N steps")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    for name, low in (("max_steps", 1), ("eval_every", 0), ("eval_batches", 1), ("checkpoint_every", 0),
                      ("keep_checkpoints", 0), ("log_every", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} {value} must be >= {low}")
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``argv``: None for sys.argv): plan, train, print the summary and where the results are.

    Returns 0; bad input raises SystemExit with ``error: ...`` before DeepSpeed starts.
    """
    args = parse_args(argv)
    try:
        plan = plan_run(args, int(os.environ.get("WORLD_SIZE", "1")))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        os.environ.setdefault(key, value)  # a plain `python -m ds_vrgd.pretrain` is one rank
    from ds_vrgd.deepspeed import shutdown

    summary = train(plan)
    shutdown()
    if int(os.environ["RANK"]) == 0:
        print(report.format_summary(summary))
    return 0
