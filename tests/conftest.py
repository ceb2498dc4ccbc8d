"""Where the tests are, and the fixtures they share.

The groups, by what they prove (each package's docstring says when a test belongs there):
math/ (against float64), peers/ (against torch.optim and pytorch_optimizer), properties/ (one process:
invariants, errors), distributed/ (ranks equal one process), integrations/ (DeepSpeed, Hugging Face,
launchers), application/ (pretraining, benchmarks' experiments). support/ holds what tests import:
the float64 reference (reference.py), the DeepSpeed harness, its model and single-process reference
(ds_harness.py), spawned ranks, their environment and launcher commands (launching.py), real-BERT
samples (real_bert.py) and the scripts launchers run (scripts/). Slow multi-process tests are marked ``slow``.

Fixtures:
- ``port``: a free localhost port, for a launcher a test starts (module fixtures call free_port()).
- ``small_model``: a fresh ds_harness.make_model(), the seeded MLP every harness run trains.
- ``one_thread``: one torch thread while the test runs (tiny in-process training on a busy 2-core machine).
- ``no_leaked_cpu_buffers`` (every test): after it, unlink DeepSpeed CPU all-reduce buffers no process maps
  (66 MiB of /dev/shm per rank of a run that ended without ds_vrgd.deepspeed.shutdown()).
"""

import pytest
import torch

from tests.support.ds_harness import make_model
from tests.support.launching import free_port, release_unmapped_cpu_buffers


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def small_model() -> torch.nn.Module:
    return make_model()


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine a second one makes tiny runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_leaked_cpu_buffers():
    yield
    release_unmapped_cpu_buffers()

