"""Shared pieces of the training experiments (mlm_large_batch.py, generalization_digits.py).

One optimizer step takes a global batch of B examples split into k equal
micro-batches: one backward pass each on (micro-batch mean loss) / k, then
``opt.step()``. The accumulated gradient is the mean over the batch, so with
``vr=False`` the step is the base optimizer's on the batch gradient; with a
VR optimizer the k backward passes are the step's k GSNR samples, exactly
what k data-parallel ranks x accumulation steps give (each rank's
micro-batch gradient is one sample). Base and VR runs share this code path.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DOC = os.path.join(REPO, "docs", "results.md")
IMAGES = os.path.join(REPO, "docs", "img")


def accumulated_step(optimizer: torch.optim.Optimizer, micro_batches: Sequence, loss_of: Callable) -> float:
    """One optimizer step over ``micro_batches`` (one backward each on loss / k); returns the mean loss.

    ``loss_of(micro_batch)`` returns the micro-batch's mean loss (a scalar
    tensor); the micro-batches must be of equal size so that the sum of
    loss / k is the batch mean.
    """
    k = len(micro_batches)
    total = 0.0
    for micro_batch in micro_batches:
        loss = loss_of(micro_batch)
        (loss / k).backward()
        total += loss.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / k


def sqrt_scaled_lr(reference_lr: float, batch: int, reference_batch: int) -> float:
    """The learning rate at ``batch`` under square-root scaling from (reference_batch, reference_lr)."""
    return reference_lr * math.sqrt(batch / reference_batch)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_std(values: Iterable[float], scale: float = 1.0, digits: int = 3) -> str:
    """'mean ± std' of ``values`` times ``scale``."""
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def paired_differences(runs: Sequence[dict], baselines: Sequence[dict], value: Callable[[dict], float]) -> list[float]:
    """value(run) - value(baseline) for each run and the baseline of the same seed (``run["spec"]["seed"]``)."""
    by_seed = {b["spec"]["seed"]: b for b in baselines}
    return [value(r) - value(by_seed[r["spec"]["seed"]]) for r in runs if r["spec"]["seed"] in by_seed]


def run_parallel(function: Callable, specs: Sequence, jobs: int, threads: int = 1) -> Iterator[tuple]:
    """Yield ``(spec, function(spec))`` as runs finish, in ``jobs`` processes of ``threads`` torch threads each.

    ``jobs = 1`` runs in this process (easier to debug and to profile).
    """
    if jobs <= 1:
        torch.set_num_threads(threads)
        for spec in specs:
            yield spec, function(spec)
        return
    with ProcessPoolExecutor(jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(function, spec): spec for spec in specs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def replace_generated_block(text: str, name: str, content: str) -> str:
    """``text`` with the block between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` replaced.

    The block is appended when the markers are missing.
    """
    begin, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    block = f"{begin}\n{content.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_results_doc(name: str, content: str, path: str = RESULTS_DOC) -> None:
    """Write ``content`` into the generated block ``name`` of docs/results.md (created if missing)."""
    text = "# Results\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(replace_generated_block(text, name, content))


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, name: str, directory: str = IMAGES, doc: str = RESULTS_DOC) -> str:
    """Save ``figure`` as DIRECTORY/NAME.png; returns its path relative to the markdown file ``doc``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + ".png")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return os.path.relpath(path, os.path.dirname(os.path.abspath(doc)))


def comma_ints(text: str) -> list[int]:
    """argparse type: '1,2,3' -> [1, 2, 3]."""
    return [int(x) for x in text.split(",")]


def comma_floats(text: str) -> list[float]:
    """argparse type: '0.1,1' -> [0.1, 1.0]."""
    return [float(x) for x in text.split(",")]
