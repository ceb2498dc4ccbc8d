"""What the gpu tests share: the marks that skip them without CUDA, and one spawned rank on the GPU.

DeepSpeed picks its accelerator from ``DS_ACCELERATOR`` once per process, and launch/_env.sh exports ``cpu``; so
everything that runs DeepSpeed here runs in a spawned rank that sets ``cuda`` before it imports DeepSpeed.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

from tests.support.launching import spawn_results

REASON = "needs a CUDA GPU: run bash launch/gpu_check.sh on a CUDA machine"
MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=REASON)]
"""The module-level ``pytestmark`` of every gpu test module."""


def rank_env(port: int, accelerator: str = "cuda") -> None:
    """A spawned single rank's environment: env:// rendezvous on ``port`` (RANK 0, WORLD_SIZE 1) and
    DeepSpeed on ``accelerator``. Call it before importing DeepSpeed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR=accelerator)
    if accelerator == "cuda":
        torch.cuda.set_device(0)


def one_rank(worker: Callable, args_for: Callable[[int, str], tuple]):
    """``worker(0, *args_for(port, out_dir))`` in one spawned process; returns what it saved to
    ``out_dir/results.pt`` (tests/support/launching.py's spawn_results)."""
    return spawn_results(worker, 1, args_for)


def on_device(batches, device: str):
    """A real_bert.BertBatches whose micro-batches come on ``device``."""

    class OnDevice:
        def micro_batch(self, index: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
            return {k: v.to(device) for k, v in batches.micro_batch(index, size, seed).items()}

    return OnDevice()
