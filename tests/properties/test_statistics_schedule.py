"""The statistics schedule ``gsnr_interval`` (docs/design.md §2) in one process: which steps take
samples, what the other steps apply, and what is stored. The float64 agreement of every step is in
tests/math/test_optim_reference.py; ranks and ZeRO in tests/distributed/test_statistics_schedule.py."""

import pytest
import torch

from ds_vrgd.optim import VR_OPTIMIZERS, VRLAMB, VRSGD
from tests.support.reference import Problem


class RecordingLAMB(VRLAMB):
    """VRLAMB that keeps a copy of the rho each step's rule receives (None: rho = 1)."""

    def _direction(self, group, block, rho, ops):
        self.recorded[-1].append(None if rho is None else [r.clone() for r in rho])
        return super()._direction(group, block, rho, ops)


def _train(opt, params, problem, steps):
    """Each step: n backward() calls, then step(); returns the samples the source counted per step."""
    counted = []
    for t in range(steps):
        opt.recorded = getattr(opt, "recorded", []) + [[]]
        for i in range(problem.n):
            problem.loss(params, t, i).backward()
        counted.append(opt._moments.num_samples())
        opt.step()
        opt.zero_grad()
    return counted


def test_held_steps_capture_nothing_and_apply_the_stored_rho():
    problem = Problem("direct", n=3, steps=8, seed=4)
    params = problem.make_params()
    opt = RecordingLAMB(params, lr=0.02, gamma=0.5, gsnr_interval=3, gsnr_warmup_steps=1)
    counted = _train(opt, params, problem, 8)
    statistics = [2, 5, 8]  # t = warmup + 1, then every 3rd step
    assert counted == [3 if t in statistics else 0 for t in range(1, 9)]
    rho = [step[0] for step in opt.recorded]
    assert rho[0] is None  # warm-up: rho = 1
    for t in (3, 4):  # held: exactly the rho of step 2 (a copy: LAMB writes its direction over rho)
        assert all(torch.equal(a, b) for a, b in zip(rho[t - 1], rho[1]))
    assert not all(torch.equal(a, b) for a, b in zip(rho[4], rho[1]))  # step 5 took new statistics
    assert opt.gsnr_stats()["step"] == 8


def test_interval_one_stores_no_rho_and_samples_every_step():
    problem = Problem("direct", n=3, steps=3, seed=4)
    params = problem.make_params()
    opt = VRSGD(params, lr=0.1)
    opt.recorded = []
    assert _train(opt, params, problem, 3) == [3, 3, 3]
    assert not any("gsnr_rho" in state for state in opt.state.values())


@pytest.mark.parametrize("name", list(VR_OPTIMIZERS))
def test_held_rho_is_fp32_state_of_the_parameter_size(name):
    problem = Problem("direct", n=3, steps=2, seed=4)
    params = problem.make_params(torch.bfloat16)
    opt = VR_OPTIMIZERS[name](params, lr=0.01, gsnr_interval=2)
    opt.recorded = []
    _train(opt, params, problem, 2)
    for p in params:
        assert opt.state[p]["gsnr_rho"].dtype == torch.float32 and opt.state[p]["gsnr_rho"].shape == p.shape
    state = opt.state_dict()
    fresh = VR_OPTIMIZERS[name](params, lr=0.01, gsnr_interval=2)
    fresh.load_state_dict(state)
    assert all(fresh.state[p]["gsnr_rho"].dtype == torch.float32 for p in params)


def test_a_parameter_without_stored_rho_takes_rho_one_on_a_held_step():
    """A parameter that had no gradient at the statistics step gets rho = 1 when held, not 0."""
    problem = Problem("direct", n=3, steps=2, seed=4)
    params = problem.make_params()
    late = torch.nn.Parameter(torch.ones(3))
    opt = RecordingLAMB(params + [late], lr=0.02, gsnr_interval=2)
    opt.recorded = [[]]
    for i in range(problem.n):
        problem.loss(params, 0, i).backward()
    opt.step()
    opt.zero_grad()
    opt.recorded.append([])
    for i in range(problem.n):
        (problem.loss(params, 1, i) + late.sum()).backward()
    opt.step()
    assert torch.equal(opt.state[late]["gsnr_rho"], torch.ones(3))


@pytest.mark.filterwarnings("ignore:VRSGD. 0 gradient sample")
def test_samples_due_follows_the_schedule():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = VRSGD(params, lr=0.1, gsnr_interval=4, gsnr_warmup_steps=2)
    due = []
    for _ in range(12):
        due.append(opt.samples_due())
        params[0].grad = torch.ones(2)
        opt.step()
    assert due == [t > 2 and (t - 3) % 4 == 0 for t in range(1, 13)]
    assert not VRSGD(params, lr=0.1, vr=False).samples_due()
    assert not VRSGD(params, lr=0.1, gamma=0.0).samples_due()


def test_the_last_statistics_and_skipped_steps_travel_in_the_state_dict():
    """Resumed between two statistics steps, gsnr_stats() reports the last statistics step's, as the
    uninterrupted run does (and skipped_steps keeps counting)."""
    import copy

    problem = Problem("direct", n=3, steps=2, seed=4)
    params = problem.make_params()
    opt = VRSGD(params, lr=0.1, gsnr_interval=3)
    opt.recorded = []
    _train(opt, params, problem, 2)
    opt.skipped_steps = 2
    fresh = VRSGD(params, lr=0.1, gsnr_interval=3)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.gsnr_stats() == opt.gsnr_stats() and fresh.gsnr_stats()["step"] == 1
    assert fresh.skipped_steps == 2
