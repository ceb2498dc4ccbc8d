"""Every VR optimizer equals the independent float64 reference of docs/design.md §2.

Each case runs the implementation in fp32 (n backward() calls per step, the
plain-PyTorch moment source) and tests/support/reference.py in float64 on the same
problem, then compares the parameters. Each case also checks that the test
has power: the reference with the VR factor removed (or with the option under
test removed) differs from the reference by far more than the tolerance.
"""

import itertools
import warnings
import zlib

import pytest
import torch

from ds_vrgd.optim import VR_OPTIMIZERS
from tests.support.reference import Problem, run_impl, run_reference


# fp32 tolerances for parameters of order 1 after 4 steps ("direct" problem,
# whose samples have a controlled across-sample variance).
RTOL, ATOL = 1e-5, 1e-6
# The "model" problem (autograd gradients of a tiny regression) cannot control
# how small v = s - m^2 gets relative to s. Any fp32 implementation of docs/design.md's
# formula loses ~ulp * s / v relative accuracy in v there, and through mean_k(r_k)
# this shifts every q of the layer: measured up to ~4x the direct tolerance at
# n = 3 and ~100x at n = 2 over seeds. So the model problem runs n in {1, 3, 8}
# with a 10x looser tolerance; n = 2 is covered by the direct problem.
MODEL_TOL_FACTOR = 10.0
# The "power" check: the compared-against alternative must differ by at least this much.
POWER = 100 * ATOL

CONFIGS = {
    "VRSGD": [
        dict(lr=0.1),
        dict(lr=0.1, weight_decay=0.1),
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05),
        dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05),
    ],
    "VRAdam": [
        dict(lr=0.02),
        dict(lr=0.02, betas=(0.8, 0.99), weight_decay=0.1),
    ],
    "VRAdamW": [
        dict(lr=0.02),  # default weight_decay 1e-2
        dict(lr=0.02, weight_decay=0.0),
        dict(lr=0.02, betas=(0.8, 0.99), weight_decay=0.2),
    ],
    "VRLARS": [
        dict(lr=0.1, trust_coefficient=0.5),  # default momentum 0.9, exclude_1d
        dict(lr=0.1, trust_coefficient=0.5, momentum=0.0, weight_decay=0.05, exclude_1d=False),
        dict(lr=0.1, trust_coefficient=0.5, momentum=0.9, weight_decay=0.05, exclude_1d=True),
    ],
    "VRLAMB": [
        dict(lr=0.02),  # default wd 0.01, eps 1e-6, max_trust_ratio 10, exclude_1d
        dict(lr=0.02, weight_decay=0.1, exclude_1d=False),
        dict(lr=0.02, weight_decay=0.0, betas=(0.8, 0.99)),
        dict(lr=0.02, weight_decay=0.05, max_trust_ratio=0.5),  # trust clipping active
    ],
}

CASES = [
    pytest.param(kind, name, cfg, n, gamma, id=f"{kind}-{name}-c{ci}-n{n}-g{gamma}")
    for kind in ("direct", "model")
    for name, cfgs in CONFIGS.items()
    for ci, cfg in enumerate(cfgs)
    for n, gamma in itertools.product((1, 2, 3, 8), (0.1, 0.5))
    if not (kind == "model" and n == 2)
]


def _seed(*key):
    return zlib.crc32(repr(key).encode()) % 10_000


def _max_diff(a, b):
    return max((x.detach().double() - y.detach().double()).abs().max().item() for x, y in zip(a, b))


def _run_both(problem, name, hyper):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the n < 2 fallback warning is tested elsewhere
        params, _ = run_impl(problem, VR_OPTIMIZERS[name], **hyper)
    ref = run_reference(problem, name, **hyper)
    return params, ref


def _assert_close(params, ref_params, factor=1.0):
    # atol scales with the tensor's magnitude: an element that crosses zero after
    # updates of size ~|W| carries fp32 rounding of ~|W|, not of its own value.
    for k, (p, r) in enumerate(zip(params, ref_params)):
        atol = factor * ATOL * max(1.0, r.abs().max().item())
        torch.testing.assert_close(p.detach().double(), r, rtol=factor * RTOL, atol=atol, msg=lambda m: f"param {k}: {m}")


@pytest.mark.parametrize("problem_kind,name,cfg,n,gamma", CASES)
def test_matches_reference(problem_kind, name, cfg, n, gamma):
    problem = Problem(problem_kind, n=n, steps=4, seed=_seed(name, n, problem_kind))
    hyper = dict(cfg, gamma=gamma)
    params, ref = _run_both(problem, name, hyper)
    _assert_close(params, ref.params, MODEL_TOL_FACTOR if problem_kind == "model" else 1.0)

    # Power: the VR factor must matter on this problem whenever it is defined.
    base = run_reference(problem, name, **dict(hyper, vr=False))
    d = _max_diff(ref.params, base.params)
    if n >= 2:
        assert d > POWER, f"test has no power: VR and base references differ by only {d:g}"
    else:
        assert d == 0.0


OPTION_CASES = [
    pytest.param(name, opt, id=f"{name}-{'-'.join(f'{k}{v}' for k, v in opt.items())}")
    for name in CONFIGS
    for opt in (dict(gsnr_warmup_steps=2), dict(gsnr_ema=0.5), dict(gsnr_ema=0.9), dict(gsnr_interval=2),
                dict(gsnr_interval=3, gsnr_warmup_steps=1), dict(gsnr_interval=2, gsnr_ema=0.5))
]


@pytest.mark.parametrize("problem_kind", ["direct", "model"])
@pytest.mark.parametrize("name,option", OPTION_CASES)
def test_warmup_ema_and_interval_match_reference(problem_kind, name, option):
    """Also ``gsnr_interval``: rho on statistics steps, the stored rho on the steps between them."""
    problem = Problem(problem_kind, n=3, steps=7, seed=7)
    hyper = dict(CONFIGS[name][-1], gamma=0.5, **option)
    params, ref = _run_both(problem, name, hyper)
    _assert_close(params, ref.params, MODEL_TOL_FACTOR if problem_kind == "model" else 1.0)

    without = run_reference(problem, name, **dict(CONFIGS[name][-1], gamma=0.5))
    d = _max_diff(ref.params, without.params)
    assert d > POWER, f"option {option} has no visible effect on this problem ({d:g})"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_warmup_steps_are_exactly_the_base_optimizer(name):
    """During the warmup steps rho = 1: after k <= warmup steps the params equal vr=False."""
    problem = Problem("direct", n=3, steps=3, seed=11)
    hyper = dict(CONFIGS[name][0], gamma=0.5)
    a, _ = run_impl(problem, VR_OPTIMIZERS[name], gsnr_warmup_steps=3, **hyper)
    b, _ = run_impl(problem, VR_OPTIMIZERS[name], vr=False, **hyper)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_groups_with_different_hyperparameters(name):
    """Two param groups with different base hyperparameters (and named layers)."""
    problem = Problem("direct", shapes=((7,), (5, 6), (4, 3)), n=3, steps=4, seed=3)
    base = dict(CONFIGS[name][-1], gamma=0.5)
    override = {
        "VRSGD": dict(lr=0.05, momentum=0.5, weight_decay=0.0),
        "VRAdam": dict(lr=0.005, betas=(0.5, 0.9), weight_decay=0.0),
        "VRAdamW": dict(lr=0.005, weight_decay=0.0),
        "VRLARS": dict(lr=0.5, trust_coefficient=0.1, weight_decay=0.0, momentum=0.5),
        "VRLAMB": dict(lr=0.005, weight_decay=0.0, exclude_1d=False),
    }[name]

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], **override}]

    params, _ = run_impl(problem, VR_OPTIMIZERS[name], param_arg=groups, **base)
    ref = run_reference(problem, name, groups=groups(problem.init), **base)
    _assert_close(params, ref.params)
    # power: the override changes the result
    same = run_reference(problem, name, **base)
    assert abs(ref.params[2] - same.params[2]).max() > POWER


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gamma_per_param_group(name):
    """gamma given in a param group applies to that group only (torch.optim convention:
    every constructor hyperparameter can be overridden per group)."""
    problem = Problem("direct", shapes=((7,), (5, 6), (4, 3)), n=3, steps=3, seed=5)
    base = dict(CONFIGS[name][0], gamma=0.1)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "gamma": 0.9}]

    params, _ = run_impl(problem, VR_OPTIMIZERS[name], param_arg=groups, **base)
    ref = run_reference(problem, name, groups=groups(problem.init), **base)
    _assert_close(params, ref.params)


@pytest.mark.parametrize("interval", [1, 2], ids=["every-step", "interval2"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_tiles_match_reference(monkeypatch, name, foreach, interval):
    """Tiles smaller than the tensors (a layer's sums gathered from several tiles, several
    tensors' tiles in one block) and both op paths give the reference's result; also on the held
    steps of ``gsnr_interval``, whose rho must outlive the block's temporaries (LARS/LAMB keep the
    direction written over it until phase 3)."""
    monkeypatch.setattr("ds_vrgd.optim._base.CPU_TILE_NUMEL", 5)
    problem = Problem("direct", shapes=((7,), (5, 6), (4, 3), (2,)), n=3, steps=4, seed=17)
    hyper = dict(CONFIGS[name][-1], gamma=0.5, gsnr_interval=interval)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, _ = run_impl(problem, VR_OPTIMIZERS[name], foreach=foreach, **hyper)
    _assert_close(params, run_reference(problem, name, **hyper).params)
