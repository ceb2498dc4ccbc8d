"""Starting test processes: free ports, spawned ranks and their environment, launcher commands run from
the repository root, with one retry for a known crash at interpreter exit.

gloo (torch 2.13) sometimes aborts a process at interpreter teardown, after its work is done and its
process group destroyed: "terminate called without an active exception", SIGABRT (seen in about one
of 25-40 two-rank launches on a loaded 2-core machine; upstream: a Gloo worker thread still holding
work during finalisation, pytorch/pytorch PR 179291). A multi-process run that dies exactly that way
is run once more, with a warning in the test report; a second abort, or any other failure, fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp

from tests.support import REPO

TEARDOWN_ABORT = "terminate called without an active exception"
BIN = Path(sys.executable).parent  # the venv's launchers: deepspeed, accelerate


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> None:
    """Set a spawned rank's environment: torch.distributed's env:// rendezvous on ``port``, DeepSpeed on CPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")


def spawn(worker: Callable, nprocs: int, args_for_port: Callable[[int], tuple]) -> None:
    """``mp.spawn(worker, args=args_for_port(port), nprocs)`` on a free port; retried once after a SIGABRT."""
    for attempt in (1, 2):
        try:
            mp.spawn(worker, args=args_for_port(free_port()), nprocs=nprocs, join=True)
            return
        except mp.ProcessExitedException as error:
            if attempt == 2 or error.signal_name != "SIGABRT":
                raise
            warnings.warn(f"a spawned rank aborted ({error}); known gloo teardown abort, running the ranks again")


def spawn_results(worker: Callable, nprocs: int, args_for: Callable[[int, str], tuple]):
    """:func:`spawn` with ``args_for(port, out_dir)`` in a temporary directory; returns the object that the
    ranks saved to ``out_dir/results.pt`` (rank 0, by convention)."""
    with tempfile.TemporaryDirectory() as out_dir:
        spawn(worker, nprocs, lambda port: args_for(port, out_dir))
        return torch.load(os.path.join(out_dir, "results.pt"), weights_only=False)


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, **kwargs)``; retried once after a teardown abort."""
    for attempt in (1, 2):
        done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
        if done.returncode == 0 or attempt == 2 or TEARDOWN_ABORT not in done.stdout + done.stderr:
            return done
        warnings.warn(f"{command[0]} exited {done.returncode} with the gloo teardown abort; running it again")
    return done


def run_in_repo(command: list, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    """:func:`run` from the repository root on CPU, offline, ``tests`` importable, the venv's launchers first on
    PATH, ``env`` added."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **env)
    return run([str(c) for c in command], cwd=REPO, env=env, timeout=timeout)


def succeeded(done: subprocess.CompletedProcess) -> str:
    """Assert that a run succeeded (else fail with the ends of its output); return its stdout."""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def deepspeed_launch(num_gpus: int, *args) -> list:
    """The ``deepspeed`` launcher with ``num_gpus`` ranks (CPU processes here) on a free port, then ``args``."""
    return [BIN / "deepspeed", "--num_gpus", str(num_gpus), "--master_port", str(free_port()), *args]


def accelerate_launch(*flags: str) -> list:
    """``accelerate launch`` with 2 processes on one machine, fp32, a free port, then ``flags`` (script, args)."""
    return [BIN / "accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), *flags]


def release_unmapped_cpu_buffers() -> list[str]:
    """Unlink the CPU all-reduce buffers of DeepSpeed runs that ended without ``ds_vrgd.deepspeed.shutdown()``
    (a failed rank, an HF/accelerate run): those no live process maps. A mapped one belongs to a running job
    (another test session, a demo) and stays. Returns the unlinked paths."""
    import glob

    from ds_vrgd.deepspeed import CPU_ALLREDUCE_BUFFER

    pattern = CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr="*", port="*", rank="*")
    buffers = glob.glob(pattern)
    if not buffers:
        return []
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(maxsplit=5)[-1].strip() for line in f if "deepspeed_allreduce_buffer" in line)
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
    unlinked = [path for path in buffers if path not in mapped]
    for path in unlinked:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return unlinked

