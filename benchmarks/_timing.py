"""Shared helpers of the benchmarks: alternating (ABAB...) timing, medians and spread, tables.

The machines these run on are shared and noisy, so every comparison is made in
one process with the contenders interleaved: repeat r runs A then B for even r
and B then A for odd r, so slow phases of the machine hit both. We report the
median of each contender, its inter-quartile range, and the median of the
per-repeat ratios B/A with that ratio's IQR (the ratio of a paired repeat
cancels machine drift better than the ratio of medians).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from typing import Sequence

import torch


def quantiles(xs: Sequence[float]) -> dict:
    """median, q1, q3, min, max of a sample (q1/q3 by linear interpolation)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0], "min": xs[0], "max": xs[0], "n": 1}
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1], "n": len(xs)}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict:
    """Quantiles of the per-repeat ratios b[i] / a[i]."""
    return quantiles([y / x for x, y in zip(a, b)])


def fmt_q(q: dict, scale: float = 1.0, digits: int = 3) -> str:
    """'median [q1, q3]' with a scale (e.g. 1e3 for ms)."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(q['median'] * scale)} [{f.format(q['q1'] * scale)}, {f.format(q['q3'] * scale)}]"


def table(headers: list[str], rows: list[list], title: str = "") -> str:
    """A GitHub-markdown table as a string."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [title] if title else []
    out += [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    return "\n".join(out)


def machine() -> dict:
    """What the numbers were measured on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
    }


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
