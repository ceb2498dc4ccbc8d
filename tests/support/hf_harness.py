"""Running the Hugging Face test scripts and examples as users do: real launchers, CPU, fresh processes."""

from __future__ import annotations

import os
import sys

from tests.support import REPO, launching
from tests.support.launching import free_port

BIN = os.path.dirname(sys.executable)


def run(command: list[str], **env) -> str:
    """Run ``command`` from the repository root on CPU, offline; assert success; return its stdout."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **env)
    done = launching.run(command, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def accelerate_launch(*flags: str) -> list[str]:
    """``accelerate launch`` with 2 processes on one machine, fp32, a free port, then ``flags`` (script, args)."""
    return [os.path.join(BIN, "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *flags]
