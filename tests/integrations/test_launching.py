"""Ending runs: the test launcher retries only the gloo teardown abort, and only once; ds_vrgd.deepspeed.shutdown()
leaves none of DeepSpeed's CPU shared-memory buffers behind."""

import glob
import os
import sys
import warnings

import pytest
import torch

from tests.support import launching

SCRIPT = """
import pathlib, sys
runs = pathlib.Path(sys.argv[1])
runs.write_text((runs.read_text() if runs.exists() else "") + "x")
sys.stderr.write(sys.argv[2])
sys.exit(int(sys.argv[3]))
"""


def run_counting(tmp_path, message: str, code: int) -> tuple[int, int]:
    """(exit code, number of runs) of a command that prints ``message`` and exits with ``code``."""
    counter = tmp_path / "runs"
    done = launching.run([sys.executable, "-c", SCRIPT, str(counter), message, str(code)])
    return done.returncode, len(counter.read_text())


def test_teardown_abort_is_retried_once(tmp_path):
    with pytest.warns(UserWarning, match="teardown abort"):
        assert run_counting(tmp_path, launching.TEARDOWN_ABORT, 134) == (134, 2)


@pytest.mark.parametrize("message, code", [("Traceback: a real failure", 1), ("", 0)])
def test_other_outcomes_run_once(tmp_path, message, code):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_counting(tmp_path, message, code) == (code, 1)


def _comm_worker(rank: int, port: int, out_dir: str, end_with_shutdown: bool) -> None:
    """Initialise DeepSpeed's communication on 2 CPU ranks, all-reduce once, end; rank 0 saves whether its
    buffer existed before and after the end."""
    import deepspeed

    from ds_vrgd.deepspeed import CPU_ALLREDUCE_BUFFER, shutdown

    launching.rank_env(rank, 2, port)
    os.environ["LOCAL_SIZE"] = "2"  # as the deepspeed launcher sets it: all ranks on this machine
    deepspeed.init_distributed(dist_backend="gloo")
    total = torch.ones(3)
    deepspeed.comm.all_reduce(total)
    buffer = CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr="127.0.0.1", port=port, rank=rank)
    existed = os.path.exists(buffer)
    segments = glob.glob(f"/dev/shm/*_{port}_*")  # anything DeepSpeed made for this run, whatever its name
    deepspeed.comm.barrier()
    shutdown() if end_with_shutdown else deepspeed.comm.destroy_process_group()
    if rank == 0:
        torch.save({"sum": total.tolist(), "existed": existed, "segments": segments, "left": os.path.exists(buffer)},
                   os.path.join(out_dir, "results.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("end_with_shutdown", [True, False], ids=["shutdown", "destroy_only"])
def test_shutdown_unlinks_deepspeeds_cpu_buffer(end_with_shutdown):
    """DeepSpeed's CPU op makes a /dev/shm buffer per rank and never unlinks it; shutdown() does."""
    got = launching.spawn_results(_comm_worker, 2, lambda port, out: (port, out, end_with_shutdown))
    assert got["sum"] == [2.0, 2.0, 2.0]
    if not got["existed"]:
        assert not got["segments"], f"DeepSpeed's buffer has another name than CPU_ALLREDUCE_BUFFER: {got['segments']}"
        pytest.skip("DeepSpeed made no shared-memory buffer here (its CPU comm op is not built for this machine)")
    assert got["left"] is not end_with_shutdown

