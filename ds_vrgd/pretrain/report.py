"""Run records of BERT pretraining: the JSONL log, summary.json and the loss/GSNR plot.

The log (``log.jsonl`` in the output directory) holds one JSON object per line, ``"event": "train"``
(with the GSNR statistics of :data:`ds_vrgd.gsnr.LOG_FIELDS`) or ``"eval"``; non-finite numbers are
written as null. The fields: docs/pretraining.md, "2. Training".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

LOG = "log.jsonl"
SUMMARY = "summary.json"
PLOT = "training.png"


def clean(value):
    """``value`` with non-finite floats (nested in dicts/lists too) replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def append_record(output: str | Path, record: dict) -> None:
    """Append one record to the run's log."""
    with open(Path(output, LOG), "a") as f:
        f.write(json.dumps(clean(record)) + "\n")


def read_records(output: str | Path) -> list[dict]:
    """All records of the run's log, in order (empty if there is no log)."""
    path = Path(output, LOG)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trim_log(output: str | Path, step: int) -> None:
    """Drop the records after ``step`` (a resumed run repeats the steps after its checkpoint)."""
    kept = [r for r in read_records(output) if r["step"] <= step]
    Path(output, LOG).write_text("".join(json.dumps(r) + "\n" for r in kept))


def write_summary(output: str | Path, summary: dict) -> Path:
    """Write summary.json (indented, strict JSON); returns its path."""
    path = Path(output, SUMMARY)
    path.write_text(json.dumps(clean(summary), indent=2) + "\n")
    return path


def format_summary(summary: dict) -> str:
    """The summary in a few lines for the terminal, ending with the paths of summary.json and the plot."""
    s, gsnr = summary, summary["gsnr"]
    lines = [
        f"{s['model']} BERT ({s['parameters']:,} parameters), {s['optimizer_label']}, ZeRO-{s['zero_stage']}, "
        f"{s['precision']}, {s['steps']} steps of {s['global_batch_size']} sequences x {s['seq_len']} tokens "
        f"({s['micro_batch_size']} x {s['gradient_accumulation_steps']} accumulation x {s['world_size']} ranks)",
        f"train MLM loss {_number(s['initial_train_loss'])} -> {_number(s['final_train_loss'])}; held-out MLM loss "
        f"{_number(s['eval_mlm_loss'])}, accuracy {_number(s['eval_mlm_accuracy'])}",
        f"{_number(s['samples_per_second'], '.1f')} samples/s, {_number(s['tokens_per_second'], ',.0f')} tokens/s",
    ]
    if gsnr["gsnr_mean"] is not None:
        lines.append(
            f"last step: GSNR from n={gsnr['gsnr_n']} samples, layer mean {gsnr['gsnr_mean']:.3g}, "
            f"{gsnr['gsnr_frac_low']:.0%} of elements at the lower bound and {gsnr['gsnr_frac_high']:.0%} at the "
            f"upper, {_number(gsnr.get('gsnr_frac_capped'), '.0%')} at the GSNR cap; B_simple {_number(gsnr['b_simple'], '.3g')}"
        )
    return "\n".join(lines + [f"summary: {Path(s['log']).with_name(SUMMARY)}", f"plot: {s['plot']}"])


def _number(value, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``, or "n/a" for None."""
    return "n/a" if value is None else format(value, spec)


def rolling_median(values: list[float | None], window: int) -> list[float]:
    """Median of each value and up to ``window - 1`` before it, ignoring None (nan where all are None)."""
    medians = []
    for end in range(1, len(values) + 1):
        present = sorted(v for v in values[max(0, end - window) : end] if v is not None)
        medians.append(present[len(present) // 2] if present else math.nan)
    return medians


def plot_run(output: str | Path, title: str) -> Path:
    """PNG of the log: train/eval MLM loss (top) and GSNR mean / B_simple (bottom) over steps; returns its path.

    The GSNR statistics of single steps scatter over orders of magnitude, so
    each is drawn faintly with its rolling median (window: 1/25 of the steps).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(output)
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval" and r["eval_mlm_loss"] is not None]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train MLM loss")
    top.plot([r["step"] for r in evals], [r["eval_mlm_loss"] for r in evals], "o-", label="held-out MLM loss")
    top.set_ylabel("loss")
    top.set_title(title)
    top.legend()
    gsnr = [r for r in train if r.get("gsnr_mean") is not None]
    if gsnr:
        steps = [r["step"] for r in gsnr]
        right = bottom.twinx()
        for axis, key, color, label in ((bottom, "gsnr_mean", "C2", "GSNR mean (layer average)"),
                                        (right, "b_simple", "C3", "B_simple (examples)")):
            values = [r[key] for r in gsnr]
            axis.plot(steps, values, color=color, lw=0.6, alpha=0.35)
            axis.plot(steps, rolling_median(values, max(1, len(values) // 25)), color=color, lw=1.5)
            axis.set_ylabel(f"{label}, rolling median", color=color)
            axis.set_yscale("log")
    else:
        bottom.text(0.5, 0.5, "no GSNR statistics (not a VR optimizer, vr: false, or n < 2)", ha="center", transform=bottom.transAxes)
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    path = Path(output, PLOT)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
