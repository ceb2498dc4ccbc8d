"""What VRGD's statistics add to a BERT-large step on a GPU cluster: a cost model on paper.

    python benchmarks/cost_model.py            # prints the table of docs/costs.md ("A cluster, on paper")

Nothing here is measured: every figure comes from the assumptions below, stated in the output, and the bytes
of the traffic table in docs/costs.md (read from it, as the tests do). BERT-large (335M parameters), phase 1
(seq 128), global batch 65,536 sequences, micro-batch 64 sequences per GPU, so GA = 65,536 / (64 G) on G
GPUs. Per micro-step a GPU computes 6 N tokens FLOPs at an effective rate; a collective over G GPUs moves its
payload (G - 1) / G times at the link's bus bandwidth (ring algorithms; an all-reduce twice that). DeepSpeed's
own traffic is its gradient payload of the table, all-reduced (DeepSpeed 0.19.8's ZeRO 1/2 default), plus the
parameter all-gather (2 bytes per element, bf16). Two bounds on what VR adds: all of its traffic exposed, and
its traffic hidden behind the backward passes it is sent during (the last one with local sums, every one with
raw samples; two thirds of a micro-step's compute), minus what DeepSpeed's own reduction takes of the link in
them; plus VR's own work, passes over the parameters in HBM: the hooks every micro-step (12 bytes per element
with local sums, 4 with raw samples) and the step's GSNR phases (20 bytes per element of the partition).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from _timing import table  # noqa: E402

from tests.support.costs_table import vr_bytes_per_element  # noqa: E402

PARAMS = 335e6
SEQ, GLOBAL_BATCH, MICRO_BATCH = 128, 65_536, 64
FLOPS = 150e12
"""Effective bf16 FLOP/s per GPU (an A100 at ~50% of its peak; an H100 is ~2-3x)."""
HBM = 1.5e12
"""Effective HBM bytes/s per GPU for element-wise passes."""
LINKS = {
    "NVLink, 1 node": 200e9,  # all-reduce bus bandwidth per GPU, 8 x A100/H100 in one node
    "IB 200 Gb/s per GPU": 23e9,
    "IB 400 Gb/s per GPU": 46e9,
}
CONFIGS = {  # name -> (VR's row of the traffic table for a GA, when DeepSpeed reduces, its gradient bytes)
    "ZeRO-1 bf16": (lambda ga: "raw-half" if 2 * ga < 8 else "local-half", "step", 2.0),  # the "auto" rule
    "ZeRO-2 bf16": (lambda ga: "raw-half", "micro", 2.0),
    "ZeRO-2 bf16, local sums": (lambda ga: "local-half", "micro", 2.0),
}
ALLGATHER_BYTES = 2.0


def step_fractions(gpus: int, bandwidth: float, config: str, interval: int) -> tuple[float, float, int]:
    """(VR's added time / LAMB's step time with all of VR's traffic exposed; the same with it hidden where the
    backward passes leave the link free; GA). ``interval``: gsnr_interval (VR's costs spread over its steps)."""
    ga = max(1, GLOBAL_BATCH // (gpus * MICRO_BATCH))
    micro_step = 6 * PARAMS * MICRO_BATCH * SEQ / FLOPS
    ring = (gpus - 1) / gpus / bandwidth * PARAMS  # seconds per byte per element of payload
    row_of, when, grad_bytes = CONFIGS[config]
    row = row_of(ga)
    gradient = grad_bytes * (ga if when == "micro" else 1) * 2 * ring  # all-reduced
    base = ga * micro_step + gradient + ALLGATHER_BYTES * ring
    vr_comm = vr_bytes_per_element(row, ga) * ring / interval
    raw = row.startswith("raw")
    own = ((4 if raw else 12) * ga + 20 / gpus) * PARAMS / HBM / interval
    spread = ga if raw else 1  # backward passes the VR traffic is sent during
    link_free = spread * (2 / 3) * micro_step - (gradient * spread / ga if when == "micro" else 0.0)
    hidden = min(vr_comm, max(0.0, link_free))
    return (vr_comm + own) / base, (vr_comm - hidden + own) / base, ga


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    rows = []
    for link, bandwidth in LINKS.items():
        for gpus in ((8,) if link.startswith("NVLink") else (64, 256, 1024)):
            for config in CONFIGS:
                cells = []
                for interval in (1, 10):
                    exposed, overlapped, ga = step_fractions(gpus, bandwidth, config, interval)
                    cells.append(f"{overlapped:.1%} - {exposed:.1%}")
                rows.append([link, gpus, ga, config, *cells])
    print(table(["link", "GPUs", "GA", "configuration", "VR adds, gsnr_interval 1", "gsnr_interval 10"], rows,
                "BERT-large phase 1, 64k batch: the fraction of a LAMB step VR adds (overlapped - exposed), on paper"))
    print(f"\nassumed: {FLOPS / 1e12:.0f} TFLOP/s per GPU, HBM {HBM / 1e12:.1f} TB/s, micro-batch {MICRO_BATCH} x seq "
          f"{SEQ}, bus bandwidths {', '.join(f'{k} {v / 1e9:.0f} GB/s' for k, v in LINKS.items())}")


if __name__ == "__main__":
    main()
