"""GSNR staleness on a real BERT: how close is the rho of k steps ago to the fresh one?

    python benchmarks/gsnr_staleness.py                  # main's VRLAMB B64 run, seed 0 (640 steps, ~5 min on one core)
    python benchmarks/gsnr_staleness.py --quick          # smoke test (~1 min), writes to a temp dir
    python benchmarks/gsnr_staleness.py --report         # the table again, from the JSON

What it answers: ``gsnr_interval = k`` takes GSNR statistics on every k-th
step only and applies the rho of the last statistics step in between
(docs/design.md §2, "The statistics schedule"), so a held rho is 0 to k - 1
steps old. How far is it from the rho the step would have computed?

The run: exactly one run of ``benchmarks/mlm_large_batch.py``'s main
experiment, trained by its own ``train_run`` (same data, model, loss,
schedule, seeds): VRLAMB, gamma 0.1, statistics on every step
(gsnr_interval 1), by default its moderate batch (B = 64, n = 8 micro-batches
= GSNR samples, peak lr 0.02, warmup/poly schedule, 40,960 sequences = 640
steps), seed 0. The only change: the optimizer is a VRLAMB subclass whose
``_direction`` (where the rule receives rho, as in
tests/math/test_gsnr_real_bert.py) copies every element's rho into a ring
buffer of the last max(--lags) + 1 steps (fp32, 1.54 M elements each). The
run's final held-out loss is compared with main's cached record of the same
run id, when there is one: recording must not change the training.

Measured, for each lag k in ``--lags`` and each window of steps t in
``--windows`` (every t of a window is compared for every k, so t > max k):
over all elements and the window's steps, the fraction with
|rho_t - rho_{t-k}| <= 1e-3 and <= 1e-2 and the mean |rho_t - rho_{t-k}|;
the correlation of (rho_t - 1) with (rho_{t-k} - 1) (uncentred, i.e. the
cosine: deviations from the base optimizer's rho = 1; per step, then the
mean over the window); and sum (rho_t - rho_{t-k})^2 / sum (rho_t - 1)^2 (the
squared error of the held rho relative to that of rho = 1: below 1 the held
rho is closer to the fresh one than no VR at all). Baseline row: the same
numbers for rho = 1 in place of rho_{t-k}, what the base optimizer applies.
The same figures for the word embeddings (tied to the MLM decoder; 1.05 M of
the 1.54 M elements) and for the other tensors are in the JSON.

Results: ``benchmarks/results/gsnr_staleness.json``; the table is printed
and written into the generated block ``gsnr_staleness`` of docs/results.md.
The training cost of a held rho (held-out loss at k = 10 vs 1 vs LAMB) is
``mlm_large_batch.py --experiment interval``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from unittest import mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mlm_large_batch
from _experiments import REPO, RESULTS_DOC, comma_ints, update_results_doc
from _timing import machine, table, write_json

from ds_vrgd.optim import VRLAMB

TOLERANCES = (1e-3, 1e-2)
BASE = 0  # the lag key of the baseline, rho = 1


class Staleness:
    """Every element's rho of the last ``depth + 1`` steps and, for the steps of the windows, the comparisons
    of rho_t with rho_{t-k} (k in ``lags``) and with 1, summed per window and element group."""

    def __init__(self, lags: list[int], windows: list[tuple[int, int]], vocab_size: int):
        self.lags, self.windows, self.vocab_size = lags, windows, vocab_size
        self.depth = max(lags) + 1
        self.offsets: dict[int, int] = {}  # id(parameter) -> its first element in the flat buffer
        self.total = 0
        self.groups: dict[str, list[tuple[int, int]]] = {}
        self.ring: torch.Tensor | None = None
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.step = 0
        self.sums: dict = {}  # (window, lag, group) -> running sums

    def receive(self, pieces, rho) -> None:
        """The rho a rule received for ``pieces`` this step (copied: the rule may write over it)."""
        for piece, r in zip(pieces, rho):
            if id(piece.owner) not in self.offsets:
                if self.ring is not None:
                    raise RuntimeError("a parameter got its first rho after step 1")
                self.offsets[id(piece.owner)] = self.total
                self.total += piece.owner.numel()
                name = "word embeddings" if piece.owner.shape == (self.vocab_size, piece.owner.shape[-1]) else "other"
                self.groups.setdefault(name, []).append((self.offsets[id(piece.owner)], self.total))
            self.pending.append((self.offsets[id(piece.owner)] + piece.offset, r.detach().reshape(-1).float().clone()))

    def end_step(self) -> None:
        """File this step's rho; compare it with the earlier ones if the step lies in a window."""
        self.step += 1
        if self.ring is None:
            self.ring = torch.full((self.depth, self.total), float("nan"))
            self.groups = {"all": [(0, self.total)], **self.groups}
        current = self.ring[self.step % self.depth]
        current.fill_(float("nan"))
        for start, r in self.pending:
            current[start:start + r.numel()] = r
        self.pending = []
        if torch.isnan(current).any():
            raise RuntimeError(f"step {self.step}: some elements got no rho (a step without GSNR?)")
        windows = [w for w in self.windows if w[0] <= self.step <= w[1]]
        if not windows:
            return
        fresh = current - 1.0
        for lag in [BASE, *self.lags]:
            held = torch.zeros_like(fresh) if lag == BASE else self.ring[(self.step - lag) % self.depth] - 1.0
            for name, ranges in self.groups.items():
                figures = compare(torch.cat([fresh[a:b] for a, b in ranges]), torch.cat([held[a:b] for a, b in ranges]))
                for window in windows:
                    into = self.sums.setdefault((window, lag, name), dict.fromkeys(figures, 0.0))
                    for key, value in figures.items():
                        into[key] += value

    def summary(self) -> list[dict]:
        """One dict per (window, lag, group): the module docstring's figures."""
        out = []
        for (window, lag, name), s in self.sums.items():
            out.append({"window": list(window), "lag": lag, "group": name, "steps": s["steps"],
                        "elements_per_step": s["elements"] / s["steps"],
                        **{f"frac_within_{tol:g}": s[f"within_{tol:g}"] / s["elements"] for tol in TOLERANCES},
                        "mean_abs_diff": s["abs_diff"] / s["elements"],
                        "correlation": s["cosine"] / s["steps"] if lag != BASE else None,
                        "sq_error_vs_base": s["sq_diff"] / s["sq_fresh"],
                        "mean_abs_rho_minus_1": s["abs_fresh"] / s["elements"]})
        return out


def compare(fresh: torch.Tensor, held: torch.Tensor) -> dict[str, float]:
    """Sums over the elements of one step: fresh = rho_t - 1, held = rho_{t-k} - 1 (or 0 for rho = 1)."""
    fresh, held = fresh.double(), held.double()
    diff = (fresh - held).abs()
    norms = (fresh.square().sum() * held.square().sum()).sqrt()
    return {"steps": 1, "elements": fresh.numel(),
            **{f"within_{tol:g}": (diff <= tol).sum().item() for tol in TOLERANCES},
            "abs_diff": diff.sum().item(), "sq_diff": diff.square().sum().item(),
            "sq_fresh": fresh.square().sum().item(), "abs_fresh": fresh.abs().sum().item(),
            "cosine": ((fresh * held).sum() / norms).item() if norms > 0 else 0.0}


def recording_vrlamb(tracker: Staleness) -> type:
    """VRLAMB that hands every rho its rule receives to ``tracker`` (the training itself is unchanged)."""

    class RecordingVRLAMB(VRLAMB):
        def _direction(self, group, block, rho, ops):
            if rho is not None:
                tracker.receive(block.pieces, rho)
            return super()._direction(group, block, rho, ops)

        def step(self, closure=None):
            loss = super().step(closure)
            tracker.end_step()
            return loss

    return RecordingVRLAMB


def parse_windows(text: str, steps: int) -> list[tuple[int, int]]:
    """'21-60,101-200,last100' -> [(21, 60), (101, 200), (steps - 99, steps)] (inclusive step ranges)."""
    windows = []
    for part in text.split(","):
        if part.startswith("last"):
            windows.append((steps - int(part[4:]) + 1, steps))
        else:
            first, last = part.split("-")
            windows.append((int(first), int(last)))
    return windows


# --------------------------------------------------------------------------- run and report


def run(args) -> dict:
    mlm_args = mlm_large_batch.parse_args(args.mlm_args)
    meta = mlm_large_batch.ensure_data(mlm_args)
    mlm_args.fingerprint = mlm_large_batch.data_fingerprint(meta)
    spec = mlm_large_batch.base_spec(mlm_args, "VRLAMB", mlm_args.moderate_batch, args.seed)
    windows = parse_windows(args.windows, spec.steps)
    if min(first for first, _ in windows) <= max(args.lags) or max(last for _, last in windows) > spec.steps:
        raise SystemExit(f"windows {windows} must lie after step {max(args.lags)} (the largest lag) and within "
                         f"the run's {spec.steps} steps")
    tracker = Staleness(args.lags, windows, meta["vocab_size"])
    torch.set_num_threads(args.threads)
    print(f"training {spec.run_id()} ({spec.steps} steps), recording rho of every step", flush=True)
    with mock.patch.object(mlm_large_batch, "VRLAMB", recording_vrlamb(tracker)):
        record = mlm_large_batch.train_run((spec, mlm_args.data, mlm_args.eval_points))
    cached = mlm_large_batch.load_run(mlm_args, spec)
    final = record["final"]["heldout_loss"]
    check = None if cached is None else {
        "cached_record": os.path.relpath(mlm_large_batch.run_path(mlm_args, spec), REPO),
        "cached_heldout_loss": cached["final"]["heldout_loss"], "heldout_loss": final,
        "difference": final - cached["final"]["heldout_loss"],
        "identical_curve": [p["heldout_loss"] for p in record["curve"]] == [p["heldout_loss"] for p in cached["curve"]]}
    return {"spec": record["spec"], "run_id": spec.run_id(), "steps": spec.steps, "lags": args.lags,
            "windows": [list(w) for w in windows], "tolerances": list(TOLERANCES),
            "elements": tracker.total,
            "group_elements": {name: sum(b - a for a, b in ranges) for name, ranges in tracker.groups.items()},
            "results": tracker.summary(), "final": record["final"], "curve": record["curve"],
            "versus_cached_run": check, "wall_s": record["wall_s"], "machine": machine(),
            "command": shlex.join(["python", os.path.relpath(__file__, REPO), *sys.argv[1:]])}


def report(payload: dict, group: str = "all") -> str:
    """The table of ``group``'s figures: a row per window and lag, the baseline (rho = 1) first."""
    rows = []
    for r in payload["results"]:
        if r["group"] != group:
            continue
        first, last = r["window"]
        rows.append([f"{first}-{last}", "rho = 1 (base optimizer)" if r["lag"] == BASE else f"rho_(t-{r['lag']})",
                     *(f"{100 * r[f'frac_within_{tol:g}']:.1f}" for tol in payload["tolerances"]),
                     f"{r['mean_abs_diff']:.4f}", "—" if r["correlation"] is None else f"{r['correlation']:.3f}",
                     f"{r['sq_error_vs_base']:.3f}"])
    headers = ["steps t", "rho_t compared with", "Δ within ±1e-3 (% of elements)", "Δ within ±1e-2 (%)",
               "mean abs Δ", "corr(rho_t - 1, · - 1)", "Σ Δ² / Σ (rho_t - 1)²"]
    spec = payload["spec"]
    head = (f"VRLAMB (gamma {spec['gamma']:g}, gsnr_interval 1), BERT-{spec['preset']} MLM, B = {spec['batch']}, "
            f"n = {spec['n']}, peak lr {spec['lr']:.3g}, {payload['steps']} steps, seed {spec['seed']}; "
            f"{payload['group_elements'][group]:,} elements ({group}); Δ = rho_t minus the compared rho, pooled over "
            f"the window's elements and steps; corr: uncentred, per step, mean over the window.")
    split = group_table(payload, [g for g in payload["group_elements"] if g != group])
    check = payload["versus_cached_run"]
    tail = "" if check is None else (
        f"\n\nThe recorded run's final held-out loss {check['heldout_loss']:.6f} vs the cached record of the same "
        f"run id{' (`' + check['cached_record'] + '`)' if 'cached_record' in check else ''}, trained without "
        f"recording: {check['cached_heldout_loss']:.6f}, difference {check['difference']:.3g}"
        f"{' (the whole held-out curve identical)' if check['identical_curve'] else ''}.")
    return head + "\n\n" + table(headers, rows) + "\n\n" + split + tail


def group_table(payload: dict, groups: list[str]) -> str:
    """Per window and element group: for each lag, 'Δ within ±1e-3 (%) / corr'."""
    by_key = {(tuple(r["window"]), r["group"], r["lag"]): r for r in payload["results"]}
    rows = []
    for window in map(tuple, payload["windows"]):
        for group in groups:
            rows.append([f"{window[0]}-{window[1]}", f"{group} ({payload['group_elements'][group]:,})"]
                        + [f"{100 * by_key[window, group, lag]['frac_within_0.001']:.1f} / "
                           f"{by_key[window, group, lag]['correlation']:.2f}" for lag in payload["lags"]])
    return ("The same by element group, for each k: Δ within ±1e-3 (% of elements) / "
            "corr(rho_t - 1, rho_(t-k) - 1).\n\n"
            + table(["steps t", "elements"] + [f"k = {lag}" for lag in payload["lags"]], rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true", help="print the table from --output, train nothing")
    p.add_argument("--quick", action="store_true", help="smoke test: small data, 24 steps, all in a temp dir")
    p.add_argument("--lags", type=comma_ints, default=[1, 2, 5, 10, 20], help="k: compare rho_t with rho_(t-k)")
    p.add_argument("--windows", default="21-60,101-200,last100",
                   help="inclusive step ranges of t, comma-separated; lastN = the last N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--mlm-args", default="--batches 64,512",
                   help="arguments of mlm_large_batch.py that set data, model and recipe (its first batch is run)")
    p.add_argument("--output", default=os.path.join(HERE, "results", "gsnr_staleness.json"))
    p.add_argument("--doc", default=RESULTS_DOC, help="markdown file whose generated block gsnr_staleness is replaced")
    args = p.parse_args(argv)
    args.mlm_args = args.mlm_args.split()
    if args.quick:
        quick = tempfile.mkdtemp(prefix="gsnr_staleness_quick_")
        args.mlm_args = ["--data", os.path.join(quick, "data"), "--results", os.path.join(quick, "results"),
                         "--max-bytes", "300000", "--samples", "384", "--batches", "16", "--n", "4",
                         "--eval-points", "2"]
        args.__dict__.update(lags=[1, 2, 5], windows="6-12,last8", output=os.path.join(quick, "staleness.json"),
                             doc=os.path.join(quick, "results.md"))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        with open(args.output) as f:
            payload = json.load(f)
    else:
        began = time.perf_counter()
        payload = run(args)
        write_json(args.output, payload)
        print(f"wrote {args.output} ({time.perf_counter() - began:.0f} s)")
    markdown = report(payload)
    update_results_doc("gsnr_staleness", markdown, args.doc)
    print(markdown)
    print(f"\nreport written to {args.doc}")


if __name__ == "__main__":
    main()
