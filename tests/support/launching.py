"""Starting test processes: free ports, spawned ranks and launcher commands, with one retry for a
known crash at interpreter exit.

gloo (torch 2.13) sometimes aborts a process at interpreter teardown, after its work is done and its
process group destroyed: "terminate called without an active exception", SIGABRT (seen in about one
of 25-40 two-rank launches on a loaded 2-core machine; upstream: a Gloo worker thread still holding
work during finalisation, pytorch/pytorch PR 179291). A multi-process run that dies exactly that way
is run once more, with a warning in the test report; a second abort, or any other failure, fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import warnings
from typing import Callable

import torch
import torch.multiprocessing as mp

TEARDOWN_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
