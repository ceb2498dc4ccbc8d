"""Generalisation gap across batch sizes on scikit-learn's digits: SGD vs VRSGD, Adam vs VRAdam.

    python benchmarks/generalization_digits.py --quick            # smoke test (seconds), temp dir
    python benchmarks/generalization_digits.py --jobs 2           # all runs -> benchmarks/results/generalization_digits.json
    python benchmarks/generalization_digits.py --report           # tables + plot from that JSON -> docs/

Data: the 1,797 8x8 digits that ship with scikit-learn, pixels / 16, one
stratified split (random_state 0) of 1,280 train / 517 test images. Model:
MLP 64-256-256-10 (ReLU), initialised from the seed. Optimizers: VRSGD
(momentum 0.9) and VRAdam; the base rows are the same classes with
``vr=False``, i.e. torch.optim.SGD / Adam exactly. No weight decay.

Step: a batch of B images split into n = ``--n`` equal micro-batches, one
backward pass each (loss / n), then one step; with VR the n passes are the
step's n GSNR samples (as n data-parallel ranks x accumulation give). Batch
sizes from ``--batches`` up to the full training set (1,280). Learning rate:
``--lr-sgd`` / ``--lr-adam`` at the smallest batch, scaled with sqrt(B)
(not tuned per batch; the same for base and VR). Budgets (``--budgets``):
``epochs`` = the same number of epochs at every batch (larger batch, fewer
steps: the usual large-batch setting) and ``steps`` = the same number of
steps (every batch size trained to convergence, so the gap is not an
artefact of under-training). Same seed = same initial weights and the same
example order for base and VR.

Reported per run, after the last step: train and test accuracy and loss
on the whole splits, gap = train - test accuracy (pp) and test - train loss;
tables are mean ± std over ``--seeds``; "gap change" is the mean VR gap
relative to the mean base gap (the paper reports >65% smaller gaps) and
"Δ gap (paired)" the VR - base gap of the same seed, mean ± std.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _experiments import (
    IMAGES,
    RESULTS_DOC,
    accumulated_step,
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

from ds_vrgd.optim import VRSGD, VRAdam
from ds_vrgd.pretrain.train import rank_micro_batches

TRAIN_SIZE = 1280
RULES = ("SGD", "Adam")


@dataclass(frozen=True)
class DigitsRun:
    """One training run; ``length`` counts epochs or steps as ``budget`` says."""

    rule: str  # "SGD" or "Adam"
    vr: bool
    batch: int
    n: int  # micro-batches per step = GSNR samples
    gamma: float
    lr: float
    seed: int
    budget: str  # "epochs" or "steps"
    length: int

    @property
    def steps(self) -> int:
        return self.length * (TRAIN_SIZE // self.batch) if self.budget == "epochs" else self.length

    @property
    def label(self) -> str:
        return ("VR" if self.vr else "") + self.rule


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((x_train, y_train), (x_test, y_test)): the stratified 1,280 / 517 split, pixels in [0, 1]."""
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, train_size=TRAIN_SIZE, stratify=data.target, random_state=0)
    return ((torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train)),
            (torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test)))


def mlp(seed: int) -> torch.nn.Module:
    """MLP 64-256-256-10 with torch's default init drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, 10))


def optimizer(spec: DigitsRun, params) -> torch.optim.Optimizer:
    """VRSGD (momentum 0.9) or VRAdam with the run's lr, gamma and vr."""
    if spec.rule == "SGD":
        return VRSGD(params, lr=spec.lr, momentum=0.9, gamma=spec.gamma, vr=spec.vr)
    return VRAdam(params, lr=spec.lr, gamma=spec.gamma, vr=spec.vr)


@torch.no_grad()
def accuracy_and_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return (logits.argmax(1) == y).float().mean().item(), torch.nn.functional.cross_entropy(logits, y).item()


def train_digits(spec: DigitsRun) -> dict:
    """Train one run; returns its record (spec, final train/test accuracy and loss, gaps, GSNR stats, wall time)."""
    began = time.perf_counter()
    (x, y), (x_test, y_test) = digits()
    model = mlp(spec.seed)
    opt = optimizer(spec, model.parameters())
    order = rank_micro_batches(len(y), 0, 1, spec.batch // spec.n, spec.seed, 0)

    def loss_of(rows: list[int]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x[rows]), y[rows])

    for _ in range(spec.steps):
        accumulated_step(opt, [next(order) for _ in range(spec.n)], loss_of)
    train_acc, train_loss = accuracy_and_loss(model, x, y)
    test_acc, test_loss = accuracy_and_loss(model, x_test, y_test)
    stats = opt.gsnr_stats(micro_batch_size=spec.batch // spec.n) if spec.vr else {}
    return {"spec": asdict(spec), "steps": spec.steps, "train_acc": train_acc, "test_acc": test_acc,
            "gap_acc": train_acc - test_acc, "train_loss": train_loss, "test_loss": test_loss,
            "gap_loss": test_loss - train_loss, "frac_at_bounds": stats.get("frac_low", 0) + stats.get("frac_high", 0),
            "b_simple": stats.get("b_simple"), "wall_s": time.perf_counter() - began}


def run_specs(args) -> list[DigitsRun]:
    """Every (budget, rule, batch, seed), base and VR; larger batches first so the parallel pool ends evenly."""
    smallest = min(args.batches)
    lengths = {"epochs": args.epochs, "steps": args.steps}
    return [DigitsRun(rule, vr, batch, args.n, args.gamma, sqrt_scaled_lr(args.lr[rule], batch, smallest), seed,
                      budget, lengths[budget])
            for budget in args.budgets for rule in RULES for batch in sorted(args.batches, reverse=True)
            for seed in args.seeds for vr in (False, True)]


def groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped by (budget, rule, batch, vr), in the order of the table."""
    keyed = {}
    for run in sorted(runs, key=lambda r: (r["spec"]["budget"], RULES.index(r["spec"]["rule"]), r["spec"]["batch"],
                                           r["spec"]["vr"])):
        s = run["spec"]
        keyed.setdefault((s["budget"], s["rule"], s["batch"], s["vr"]), []).append(run)
    return keyed


def gap_of(record: dict) -> float:
    return record["gap_acc"]


def gap_change(vr: list[dict], base: list[dict]) -> str:
    """Mean VR gap relative to the mean base gap, as a signed percentage ('—' when the base gap is <= 0)."""
    base_gap, vr_gap = mean_std(r["gap_acc"] for r in base)[0], mean_std(r["gap_acc"] for r in vr)[0]
    return f"{100 * (vr_gap / base_gap - 1):+.0f}%" if base_gap > 0 else "—"


def budget_table(grouped: dict, budget: str, length: int) -> str:
    rows = []
    for (b, rule, batch, vr), records in grouped.items():
        if b != budget:
            continue
        base = grouped[(b, rule, batch, False)]
        rows.append([("VR" if vr else "") + rule, batch, records[0]["steps"], f"{records[0]['spec']['lr']:.3g}",
                     len(records), fmt_mean_std((r["train_acc"] for r in records), 100, 2),
                     fmt_mean_std((r["test_acc"] for r in records), 100, 2),
                     fmt_mean_std((r["gap_acc"] for r in records), 100, 2), gap_change(records, base) if vr else "",
                     fmt_mean_std(paired_differences(records, base, gap_of), 100, 2) if vr else "",
                     fmt_mean_std(r["gap_loss"] for r in records), fmt_mean_std(r["test_loss"] for r in records),
                     fmt_mean_std(r["frac_at_bounds"] for r in records) if vr else "",
                     f"{sum(r['wall_s'] for r in records):.0f}"])
    return table(["optimizer", "batch", "steps", "lr", "seeds", "train acc %", "test acc %", "gap (acc pp)",
                  "gap change", "Δ gap pp (paired)", "gap (loss)", "test loss", "rho at bounds", "wall s (all seeds)"], rows,
                 f"##### same {budget} ({length} {budget}) at every batch size")


def plot(grouped: dict, budgets: list[str], args) -> str:
    """Test accuracy and gap against batch size, one row of panels per budget (mean; bars ± std)."""
    plt = pyplot()
    figure, axes = plt.subplots(len(budgets), 2, figsize=(11, 3.6 * len(budgets)), squeeze=False)
    for row, budget in zip(axes, budgets):
        for ax, metric, label in ((row[0], "test_acc", "test accuracy %"), (row[1], "gap_acc", "gap: train - test (pp)")):
            for rule, color in (("SGD", "tab:blue"), ("Adam", "tab:red")):
                for vr, style in ((False, "--"), (True, "-")):
                    keys = sorted(k for k in grouped if k[0] == budget and k[1] == rule and k[3] == vr)
                    stats = [mean_std(100 * r[metric] for r in grouped[k]) for k in keys]
                    ax.errorbar([k[2] for k in keys], [m for m, _ in stats], yerr=[s for _, s in stats],
                                fmt="o" + style, color=color, capsize=3, label=("VR" if vr else "") + rule)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
            ax.set_title(f"same {budget}")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    figure.suptitle("digits MLP: base vs VR optimizer across batch sizes (mean ± std over seeds)")
    return save_figure(figure, "digits_generalization", args.img_dir, args.doc)


def report(args) -> str:
    """Tables and plot from the results JSON; also written into ``--doc``'s generated block."""
    with open(args.out) as f:
        result = json.load(f)
    settings = result["settings"]
    grouped = groups(result["runs"])
    lengths = {"epochs": settings["epochs"], "steps": settings["steps"]}
    sections = [budget_table(grouped, budget, lengths[budget]) for budget in settings["budgets"]]
    sections.append(f"![digits generalisation]({plot(grouped, settings['budgets'], args)})")
    sections.append(f"{len(result['runs'])} runs; total wall time {result['wall_s'] / 60:.1f} min "
                    f"({settings['jobs']} process(es), 1 torch thread each). Command: `{result['command']}`")
    markdown = "\n\n".join(sections)
    update_results_doc("generalization_digits", markdown, args.doc)
    return markdown


def run_all(args) -> None:
    """Train every run (``--jobs`` at a time) and write the results JSON."""
    began = time.perf_counter()
    runs = []
    for spec, record in run_parallel(train_digits, run_specs(args), args.jobs):
        runs.append(record)
        print(f"{spec.budget:6s} {spec.label:7s} B={spec.batch:5d} seed={spec.seed} steps={spec.steps:5d} "
              f"train {100 * record['train_acc']:.2f} test {100 * record['test_acc']:.2f} "
              f"gap {100 * record['gap_acc']:.2f}  ({record['wall_s']:.1f} s)", flush=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "doc", "img_dir", "report")}
    write_json(args.out, {"command": "python benchmarks/generalization_digits.py " + " ".join(args.argv),
                          "settings": settings, "machine": machine(), "wall_s": time.perf_counter() - began,
                          "runs": runs})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true", help="only tables and plot from the results JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, few steps, all in a temp dir")
    p.add_argument("--batches", type=comma_ints, default=[40, 160, 640, TRAIN_SIZE])
    p.add_argument("--seeds", type=comma_ints, default=[0, 1, 2, 3, 4])
    p.add_argument("--budgets", nargs="+", choices=["epochs", "steps"], default=["epochs", "steps"])
    p.add_argument("--epochs", type=int, default=60, help="length of the epochs budget")
    p.add_argument("--steps", type=int, default=600, help="length of the steps budget")
    p.add_argument("--n", type=int, default=8, help="micro-batches (GSNR samples) per step")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--lr-sgd", type=float, default=0.05, help="at the smallest batch (momentum 0.9)")
    p.add_argument("--lr-adam", type=float, default=1e-3, help="at the smallest batch")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, 1 torch thread each)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "generalization_digits.json"))
    p.add_argument("--doc", default=RESULTS_DOC, help="markdown file whose generated block the report replaces")
    p.add_argument("--img-dir", default=IMAGES)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.quick:
        quick = tempfile.mkdtemp(prefix="generalization_digits_quick_")
        args.__dict__.update(seeds=[0], epochs=2, steps=5, batches=[160, TRAIN_SIZE], out=os.path.join(quick, "r.json"),
                             doc=os.path.join(quick, "results.md"), img_dir=os.path.join(quick, "img"))
    if any(TRAIN_SIZE % b or b % args.n for b in args.batches):
        p.error(f"every batch must divide the training set ({TRAIN_SIZE}) and be a multiple of --n {args.n}")
    args.lr = {"SGD": args.lr_sgd, "Adam": args.lr_adam}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.report:
        run_all(args)
    print(report(args))
    print(f"\nreport written to {args.doc}")


if __name__ == "__main__":
    main()
