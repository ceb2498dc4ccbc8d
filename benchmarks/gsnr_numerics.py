"""How well fp32 sums resolve the GSNR factor on real BERT gradients, with and without the cap.

For tiny and mini BERT (tied embeddings, embedded corpus), at initialisation
and after 30 AdamW steps, n micro-batch gradients: rho of the capped
estimator in float64 (docs/design.md §2-3) against rho from fp32 sums (what
ds_vrgd computes: Q and the sum of the samples in fp32), for several caps;
and how much each cap changes rho against exact uncapped float64 math.
Prints the table of docs/design.md §3.

    python benchmarks/gsnr_numerics.py [--presets tiny,mini] [--ns 4,16] [--caps none,1e3,3e3,1e4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support.real_bert: the model and data builder

from ds_vrgd.gsnr import rho_from_moments  # noqa: E402
from tests.support.real_bert import bert_batches, bert_model, pretrain_steps, sample_grads  # noqa: E402
from tests.support.reference import moments, rho_from_moments_ref  # noqa: E402

GAMMA, TOL = 0.1, 1e-3


def compare(samples: dict[str, list], cap: float | None) -> tuple[float, float]:
    """(fraction where fp32 rho agrees with float64, fraction where the cap changes float64 rho)."""
    agree = changed = total = 0
    for xs in samples.values():
        m, s = moments(xs)
        exact = rho_from_moments_ref(m, s, GAMMA, gsnr_max=cap).reshape(-1)
        uncapped = rho_from_moments_ref(m, s, GAMMA, gsnr_max=None).reshape(-1)
        stack = torch.stack(xs).float()
        n = stack.shape[0]
        fp32 = rho_from_moments(stack.sum(0) / n, (stack * stack).sum(0) / n, GAMMA, gsnr_max=cap).reshape(-1)
        agree += ((fp32.double() - exact).abs() <= TOL).sum().item()
        changed += ((exact - uncapped).abs() > TOL).sum().item()
        total += exact.numel()
    return agree / total, changed / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,mini")
    parser.add_argument("--ns", default="4,16")
    parser.add_argument("--caps", default="none,1e3,3e3,1e4")
    parser.add_argument("--steps", type=int, default=30, help="AdamW steps before the 'trained' measurement")
    args = parser.parse_args()
    caps = [None if c == "none" else float(c) for c in args.caps.split(",")]
    batches = bert_batches()
    print("| model | state | n | cap | fp32 agrees with float64 | cap changes rho vs uncapped float64 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for preset in args.presets.split(","):
        model = bert_model(preset, batches)
        for state in ("init", f"{args.steps} steps"):
            if state != "init":
                pretrain_steps(model, batches, args.steps)
            for n in (int(x) for x in args.ns.split(",")):
                samples = sample_grads(model, batches, n)
                for cap in caps:
                    agree, changed = compare(samples, cap)
                    label = "none" if cap is None else f"{cap:g}"
                    print(f"| {preset} | {state} | {n} | {label} | {agree:.5%} | {changed:.2%} |", flush=True)


if __name__ == "__main__":
    main()
