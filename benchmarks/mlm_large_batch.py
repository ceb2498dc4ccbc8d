"""Large-batch BERT MLM pretraining on a real corpus: LAMB vs VRLAMB, plus gamma and n sweeps.

    python benchmarks/mlm_large_batch.py --quick                 # smoke test (~1 min), writes to a temp dir
    python benchmarks/mlm_large_batch.py --experiment lr --jobs 2     # then pass the best as --lr
    python benchmarks/mlm_large_batch.py --experiment main --jobs 2
    python benchmarks/mlm_large_batch.py --experiment gamma --jobs 2
    python benchmarks/mlm_large_batch.py --experiment n --jobs 2
    python benchmarks/mlm_large_batch.py --experiment interval --jobs 1 --batches 64,512   # after main
    python benchmarks/mlm_large_batch.py --report                # tables -> docs/results.md, plots -> docs/img/

Setup. Data: ``python -m ds_vrgd.pretrain.data`` output (prepared into
``--data`` on first use from the embedded stdlib-docstring corpus, or from
``--corpus FILES``): WordPiece vocabulary 8192, packed sequences of
``--seq-len`` tokens, dynamic masking (15%, 80/10/10; fresh masks every
step), 5% of the documents held out. Model: a preset BERT (``--preset``,
random init from the seed) that scores only the masked positions
(``MaskedPositionsMLM``). Optimizer: ``VRLAMB`` (``vr=False`` is LAMB; both
weight decay 0.01, 0 for biases and LayerNorm, betas (0.9, 0.999), eps 1e-6,
no gradient clipping). Schedule: NVIDIA's LAMB BERT recipe,
``ds_vrgd.pretrain.train.warmup_poly_decay`` (warmup 28.43% of the steps,
then polynomial decay with power 0.5 to 0). Peak lr: ``--lr`` at the moderate
batch, the first of ``--batches`` (chosen with ``--experiment lr``, a
LAMB-only grid), scaled with sqrt(batch) to the larger ones; LAMB and VRLAMB
get the same lr.

Step: the global batch B is split into n micro-batches of B / n sequences,
one backward pass each (loss / n), then one optimizer step; with VRLAMB the n
backward passes are the step's n GSNR samples, as n data-parallel ranks x
accumulation steps give. Every run of a comparison sees the same number of
training sequences (``--samples``), so the large batch takes fewer steps.
Same seed = same initial weights and the same sequence order for every
optimizer and batch size; dropout and masks are reseeded every step.

Measured. Held-out MLM loss/accuracy on the whole held-out split (its
static masks) at ``--eval-points`` evenly spaced sample counts and at the
end; the final train MLM loss/accuracy on a fixed subset of the training
split of the same size (fixed masks), both with dropout off; the gap =
held-out loss - train loss (and train - held-out accuracy); steps to reach a
target held-out loss, linearly interpolated between evaluations. Targets,
fixed before any run: T_moderate = the mean final held-out loss of LAMB at
the moderate batch, T_batch = that of LAMB at the run's own batch (so LAMB
itself needs about all its steps for T_batch, and the ratio LAMB steps /
VRLAMB steps to T_batch is the paper's "fewer steps" measure).

Experiments (each run is cached as one JSON in ``--results``; rerunning
skips finished runs, ``--force`` redoes them):
  lr     LAMB at the moderate batch, seed 0, lr in ``--lrs``
  main   LAMB and VRLAMB at every batch of ``--batches``, n = ``--n``, ``--seeds``
  gamma  VRLAMB at each of ``--sweep-batches`` (default: the first and the last of ``--batches``),
         gamma in ``--gammas``, ``--sweep-seeds``
  n      VRLAMB at each of ``--sweep-batches``, n in ``--ns`` (global batch fixed), ``--sweep-seeds``
  interval  VRLAMB with ``gsnr_interval`` in ``--intervals`` (GSNR statistics every k-th step, rho held in
         between) at each of ``--interval-batches`` (default: the moderate one), main's n, lr and ``--seeds``;
         its comparison with main's LAMB and VRLAMB (k = 1) of the same seeds is printed and written
         into the generated block ``mlm_gsnr_interval`` of ``--doc``
(the sweeps' LAMB reference, gamma 0, is main's LAMB at the same batch: run main first)

``--gsnr-interval K`` (default 1) gives every VRLAMB run of any experiment gsnr_interval K; the run id
names it only when K != 1, so the ids of the runs with statistics on every step stay as they were.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _experiments import (
    IMAGES,
    REPO,
    RESULTS_DOC,
    accumulated_step,
    comma_floats,
    comma_ints,
    fmt_mean_std,
    mean_std,
    paired_differences,
    pyplot,
    run_parallel,
    save_figure,
    sqrt_scaled_lr,
    update_results_doc,
)
from _timing import machine, table, write_json

from ds_vrgd.optim import VRLAMB
from ds_vrgd.pretrain import data as pretrain_data
from ds_vrgd.pretrain.models import MaskedPositionsMLM, build_bert_mlm
from ds_vrgd.pretrain.plan import DEFAULT_POWER, DEFAULT_WARMUP
from ds_vrgd.pretrain.train import (
    mlm_loss,
    parameter_groups,
    rank_micro_batches,
    warmup_poly_decay,
)

EXPERIMENTS = ("lr", "main", "gamma", "n", "interval")
EVAL_ROWS_PER_BATCH = 128


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run (its JSON file name is :meth:`run_id`)."""

    optimizer: str  # "LAMB" (VRLAMB with vr=False) or "VRLAMB"
    batch: int  # global batch, sequences per optimizer step
    n: int  # micro-batches per step = GSNR samples
    gamma: float  # 0 for LAMB
    lr: float  # peak lr of this batch
    seed: int
    samples: int  # training sequences of the whole run
    preset: str
    seq_len: int
    gsnr_interval: int = 1  # VRLAMB's statistics schedule: GSNR on every k-th step, rho held in between

    @property
    def steps(self) -> int:
        return self.samples // self.batch

    def run_id(self) -> str:
        interval = f"_interval{self.gsnr_interval}" if self.gsnr_interval != 1 else ""  # k = 1: the ids of before
        return (f"{self.optimizer}_{self.preset}_seq{self.seq_len}_B{self.batch}_n{self.n}_g{self.gamma:g}{interval}"
                f"_lr{self.lr:.3g}_S{self.samples}_seed{self.seed}")


# --------------------------------------------------------------------------- data


def ensure_data(args) -> dict:
    """Prepare ``args.data`` with ds_vrgd.pretrain.data unless it holds data already; returns its meta.json."""
    if not os.path.exists(os.path.join(args.data, "meta.json")):
        command = ["--output", args.data, "--max-seq-len", str(args.seq_len), "--masking", "dynamic",
                   "--heldout-fraction", str(args.heldout_fraction)]
        command += ["--corpus", *args.corpus] if args.corpus else []
        command += ["--max-bytes", str(args.max_bytes)] if args.max_bytes else []
        print("preparing data: python -m ds_vrgd.pretrain.data " + " ".join(command), flush=True)
        if pretrain_data.main(command) != 0:
            raise SystemExit(f"data preparation into {args.data} failed")
    meta = pretrain_data.read_meta(args.data)
    if meta["max_seq_len"] != args.seq_len:
        raise SystemExit(f"{args.data} holds seq {meta['max_seq_len']} data; pass --seq-len {meta['max_seq_len']} "
                         f"or another --data")
    return meta


def data_fingerprint(meta: dict) -> dict:
    """What identifies the prepared data in a run's record (source, options, row counts)."""
    return {"source": meta["source"], "options": meta["options"], "counts": meta["counts"]}


def evaluation_sets(data_dir: str, spec: pretrain_data.MaskingSpec) -> dict[str, list[tuple]]:
    """Fixed (input_ids, labels) batches: the whole held-out split and as many train rows, masked once (seed 0)."""
    heldout = pretrain_data.load_pretraining_data(data_dir, "heldout")[:]
    train_ids = pretrain_data.load_pretraining_data(data_dir, "train")["input_ids"]
    rows = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(0))[: len(heldout["input_ids"])]
    train = pretrain_data.mask_tokens(train_ids[rows], spec, torch.Generator().manual_seed(0))
    return {"heldout": chunked(heldout["input_ids"], heldout["labels"]), "train": chunked(*train)}


def chunked(input_ids: torch.Tensor, labels: torch.Tensor) -> list[tuple]:
    """(input_ids, labels) in batches of EVAL_ROWS_PER_BATCH rows."""
    return list(zip(input_ids.split(EVAL_ROWS_PER_BATCH), labels.split(EVAL_ROWS_PER_BATCH)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple]) -> tuple[float, float]:
    """MLM loss and accuracy over all predicted tokens of ``batches``, dropout off."""
    model.eval()
    sums = sum(mlm_loss(*model(input_ids, labels))[1] for input_ids, labels in batches)
    model.train()
    loss_sum, correct, count = sums.tolist()
    return loss_sum / count, correct / count


# --------------------------------------------------------------------------- one run


def eval_steps(spec: RunSpec, eval_points: int) -> set[int]:
    """Optimizer steps after which the held-out set is evaluated: evenly spaced in samples, always the last."""
    return {round(spec.steps * i / eval_points) for i in range(1, eval_points + 1)}


def gsnr_record(optimizer: VRLAMB, micro_batch: int) -> dict:
    """The last step's GSNR statistics (empty for LAMB, which keeps no moments)."""
    if not optimizer.param_groups[0]["vr"]:
        return {}
    stats = optimizer.gsnr_stats(micro_batch_size=micro_batch)
    return {key: stats[key] for key in ("n", "gsnr_mean", "frac_low", "frac_high", "b_simple")}


def train_run(job: tuple) -> dict:
    """Train one :class:`RunSpec` (job = (spec, data_dir, eval_points)); returns its record."""
    spec, data_dir, eval_points = job
    began = time.perf_counter()
    meta = pretrain_data.read_meta(data_dir)
    masking = pretrain_data.MaskingSpec.from_meta(meta)
    train_ids = pretrain_data.load_pretraining_data(data_dir, "train")["input_ids"]
    eval_sets = evaluation_sets(data_dir, masking)
    model = MaskedPositionsMLM(build_bert_mlm(spec.preset, meta["vocab_size"], spec.seed, max_seq_len=spec.seq_len))
    optimizer = VRLAMB(parameter_groups(model), lr=spec.lr, weight_decay=0.01, gamma=spec.gamma,
                       vr=spec.optimizer == "VRLAMB", gsnr_interval=spec.gsnr_interval)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_poly_decay(spec.steps, DEFAULT_WARMUP, DEFAULT_POWER))
    collator = pretrain_data.MLMCollator(masking, seed=spec.seed)
    micro_batch = spec.batch // spec.n
    order = rank_micro_batches(len(train_ids), 0, 1, micro_batch, spec.seed, 0)

    def loss_of(rows: list[int]) -> torch.Tensor:
        batch = collator([{"input_ids": row} for row in train_ids[rows]])
        return mlm_loss(*model(batch["input_ids"], batch["labels"]))[0]

    heldout_loss, heldout_acc = evaluate(model, eval_sets["heldout"])
    curve = [{"step": 0, "samples": 0, "heldout_loss": heldout_loss, "heldout_acc": heldout_acc}]
    window, checkpoints = [], eval_steps(spec, eval_points)
    for step in range(1, spec.steps + 1):
        collator.reseed(step)
        torch.manual_seed(pretrain_data.stable_seed(spec.seed, "dropout", step))
        window.append(accumulated_step(optimizer, [next(order) for _ in range(spec.n)], loss_of))
        schedule.step()
        if step in checkpoints:
            heldout_loss, heldout_acc = evaluate(model, eval_sets["heldout"])
            curve.append({"step": step, "samples": step * spec.batch, "heldout_loss": heldout_loss,
                          "heldout_acc": heldout_acc, "train_loss_window": sum(window) / len(window),
                          **gsnr_record(optimizer, micro_batch)})
            window = []
    train_loss, train_acc = evaluate(model, eval_sets["train"])
    final = {"heldout_loss": heldout_loss, "heldout_acc": heldout_acc, "train_loss": train_loss,
             "train_acc": train_acc, "gap_loss": heldout_loss - train_loss, "gap_acc": train_acc - heldout_acc}
    return {"spec": asdict(spec), "run_id": spec.run_id(), "steps": spec.steps, "final": final, "curve": curve,
            "wall_s": time.perf_counter() - began, "torch_threads": torch.get_num_threads(),
            "data": data_fingerprint(meta)}


# --------------------------------------------------------------------------- experiments


def base_spec(args, optimizer: str, batch: int, seed: int) -> RunSpec:
    """The recipe's run: lr sqrt-scaled from the moderate batch, n = --n, gamma = --gamma and gsnr_interval =
    --gsnr-interval for VRLAMB."""
    vr = optimizer == "VRLAMB"
    return RunSpec(optimizer=optimizer, batch=batch, n=args.n, gamma=args.gamma if vr else 0.0,
                   lr=sqrt_scaled_lr(args.lr, batch, args.moderate_batch), seed=seed, samples=args.samples,
                   preset=args.preset, seq_len=args.seq_len, gsnr_interval=args.gsnr_interval if vr else 1)


def sweep_specs(args, field: str, value, batch: int) -> list[RunSpec]:
    """The sweep runs of one value of ``field`` ("gamma" or "n") at ``batch``; gamma 0 is LAMB."""
    if field == "gamma" and value == 0:
        return [base_spec(args, "LAMB", batch, seed) for seed in args.sweep_seeds]
    return [replace(base_spec(args, "VRLAMB", batch, seed), **{field: value}) for seed in args.sweep_seeds]


def experiment_specs(name: str, args) -> list[RunSpec]:
    """The runs of an experiment (runs shared with another experiment have the same spec, so they are reused)."""
    if name == "lr":
        return [replace(base_spec(args, "LAMB", args.moderate_batch, 0), lr=lr) for lr in args.lrs]
    if name == "main":
        return [base_spec(args, opt, batch, seed) for batch in args.batches
                for opt in ("LAMB", "VRLAMB") for seed in args.seeds]
    if name in ("gamma", "n"):  # the LAMB reference (gamma 0) comes from main
        return [spec for batch in args.sweep_batches for value in (args.gammas if name == "gamma" else args.ns)
                for spec in sweep_specs(args, name, value, batch)]
    if name == "interval":  # the references (LAMB, VRLAMB with k = 1) come from main
        return [interval_spec(args, batch, k, seed) for batch in args.interval_batches for k in args.intervals
                for seed in args.seeds]
    raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")


def interval_spec(args, batch: int, k: int, seed: int) -> RunSpec:
    """main's VRLAMB run at ``batch`` with GSNR statistics on every k-th step (k = 1: main's run itself)."""
    return replace(base_spec(args, "VRLAMB", batch, seed), gsnr_interval=k)


def run_path(args, spec: RunSpec) -> str:
    return os.path.join(args.results, spec.run_id() + ".json")


def load_run(args, spec: RunSpec) -> dict | None:
    """The cached record of ``spec``, or None; SystemExit if it was trained on other data than ``args.data``."""
    path = run_path(args, spec)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record["data"] != args.fingerprint:
        raise SystemExit(f"{path} was trained on other data than {args.data}; use another --results or --force")
    return record


def records_of(args, specs: list[RunSpec]) -> list[dict]:
    """The cached records of ``specs`` (runs not trained yet are left out)."""
    return [r for r in map(functools.partial(load_run, args), specs) if r is not None]


def run_experiment(args) -> None:
    """Train the experiment's runs that are not cached yet, ``--jobs`` at a time; print a line per run."""
    specs = list(dict.fromkeys(experiment_specs(args.experiment, args)))
    todo = [spec for spec in specs if args.force or load_run(args, spec) is None]
    print(f"{args.experiment}: {len(specs)} runs, {len(specs) - len(todo)} cached, training {len(todo)} "
          f"in {args.jobs} process(es)", flush=True)
    began = time.perf_counter()
    jobs = [(spec, args.data, args.eval_points) for spec in todo]
    for (spec, _, _), record in run_parallel(train_run, jobs, args.jobs, args.threads):
        record["machine"] = machine()
        write_json(run_path(args, spec), record)
        final = record["final"]
        print(f"{spec.run_id()}: held-out loss {final['heldout_loss']:.4f} acc {final['heldout_acc']:.4f} "
              f"gap {final['gap_loss']:+.4f}  ({record['wall_s']:.0f} s; {time.perf_counter() - began:.0f} s total)",
              flush=True)


# --------------------------------------------------------------------------- report


def steps_to_target(curve: list[dict], target: float) -> float | None:
    """First optimizer step at which the held-out loss reaches ``target`` (linear between evaluations), or None."""
    for before, after in itertools.pairwise(curve):
        if after["heldout_loss"] <= target:
            drop = before["heldout_loss"] - after["heldout_loss"]
            fraction = (before["heldout_loss"] - target) / drop if drop > 0 else 1.0
            return before["step"] + fraction * (after["step"] - before["step"])
    return None


def mean_curve(records: list[dict]) -> list[dict]:
    """The seed-mean held-out loss curve of runs that share their evaluation steps."""
    return [{"step": point["step"], "heldout_loss": mean_std(r["curve"][i]["heldout_loss"] for r in records)[0]}
            for i, point in enumerate(records[0]["curve"])]


def fmt_steps(records: list[dict], target: float) -> str:
    """Steps of the seed-mean curve to ``target`` ('—' if it never gets there), and how many seeds get there."""
    steps = steps_to_target(mean_curve(records), target)
    reached = sum(steps_to_target(r["curve"], target) is not None for r in records)
    return f"{'—' if steps is None else f'{steps:.0f}'} ({reached}/{len(records)} seeds)"


def final_mean(records: list[dict], key: str) -> float:
    return mean_std(r["final"][key] for r in records)[0]


def final_of(key: str) -> Callable[[dict], float]:
    """A function of a run record: its final ``key``."""
    return lambda record: record["final"][key]


def steps_ratio(lamb: list[dict], vr: list[dict], target: float) -> str:
    """LAMB's steps / VRLAMB's steps to ``target``, on the seed-mean curves.

    Per seed the ratio is often undefined: by construction about half of LAMB's
    own seeds end above their mean final loss. When LAMB's mean curve never
    gets there its total steps count (a lower bound, marked ≥).
    """
    vr_steps = steps_to_target(mean_curve(vr), target)
    if vr_steps is None:
        return "— (VRLAMB does not reach it)"
    lamb_steps = steps_to_target(mean_curve(lamb), target)
    if lamb_steps is None:
        return f"≥ {lamb[0]['steps'] / vr_steps:.2f}"
    return f"{lamb_steps / vr_steps:.2f}"


RESULT_HEADERS = ["held-out loss", "held-out acc %", "train loss", "gap (loss)", "gap (acc pp)",
                  "steps to T_moderate (mean curve)", "steps to T_batch (mean curve)", "wall s/run"]


def result_cells(records: list[dict], t_moderate: float, t_batch: float) -> list[str]:
    """The cells under RESULT_HEADERS: final losses/accuracies, gap, steps to both targets, wall time."""
    return [fmt_mean_std(r["final"]["heldout_loss"] for r in records),
            fmt_mean_std((r["final"]["heldout_acc"] for r in records), 100, 2),
            fmt_mean_std(r["final"]["train_loss"] for r in records),
            fmt_mean_std(r["final"]["gap_loss"] for r in records),
            fmt_mean_std((r["final"]["gap_acc"] for r in records), 100, 2),
            fmt_steps(records, t_moderate), fmt_steps(records, t_batch),
            f"{mean_std(r['wall_s'] for r in records)[0]:.0f}"]


def main_table(runs: dict, targets: dict[int, float]) -> str:
    rows = []
    for (opt, batch), records in runs.items():
        spec = records[0]["spec"]
        rows.append([opt, batch, spec["n"], spec["gamma"], f"{spec['lr']:.3g}", records[0]["steps"], len(records),
                     f"{targets[batch]:.4f}"] + result_cells(records, targets[min(targets)], targets[batch]))
    return table(["optimizer", "batch", "n", "gamma", "peak lr", "steps", "seeds", "T_batch"] + RESULT_HEADERS, rows)


def ratio_table(args, runs: dict, targets: dict[int, float]) -> str:
    """VRLAMB relative to LAMB at each batch: final loss/accuracy differences, gap change, steps-to-target ratios."""
    rows = []
    for batch in args.batches:
        lamb, vr = runs[("LAMB", batch)], runs[("VRLAMB", batch)]
        rows.append([batch, len(paired_differences(vr, lamb, final_of("heldout_loss"))),
                     fmt_mean_std(paired_differences(vr, lamb, final_of("heldout_loss")), digits=4),
                     fmt_mean_std(paired_differences(vr, lamb, final_of("heldout_acc")), 100, 2),
                     fmt_mean_std(paired_differences(vr, lamb, final_of("gap_loss")), digits=4),
                     f"{100 * (final_mean(vr, 'gap_loss') / final_mean(lamb, 'gap_loss') - 1):+.1f}%",
                     steps_ratio(lamb, vr, targets[args.moderate_batch]), steps_ratio(lamb, vr, targets[batch])])
    return table(["batch", "seed pairs", "Δ held-out loss", "Δ held-out acc pp", "Δ gap (loss)", "gap (loss) change",
                  "LAMB steps / VRLAMB steps to T_moderate", "LAMB steps / VRLAMB steps to T_batch"], rows)


def sweep_table(args, field: str, values: list, targets: dict[int, float]) -> str:
    """One row per sweep batch and value of ``field``, with the GSNR statistics of the last step."""
    rows = []
    for batch in args.sweep_batches:
        for value in values:
            records = records_of(args, sweep_specs(args, field, value, batch))
            if not records:
                continue
            last = [r["curve"][-1] for r in records]
            gsnr = ([fmt_mean_std(c["frac_low"] + c["frac_high"] for c in last),
                     fmt_mean_std((c["b_simple"] for c in last), digits=0)] if "b_simple" in last[0] else ["—", "—"])
            rows.append([batch, value, len(records)]
                        + result_cells(records, targets[args.moderate_batch], targets[batch]) + gsnr)
    return table(["batch", field, "seeds"] + RESULT_HEADERS + ["rho at bounds (last step)", "B_simple (last step)"],
                 rows)


def lr_table(args) -> str:
    rows = [[f"{r['spec']['lr']:.3g}", f"{r['final']['heldout_loss']:.4f}", f"{100 * r['final']['heldout_acc']:.2f}",
             f"{r['final']['train_loss']:.4f}", f"{r['wall_s']:.0f}"]
            for r in records_of(args, experiment_specs("lr", args))]
    return table(["peak lr", "held-out loss", "held-out acc %", "train loss", "wall s"], rows)


def plot_curves(args, runs: dict, targets: dict[int, float]) -> str:
    """Held-out loss vs training sequences, one panel per batch size: mean over seeds, band = min..max."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(args.batches), figsize=(5.5 * len(args.batches), 4.2), sharey=True)
    for ax, batch in zip(axes, args.batches):
        for opt, color in (("LAMB", "tab:blue"), ("VRLAMB", "tab:red")):
            curves = [r["curve"] for r in runs[(opt, batch)]]
            losses = torch.tensor([[point["heldout_loss"] for point in curve] for curve in curves])
            samples = [point["samples"] for point in curves[0]]
            ax.plot(samples, losses.mean(0), color=color, label=f"{opt} ({len(curves)} seeds)")
            ax.fill_between(samples, losses.min(0).values, losses.max(0).values, color=color, alpha=0.2)
        ax.axhline(targets[args.moderate_batch], color="gray", linestyle=":", linewidth=1, label="T_moderate")
        ax.axhline(targets[batch], color="gray", linestyle="--", linewidth=1, label="T_batch")
        ax.set_title(f"batch {batch} ({args.samples // batch} steps)")
        ax.set_xlabel("training sequences")
        ax.set_ylim(top=max(targets.values()) + 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out MLM loss")
    axes[0].legend()
    figure.suptitle(f"BERT-{args.preset} MLM, seq {args.seq_len}: LAMB vs VRLAMB at the same number of sequences")
    return save_figure(figure, "mlm_heldout_loss", args.img_dir, args.doc)


def plot_sweeps(args) -> str:
    """Final held-out loss minus LAMB's (same seed and batch) against gamma and against n, one line per batch."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, field, values in ((axes[0], "gamma", args.gammas), (axes[1], "n", args.ns)):
        for batch, color in zip(args.sweep_batches, ("tab:green", "tab:red", "tab:purple")):
            lamb = records_of(args, sweep_specs(args, "gamma", 0.0, batch))
            deltas = {v: paired_differences(records_of(args, sweep_specs(args, field, v, batch)), lamb,
                                            final_of("heldout_loss")) for v in values}
            deltas = {v: d for v, d in deltas.items() if d}
            ax.plot(list(deltas), [mean_std(d)[0] for d in deltas.values()], "o-", color=color, label=f"batch {batch}")
        ax.axhline(0.0, color="tab:blue", linestyle="--", label="LAMB")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("gamma" if field == "gamma" else "n (GSNR samples per step)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final held-out loss: VRLAMB - LAMB")
    axes[0].legend()
    figure.suptitle(f"sweeps, seeds {args.sweep_seeds}: VRLAMB's final held-out loss relative to LAMB's (lower is better)")
    return save_figure(figure, "mlm_sweeps", args.img_dir, args.doc)


def interval_report(args) -> str:
    """The interval experiment against main's runs of the same seeds: one row per setting (LAMB, VRLAMB at
    k = 1 and at each of --intervals) and the same-seed differences of each k to k = 1 and to LAMB; written into
    the generated block ``mlm_gsnr_interval`` of ``--doc``."""
    rows, deltas = [], []
    for batch in args.interval_batches:
        lamb = records_of(args, [base_spec(args, "LAMB", batch, s) for s in args.seeds])
        every = records_of(args, [interval_spec(args, batch, 1, s) for s in args.seeds])
        for label, records in (("LAMB", lamb), ("VRLAMB", every)):
            if records:
                rows.append([label, batch, 1 if label == "VRLAMB" else "—", *interval_cells(records)])
        for k in args.intervals:
            records = records_of(args, [interval_spec(args, batch, k, s) for s in args.seeds])
            if not records:
                continue
            rows.append(["VRLAMB", batch, k, *interval_cells(records)])
            for name, reference in ((f"VRLAMB k={k} - VRLAMB k=1", every), (f"VRLAMB k={k} - LAMB", lamb)):
                loss = paired_differences(records, reference, final_of("heldout_loss"))
                if loss:
                    acc = paired_differences(records, reference, final_of("heldout_acc"))
                    deltas.append([batch, name, len(loss), fmt_mean_std(loss, digits=4), fmt_mean_std(acc, 100, 2),
                                   " ".join(f"{d:+.4f}" for d in loss)])
    if not rows:
        raise SystemExit("no cached runs for the interval comparison: run --experiment main and interval first")
    markdown = "\n\n".join([
        (f"Final held-out MLM loss and accuracy, mean ± std over seeds ({', '.join(map(str, args.seeds))}); "
         f"k = gsnr_interval (GSNR statistics on every k-th step, rho held in between)."),
        table(["optimizer", "batch", "k", "seeds", "held-out loss", "held-out acc %", "train loss", "wall s/run"],
              rows),
        "Same-seed differences (mean ± std over seed pairs, then each pair's loss difference by seed):",
        table(["batch", "difference", "seed pairs", "Δ held-out loss", "Δ held-out acc pp", "Δ loss per seed"],
              deltas),
    ])
    update_results_doc("mlm_gsnr_interval", markdown, args.doc)
    return markdown


def interval_cells(records: list[dict]) -> list[str]:
    """Seeds, final held-out loss and accuracy, train loss (mean ± std over seeds) and wall time of runs."""
    return [len(records), fmt_mean_std((r["final"]["heldout_loss"] for r in records), digits=4),
            fmt_mean_std((r["final"]["heldout_acc"] for r in records), 100, 2),
            fmt_mean_std((r["final"]["train_loss"] for r in records), digits=4),
            f"{mean_std(r['wall_s'] for r in records)[0]:.0f}"]


def total_wall_minutes(args) -> float:
    """Summed wall time of all cached runs in ``--results``, in minutes."""
    total = 0.0
    for name in os.listdir(args.results):
        with open(os.path.join(args.results, name)) as f:
            total += json.load(f)["wall_s"]
    return total / 60


def report(args) -> str:
    """Markdown of all tables and plots from the cached runs; also written into ``--doc``'s generated block."""
    runs = {(opt, batch): records_of(args, [base_spec(args, opt, batch, s) for s in args.seeds])
            for batch in args.batches for opt in ("LAMB", "VRLAMB")}
    if not all(runs.values()):
        raise SystemExit("the main experiment has no cached runs for some settings: run --experiment main first")
    targets = {batch: final_mean(runs[("LAMB", batch)], "heldout_loss") for batch in args.batches}
    markdown = "\n\n".join([
        "#### Main comparison (mean ± std over seeds)", main_table(runs, targets),
        ("#### VRLAMB relative to LAMB\n\nΔ = VRLAMB - LAMB of the same seed, mean ± std over seed pairs; "
         "the step ratios come from the seed-mean curves."), ratio_table(args, runs, targets),
        f"![held-out loss curves]({plot_curves(args, runs, targets)})",
        f"#### gamma sweep: n = {args.n} (gamma 0 = LAMB)", sweep_table(args, "gamma", [0.0, *args.gammas], targets),
        f"#### n sweep: gamma = {args.gamma}, global batch fixed", sweep_table(args, "n", args.ns, targets),
        f"![gamma and n sweeps]({plot_sweeps(args)})",
        f"#### lr grid: LAMB, batch {args.moderate_batch}, seed 0", lr_table(args),
        (f"{len(os.listdir(args.results))} runs cached in `{os.path.relpath(args.results, REPO)}`; their wall "
         f"times add up to {total_wall_minutes(args):.0f} min."),
    ])
    update_results_doc("mlm_large_batch", markdown, args.doc)
    return markdown


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=EXPERIMENTS, help="train the runs of one experiment")
    p.add_argument("--report", action="store_true", help="tables and plots from the cached runs")
    p.add_argument("--quick", action="store_true", help="smoke test: small data, few steps, all in a temp dir")
    p.add_argument("--data", default=os.path.join(REPO, "runs", "mlm_large_batch", "data"),
                   help="prepared data directory (created on first use)")
    p.add_argument("--corpus", nargs="+", help="text files for the data preparation (default: stdlib docstrings)")
    p.add_argument("--max-bytes", type=int, help="use only the first N bytes of the default corpus")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--samples", type=int, default=40960, help="training sequences per run")
    p.add_argument("--batches", type=comma_ints, default=[64, 256, 512],
                   help="global batches of main: the first is the moderate one (lr reference), the last the large "
                        "one (sweeps)")
    p.add_argument("--n", type=int, default=8, help="micro-batches (GSNR samples) per step")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.02,
                   help="peak lr at the moderate batch, sqrt-scaled to the others (0.02: the best of the lr grid)")
    p.add_argument("--lrs", type=comma_floats, default=[2.5e-3, 5e-3, 1e-2, 2e-2], help="grid of --experiment lr")
    p.add_argument("--seeds", type=comma_ints, default=[0, 1, 2])
    p.add_argument("--sweep-seeds", type=comma_ints, default=[0])
    p.add_argument("--sweep-batches", type=comma_ints,
                   help="batches of the sweeps (default: the first and the last of --batches)")
    p.add_argument("--gammas", type=comma_floats, default=[0.05, 0.1, 0.3, 1.0])
    p.add_argument("--ns", type=comma_ints, default=[2, 4, 8, 16])
    p.add_argument("--gsnr-interval", type=int, default=1,
                   help="VRLAMB's gsnr_interval in every experiment (GSNR statistics every k-th step; 1: every step)")
    p.add_argument("--intervals", type=comma_ints, default=[10], help="gsnr_interval values of --experiment interval")
    p.add_argument("--interval-batches", type=comma_ints,
                   help="batches of --experiment interval (default: the moderate one, the first of --batches)")
    p.add_argument("--eval-points", type=int, default=16)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--results", default=os.path.join(HERE, "results", "mlm_large_batch"))
    p.add_argument("--doc", default=RESULTS_DOC, help="markdown file whose generated block --report replaces")
    p.add_argument("--img-dir", default=IMAGES)
    p.add_argument("--force", action="store_true", help="retrain cached runs")
    args = p.parse_args(argv)
    if args.quick:
        quick = tempfile.mkdtemp(prefix="mlm_large_batch_quick_")
        args.__dict__.update(data=os.path.join(quick, "data"), results=os.path.join(quick, "results"),
                             doc=os.path.join(quick, "results.md"), img_dir=os.path.join(quick, "img"),
                             max_bytes=args.max_bytes or 300_000, samples=256, batches=[16, 64],
                             n=4, seeds=[0], sweep_seeds=[0], gammas=[0.3], ns=[2], lrs=[args.lr], eval_points=2,
                             intervals=[3])
    args.moderate_batch, args.large_batch = args.batches[0], args.batches[-1]
    args.sweep_batches = args.sweep_batches or sorted({args.moderate_batch, args.large_batch})
    args.interval_batches = args.interval_batches or [args.moderate_batch]
    if not set(args.sweep_batches) <= set(args.batches) or not set(args.interval_batches) <= set(args.batches):
        p.error("every --sweep-batches and --interval-batches must be one of --batches (its LAMB runs are the "
                "reference)")
    if args.gsnr_interval < 1 or min(args.intervals) < 1:
        p.error("--gsnr-interval and --intervals must be >= 1")
    if any(batch % n for batch in args.batches for n in [args.n, *args.ns]):
        p.error("every --batches must be a multiple of --n and of every --ns")
    args.fingerprint = None  # set by ensure_data
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.fingerprint = data_fingerprint(ensure_data(args))
    experiments = EXPERIMENTS if args.quick else [args.experiment] if args.experiment else []
    for args.experiment in experiments:
        run_experiment(args)
    if "interval" in experiments:
        print(interval_report(args))
    if args.report or args.quick:
        print(report(args))
        print(f"\nreport written to {args.doc}")
    elif not experiments:
        raise SystemExit("nothing to do: pass --experiment NAME, --report or --quick (see --help)")


if __name__ == "__main__":
    main()
