"""Every VR optimizer on CUDA equals the independent float64 reference (docs/design.md §2, §3).

tests/math/test_optim_reference.py on the GPU: the same problems (tests/support/reference.py), n backward()
calls per step (each one a GSNR sample), the implementation on CUDA with foreach on (multi-tensor kernels)
and off, the reference in float64 on the CPU. On CPU torch's foreach ops loop over the tensors, so only here
do the fused kernels run: a case with many tensors and large ones crosses their launch and chunk limits.
Bars: the CPU tests' (fp32: rtol 1e-5, atol 1e-6 x max(1, |W|), 10x on the autograd "model" problem;
bf16/fp16 parameters: 3e-2, as tests/properties/test_optim_properties.py's low-precision test).
"""

import copy
import functools
import warnings

import pytest
import torch

from ds_vrgd.optim import VR_OPTIMIZERS
from tests.gpu.cuda import MARKS
from tests.math.test_optim_reference import CONFIGS, MODEL_TOL_FACTOR, _assert_close, _seed
from tests.support.reference import Problem, run_impl, run_reference

pytestmark = MARKS

DEVICE = "cuda"
NAMES = list(VR_OPTIMIZERS)
FOREACH = [pytest.param(False, id="loop"), pytest.param(True, id="foreach")]
# (problem kind, n): n = 2 only on the direct problem (see MODEL_TOL_FACTOR), n = 8 for a longer sum
SAMPLES = [("direct", 2), ("direct", 8), ("model", 3), ("model", 8)]
# ~400k elements in 124 tensors: above the foreach kernels' tensors per launch (<= 110) and their
# 65536-element chunks, with ragged ends
MANY_AND_LARGE = ((200_003,), (513, 385), (3,), (1,)) + tuple((k % 7 + 1, 5) for k in range(120))
# tests/properties/test_optim_properties.py's low-precision configuration
LOW_PRECISION_CFG = {
    "VRSGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "VRAdam": dict(lr=0.02, weight_decay=0.01, eps=1e-6),  # eps 1e-8 underflows in fp16
    "VRAdamW": dict(lr=0.02, eps=1e-6),
    "VRLARS": dict(lr=0.1, trust_coefficient=0.5, weight_decay=0.01),
    "VRLAMB": dict(lr=0.02),
}
LOW_PRECISION_TOL = 3e-2


def problem_on(problem: Problem, device: str) -> Problem:
    """A copy of ``problem`` whose data (the direct problem's G, the model problem's batches) lie on ``device``,
    so that its losses are computed there; the reference keeps the CPU original."""
    moved = copy.copy(problem)
    if problem.kind == "direct":
        moved.G = [[[g.to(device) for g in sample] for sample in step] for step in problem.G]
    else:
        moved.data = [[(x.to(device), y.to(device)) for x, y in step] for step in problem.data]
    return moved


def run_on_device(problem: Problem, name: str, dtype=torch.float32, device: str = DEVICE, **hyper):
    """run_impl on ``device``: the parameters (leaves of ``dtype``) and the samples there; returns the optimizer
    and the final parameters on the CPU."""
    params = [torch.nn.Parameter(p.to(device=device, dtype=dtype)) for p in problem.init]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the n < 2 fallback warning is tested elsewhere
        params, optimizer = run_impl(problem_on(problem, device), VR_OPTIMIZERS[name], params=params, **hyper)
    assert all(p.device.type == torch.device(device).type and p.dtype == dtype for p in params)
    return optimizer, [p.detach().cpu() for p in params]


FP32_CASES = [
    pytest.param(kind, name, cfg, n, id=f"{kind}-{name}-c{ci}-n{n}")
    for kind, n in SAMPLES
    for name, cfgs in CONFIGS.items()
    for ci, cfg in enumerate(cfgs)
]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("problem_kind,name,cfg,n", FP32_CASES)
def test_fp32_matches_reference(problem_kind, name, cfg, n, foreach):
    problem = Problem(problem_kind, n=n, steps=4, seed=_seed(name, n, problem_kind))
    hyper = dict(cfg, gamma=0.5)
    _, params = run_on_device(problem, name, foreach=foreach, **hyper)
    _assert_close(params, run_reference(problem, name, **hyper).params,
                  MODEL_TOL_FACTOR if problem_kind == "model" else 1.0)


@functools.lru_cache(maxsize=1)
def _many_and_large() -> Problem:
    return Problem("direct", shapes=MANY_AND_LARGE, n=4, steps=3, seed=23)


@functools.lru_cache(maxsize=None)
def _many_and_large_reference(name: str) -> list:
    return run_reference(_many_and_large(), name, **dict(CONFIGS[name][-1], gamma=0.5)).params


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("name", NAMES)
def test_many_and_large_tensors_match_reference(name, foreach):
    _, params = run_on_device(_many_and_large(), name, foreach=foreach, **dict(CONFIGS[name][-1], gamma=0.5))
    _assert_close(params, _many_and_large_reference(name))


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("option", [dict(gsnr_warmup_steps=2), dict(gsnr_ema=0.5)], ids=["warmup2", "ema0.5"])
@pytest.mark.parametrize("name", NAMES)
def test_warmup_and_ema_match_reference(name, option, foreach):
    problem = Problem("direct", n=3, steps=5, seed=7)
    hyper = dict(CONFIGS[name][-1], gamma=0.5, **option)
    _, params = run_on_device(problem, name, foreach=foreach, **hyper)
    _assert_close(params, run_reference(problem, name, **hyper).params)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_params_match_reference(name, dtype, foreach):
    """bf16/fp16 parameters, so the samples are bf16/fp16: Q and the sample sum S are fp32 (docs/design.md §3)."""
    problem = Problem("direct", shapes=((7,), (5, 6)), n=4, steps=3, seed=10)
    hyper = dict(LOW_PRECISION_CFG[name], gamma=0.1)
    optimizer, params = run_on_device(problem, name, dtype=dtype, foreach=foreach, **hyper)
    captures = list(optimizer._moments._captures.values())
    assert captures and all(c.sq.dtype == c.sum.dtype == torch.float32 and c.sum.is_cuda for c in captures)
    for k, (p, r) in enumerate(zip(params, run_reference(problem, name, **hyper).params)):
        assert torch.isfinite(p).all(), f"param {k}"
        torch.testing.assert_close(p.double(), r, rtol=LOW_PRECISION_TOL, atol=LOW_PRECISION_TOL,
                                   msg=lambda m: f"param {k}: {m}")


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("name", NAMES)
def test_state_and_sums_stay_on_the_gpu(name, foreach):
    """Optimizer state (moments, momentum, the GSNR EMA) and the capture's Q on the parameters' device."""
    problem = Problem("model", n=3, steps=2, seed=5)
    optimizer, _ = run_on_device(problem, name, foreach=foreach, **dict(CONFIGS[name][-1], gamma=0.5, gsnr_ema=0.5))
    for state in optimizer.state.values():
        tensors = {key: value for key, value in state.items() if torch.is_tensor(value) and key != "step"}
        assert tensors and all(value.is_cuda for value in tensors.values()), {k: v.device for k, v in tensors.items()}
    assert all(c.sq.is_cuda for c in optimizer._moments._captures.values())
