"""Properties of the GSNR factor and of the VR optimizers (docs/design.md §2)."""

import copy
import inspect
import io
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_vrgd.gsnr import rho_from_moments
from ds_vrgd.optim import VR_OPTIMIZERS, VRSGD
from tests.support.reference import BASE_DEFAULTS, VR_DEFAULTS, Problem, rho_from_moments_ref, run_impl, run_reference, stats_ref

# One representative configuration per optimizer, with state worth checkpointing.
CFG = {
    "VRSGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "VRAdam": dict(lr=0.02, weight_decay=0.01),
    "VRAdamW": dict(lr=0.02),
    "VRLARS": dict(lr=0.1, trust_coefficient=0.5, weight_decay=0.01),
    "VRLAMB": dict(lr=0.02),
}
NAMES = list(VR_OPTIMIZERS)
HYP = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _quiet_run(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_impl(*a, **kw)


def _close(a, b, rtol=1e-5, atol=1e-6):
    for k, (x, y) in enumerate(zip(a, b)):
        y = y.detach().to(x.dtype) if torch.is_tensor(y) else y
        torch.testing.assert_close(x.detach(), y, rtol=rtol, atol=atol * max(1.0, y.abs().max().item()),
                                   msg=lambda m: f"param {k}: {m}")


# ---------------------------------------------------------------------------
# rho_from_moments (pure helper)
# ---------------------------------------------------------------------------

shapes = st.sampled_from([(1,), (5,), (3, 4), (2, 3, 2), (17,)])


@st.composite
def moments_fp32(draw, min_rel_var=0.05, allow_zero_var=False):
    """(m, s) in fp32 with s = m^2 + v, v >= min_rel_var * m^2 (well conditioned)."""
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=gen) * scale * torch.rand(shape, generator=gen).add(0.05)
    rel = min_rel_var + 3 * torch.rand(shape, generator=gen)
    v = rel * m * m + (0 if allow_zero_var else 1e-6 * scale * scale)
    return m.float(), (m * m + v).float()


@HYP
@given(mm=moments_fp32(), gamma=st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]))
def test_rho_matches_reference(mm, gamma):
    m, s = mm
    rho = rho_from_moments(m, s, gamma)
    assert rho.shape == m.shape
    ref = rho_from_moments_ref(m.double(), s.double(), gamma)
    torch.testing.assert_close(rho.double(), ref, rtol=1e-4, atol=1e-6)


@HYP
@given(mm=moments_fp32(), gamma=st.sampled_from([0.1, 0.5, 2.0]), k=st.integers(-20, 20))
def test_rho_scale_invariance_power_of_two(mm, gamma, k):
    """m -> c m, s -> c^2 s with c = 2^k: every fp operation scales exactly (eps_gsnr = 0)."""
    m, s = mm
    c = 2.0**k
    a = rho_from_moments(m, s, gamma, eps_gsnr=0.0)
    b = rho_from_moments(m * c, s * (c * c), gamma, eps_gsnr=0.0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@HYP
@given(mm=moments_fp32(), gamma=st.sampled_from([0.1, 0.5, 2.0]), c=st.floats(1e-3, 1e3))
def test_rho_scale_invariance(mm, gamma, c):
    """Any c: equal to rounding (eps_gsnr = 0 so that the absolute eps cannot matter for tiny moments)."""
    m, s = mm
    a = rho_from_moments(m, s, gamma, eps_gsnr=0.0)
    b = rho_from_moments(m * c, s * (c * c), gamma, eps_gsnr=0.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@HYP
@given(mm=moments_fp32(min_rel_var=0.0, allow_zero_var=True), gamma=st.floats(0.0, 5.0))
def test_rho_bounds(mm, gamma):
    m, s = mm
    rho = rho_from_moments(m, s, gamma)
    assert torch.isfinite(rho).all()
    lo, hi = max(0.0, 1.0 - gamma), 1.0 + gamma
    assert (rho >= lo - 1e-6).all() and (rho <= hi + 1e-6).all()
    if gamma == 0.0:
        assert torch.equal(rho, torch.ones_like(rho))


@HYP
@given(mm=moments_fp32())
def test_q_has_unit_mean_before_clamping(mm):
    m, s = mm
    rho = rho_from_moments(m, s, 1e9)
    assert torch.isfinite(rho).all() and (rho >= 0).all()
    assert rho.double().mean().item() == pytest.approx(1.0, rel=1e-5)


@HYP
@given(shape=shapes, scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e4]), seed=st.integers(0, 1000),
       gamma=st.sampled_from([0.1, 0.5, 1e9]))
def test_constant_gradient_v_zero_is_finite(shape, scale, seed, gamma):
    """v = 0 everywhere (identical samples): every nonzero element at the cap, so q = 1 there;
    uncapped (gsnr_max None), r = m^2/eps_gsnr, still finite, q = m^2/mean(m^2)."""
    m = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).float()
    s = m * m
    rho = rho_from_moments(m, s, gamma)
    assert torch.isfinite(rho).all()
    if gamma == 1e9:
        capped = ((m.double() ** 2) / 1e-20).clamp(max=1e3)
        torch.testing.assert_close(rho.double(), capped / capped.mean(), rtol=1e-4, atol=1e-6)
    uncapped = rho_from_moments(m, s, gamma, gsnr_max=None)
    assert torch.isfinite(uncapped).all()
    if gamma == 1e9:
        q = (m.double() ** 2) / (m.double() ** 2).mean()
        torch.testing.assert_close(uncapped.double(), q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 1e9])
@pytest.mark.parametrize("case", ["zero", "pure_noise"])
def test_zero_mean_layer_gives_rho_one(case, gamma):
    """mean_k(r_k) = 0 (all-zero gradient, or zero mean with noise): q = 1 -> rho = 1."""
    m = torch.zeros(3, 4)
    s = torch.zeros(3, 4) if case == "zero" else torch.rand(3, 4) + 0.1
    assert torch.equal(rho_from_moments(m, s, gamma), torch.ones(3, 4))


def test_rho_negative_variance_is_clamped():
    """s < m^2 (rounding) must act as v = 0, not as a negative variance (uncapped; capped: r = gsnr_max)."""
    m = torch.tensor([1e-3, 2e-3, 3e-3])
    s = m * m - torch.tensor([1e-9, 0.0, 0.0])
    rho = rho_from_moments(m, s, 1e9, gsnr_max=None)
    ref = (m.double() ** 2) / (m.double() ** 2).mean()
    torch.testing.assert_close(rho.double(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_v_zero_layer_follows_the_formula(scale):
    """Uncapped (gsnr_max None), v = 0 everywhere: r_j = m_j^2 / eps_gsnr as the formula writes it, so
    q_j = m_j^2 / mean(m^2), whatever the gradient's magnitude (fp32 holds r up to
    ~1e38, i.e. |m| up to ~1e9 with eps_gsnr = 1e-20)."""
    m = torch.tensor([1.0, 2.0, 3.0]) * scale
    rho = rho_from_moments(m, m * m, 1e9, gsnr_max=None)
    torch.testing.assert_close(rho.double(), torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64) / (14 / 3),
                               rtol=1e-5, atol=1e-7)
    # one noisy element among noiseless ones: it gets r ~ 0, the others keep their ratio
    s = m * m
    s[0] += 0.5 * scale**2
    rho = rho_from_moments(m, s, 1e9, gsnr_max=None)
    ref = torch.tensor([0.0, 4.0, 9.0], dtype=torch.float64) / (13 / 3)
    torch.testing.assert_close(rho.double(), ref, rtol=1e-5, atol=1e-7)


def test_one_rounded_zero_variance_does_not_set_the_layer_mean():
    """The failure the cap exists for (docs/design.md §3): one element whose fp32 variance
    rounds to 0 among noisy ones. Uncapped, its r = m^2 / eps_gsnr sets the layer's mean and
    every other element drops to the lower bound; capped, the others keep their float64 rho."""
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(8, 1000, generator=gen, dtype=torch.float64) * 0.5 + 1.0
    samples[:, 0] = 0.25 + 1e-9 * torch.arange(8)  # nearly identical samples: v ~ 1e-17, lost in fp32
    m, s = samples.mean(0), (samples * samples).mean(0)
    ref = rho_from_moments_ref(m, s, 0.1)
    rho = rho_from_moments(m.float(), s.float(), 0.1)
    assert ((rho.double() - ref).abs() <= 1e-3).double().mean() >= 0.999
    uncapped = rho_from_moments(m.float(), s.float(), 0.1, gsnr_max=None)
    assert (uncapped[1:] == 0.9).all()  # the old estimator: the whole layer at the lower bound
    assert (ref[1:] > 0.9).double().mean() > 0.2


# ---------------------------------------------------------------------------
# Defaults and validation
# ---------------------------------------------------------------------------


def _default(opt, cls, key):
    if key in opt.defaults:
        return opt.defaults[key]
    if key in opt.param_groups[0]:
        return opt.param_groups[0][key]
    return inspect.signature(cls.__init__).parameters[key].default


@pytest.mark.parametrize("name", NAMES)
def test_constructor_defaults(name):
    cls = VR_OPTIMIZERS[name]
    opt = cls([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    expected = {**BASE_DEFAULTS[name], **VR_DEFAULTS}
    expected.pop("lr", None)
    for key, val in expected.items():
        got = _default(opt, cls, key)
        if isinstance(val, tuple):
            got = tuple(got)
        assert got == val, f"{name}.{key}: default {got!r}, docs/design.md says {val!r}"


def _p():
    return [torch.nn.Parameter(torch.zeros(2, 2))]


INVALID = [
    (name, kw, key)
    for name in NAMES
    for kw, key in [
        (dict(lr=-1.0), "lr"),
        (dict(gamma=-0.1), "gamma"),
        (dict(eps_gsnr=-1e-20), "eps_gsnr"),
        (dict(weight_decay=-0.01), "weight_decay"),
        (dict(gsnr_ema=1.0), "gsnr_ema"),
        (dict(gsnr_ema=-0.1), "gsnr_ema"),
    ]
] + [
    ("VRSGD", dict(momentum=-0.9), "momentum"),
    ("VRLARS", dict(momentum=-0.9), "momentum"),
    ("VRSGD", dict(nesterov=True), "nesterov"),
    ("VRSGD", dict(nesterov=True, momentum=0.0), "nesterov"),
] + [
    (name, kw, key)
    for name in ("VRAdam", "VRAdamW", "VRLAMB")
    for kw, key in [
        (dict(betas=(1.0, 0.999)), "beta"),
        (dict(betas=(0.9, 1.0)), "beta"),
        (dict(betas=(-0.1, 0.999)), "beta"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-8), "eps"),
    ]
]


@pytest.mark.parametrize("name,kw,key", INVALID, ids=[f"{n}-{k}-{v}" for n, v, k in INVALID])
def test_invalid_hyperparameters_raise_valueerror_naming_them(name, kw, key):
    args = dict(lr=0.1, **kw) if "lr" not in kw else dict(kw)
    with pytest.raises(ValueError) as info:
        VR_OPTIMIZERS[name](_p(), **args)
    assert key in str(info.value), f"message does not name {key!r}: {info.value}"


@pytest.mark.parametrize("name", NAMES)
def test_unknown_kwarg_is_valueerror_listing_valid_keys(name):
    with pytest.raises(ValueError) as info:
        VR_OPTIMIZERS[name](_p(), lr=0.1, gamma_typo=0.3)
    msg = str(info.value)
    assert "gamma_typo" in msg
    for valid in ("lr", "gamma", "eps_gsnr", "gsnr_warmup_steps", "gsnr_ema", "vr"):
        assert valid in msg, f"valid key {valid!r} not listed: {msg}"


# ---------------------------------------------------------------------------
# Samples, fallback, scale invariance
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_single_sample_falls_back_with_exactly_one_warning(name):
    problem = Problem("direct", n=1, steps=4, seed=1)
    params = problem.make_params()
    opt = VR_OPTIMIZERS[name](params, **CFG[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(problem.steps):
            problem.loss(params, t, 0).backward()
            opt.step()
            opt.zero_grad()
    user = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(user) == 1, [str(w.message) for w in user]
    base, _ = _quiet_run(problem, VR_OPTIMIZERS[name], vr=False, **CFG[name])
    _close(params, base, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", ["VRSGD", "VRLAMB"])
def test_zero_grad_starts_a_new_sample_collection(name, set_to_none):
    """Backward calls before zero_grad() are not samples of the next step."""
    problem = Problem("direct", n=3, steps=3, seed=2)
    params = problem.make_params()
    opt = VR_OPTIMIZERS[name](params, gamma=0.5, **CFG[name])
    for t in range(problem.steps):
        for i in range(problem.n):  # a discarded pass (e.g. an evaluation backward)
            problem.loss(params, (t + 1) % problem.steps, i).backward()
        opt.zero_grad(set_to_none=set_to_none)
        for i in range(problem.n):
            problem.loss(params, t, i).backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    ref = run_reference(problem, name, gamma=0.5, **CFG[name])
    _close(params, ref.params)


def _grad_rescaler(factors):
    def before_step(params, opt):
        with torch.no_grad():
            for p, f in zip(params, factors):
                p.grad.mul_(f)

    return before_step


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "factors", [(1 / 3, 1 / 3), (0.5, 4.0), (1e-3, 1e-3)], ids=["mean", "per_tensor", "tiny"]
)
def test_user_rescale_of_grad_keeps_rho(name, factors):
    """p.grad rescaled between backward and step: the update uses the rescaled grad,
    rho the GSNR of the samples (unchanged by any per-tensor uniform rescale)."""
    problem = Problem("direct", n=3, steps=4, seed=3)
    params, _ = run_impl(problem, VR_OPTIMIZERS[name], before_step=_grad_rescaler(factors), gamma=0.5, **CFG[name])
    ref = run_reference(problem, name, grad_transform=lambda gs: [g * f for g, f in zip(gs, factors)],
                        gamma=0.5, **CFG[name])
    _close(params, ref.params)


def _assert_scaled_run_is_plain(name: str, seed: int, backward, step) -> None:
    """A run whose micro-batch losses go through ``backward(loss)`` and whose steps go through
    ``step(opt, params)`` ends at the parameters of the plain run."""
    problem = Problem("model", n=3, steps=4, seed=seed)
    plain, _ = run_impl(problem, VR_OPTIMIZERS[name], gamma=0.5, **CFG[name])
    params = problem.make_params()
    opt = VR_OPTIMIZERS[name](params, gamma=0.5, **CFG[name])
    for t in range(problem.steps):
        for i in range(problem.n):
            backward(problem.loss(params, t, i))
        step(opt, params)
        opt.zero_grad()
    _close(params, plain)


@pytest.mark.parametrize("name", NAMES)
def test_loss_scale_then_unscale_is_invariant(name):
    """loss * 1024 backward, then p.grad /= 1024 (manual GradScaler) == plain run."""

    def unscale_and_step(opt, params):
        with torch.no_grad():
            for p in params:
                p.grad.div_(1024.0)
        opt.step()

    _assert_scaled_run_is_plain(name, 4, lambda loss: (loss * 1024.0).backward(), unscale_and_step)


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_cpu(name):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)

    def scaler_step(opt, params):
        scaler.step(opt)
        scaler.update()

    _assert_scaled_run_is_plain(name, 5, lambda loss: scaler.scale(loss).backward(), scaler_step)


@pytest.mark.parametrize("name", NAMES)
def test_clip_grad_norm_keeps_rho(name):
    problem = Problem("direct", n=3, steps=4, seed=6)
    max_norm = 0.5

    def clip(params, opt):
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        assert total > 2 * max_norm  # clipping is active

    def clip_ref(gs):
        total = math.sqrt(sum((g * g).sum().item() for g in gs))
        return [g * (max_norm / (total + 1e-6)) for g in gs]

    params, _ = run_impl(problem, VR_OPTIMIZERS[name], before_step=clip, gamma=0.5, **CFG[name])
    ref = run_reference(problem, name, grad_transform=clip_ref, gamma=0.5, **CFG[name])
    _close(params, ref.params)


# ---------------------------------------------------------------------------
# Non-finite gradients, checkpoints, param groups, dtypes, foreach
# ---------------------------------------------------------------------------


def _assert_same_tree(a, b, path="state_dict"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), path
    elif isinstance(a, dict):
        ka = {k for k in a if "skip" not in str(k)}
        kb = {k for k in b if "skip" not in str(k)}
        assert ka == kb, f"{path}: keys {sorted(map(str, ka ^ kb))} differ"
        for k in ka:
            _assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("how", ["inf_grad", "nan_grad", "inf_sample"])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_skips_the_step(name, how):
    problem = Problem("direct", n=3, steps=4, seed=7)
    hyper = dict(gamma=0.5, gsnr_ema=0.5, **CFG[name])
    params = problem.make_params()
    opt = VR_OPTIMIZERS[name](params, **hyper)

    def train_step(t):
        for i in range(problem.n):
            problem.loss(params, t, i).backward()
        opt.step()
        opt.zero_grad()

    train_step(0)
    train_step(1)
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict())
    before_skipped = getattr(opt, "skipped_steps", 0)
    for i in range(problem.n):
        if how == "inf_sample" and i == 1:
            (problem.loss(params, 2, i) + (params[0] * float("inf")).sum()).backward()
        else:
            problem.loss(params, 2, i).backward()
    with torch.no_grad():
        if how == "inf_grad":
            params[1].grad[0, 0] = float("inf")
        elif how == "nan_grad":
            params[1].grad[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning):
        opt.step()
    opt.zero_grad()
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    after_state = opt.state_dict()
    assert after_state["vr"].pop("skipped_steps") == before_state["vr"].pop("skipped_steps") + 1  # only the count
    _assert_same_tree(after_state, before_state)
    assert opt.skipped_steps == before_skipped + 1
    # training goes on as if the bad step never happened
    train_step(2)
    train_step(3)
    clean, _ = run_impl(problem, VR_OPTIMIZERS[name], **hyper)
    _close(params, clean, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("extra", [dict(gsnr_ema=0.7), dict(gsnr_warmup_steps=3), dict(gsnr_interval=3),
                                   dict(gsnr_interval=4, gsnr_ema=0.5)], ids=["ema", "warmup", "interval", "interval-ema"])
def test_state_dict_round_trip_continues_exactly(name, extra):
    """Saved after step 2 (with gsnr_interval: between statistics steps 1 and 4, so the held rho and the
    schedule's position travel in the state_dict)."""
    problem = Problem("model", n=3, steps=6, seed=8)
    hyper = dict(gamma=0.5, **extra, **CFG[name])
    straight, straight_opt = run_impl(problem, VR_OPTIMIZERS[name], **hyper)

    params = problem.make_params()
    opt = VR_OPTIMIZERS[name](params, **hyper)
    for t in range(2):
        for i in range(problem.n):
            problem.loss(params, t, i).backward()
        opt.step()
        opt.zero_grad()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    del opt

    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = VR_OPTIMIZERS[name](params2, **hyper)
    opt2.load_state_dict(saved_state)
    for t in range(2, problem.steps):
        for i in range(problem.n):
            problem.loss(params2, t, i).backward()
        opt2.step()
        opt2.zero_grad()
    for a, b in zip(params2, straight):
        assert torch.equal(a.detach(), b.detach()), (a - b).abs().max()
    assert opt2.gsnr_stats() == straight_opt.gsnr_stats()  # the last statistics came back with the state


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_with_weights_only(name):
    """torch.load's default (weights_only=True) must be able to read the state_dict."""
    problem = Problem("model", n=3, steps=2, seed=9)
    params, opt = run_impl(problem, VR_OPTIMIZERS[name], gsnr_ema=0.5, **CFG[name])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    _assert_same_tree(loaded, opt.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_params(name, dtype):
    """bf16/fp16 params: finite, close to the fp32 run; constant (v = 0) and all-zero
    gradient tensors keep rho (and the step) finite."""
    problem = Problem("direct", shapes=((7,), (5, 6)), n=4, steps=3, seed=10)
    cfg = dict(CFG[name], gamma=0.1)
    if name in ("VRAdam", "VRAdamW"):
        # eps=1e-8 underflows to 0 in fp16, and then an all-zero gradient gives 0/0 = NaN
        # in torch.optim.Adam/AdamW themselves (base optimizer behaviour, not VR's).
        cfg["eps"] = 1e-6

    def run(dt):
        params = problem.make_params(dt)
        const = torch.nn.Parameter(torch.ones(3, 4, dtype=dt))
        zero = torch.nn.Parameter(torch.ones(6, dtype=dt))
        c_grad = torch.linspace(-1.0, 1.0, 12).reshape(3, 4).to(dt)
        opt = VR_OPTIMIZERS[name](params + [const, zero], **cfg)
        for t in range(problem.steps):
            for i in range(problem.n):
                loss = problem.loss(params, t, i) + (const * c_grad).sum() + 0.0 * zero.sum()
                loss.backward()
            opt.step()
            opt.zero_grad()
        return params + [const, zero]

    low = run(dtype)
    ref = run(torch.float32)
    for p, r in zip(low, ref):
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().float(), r.detach(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", NAMES)
def test_foreach_true_false_none_agree(name):
    problem = Problem("model", n=3, steps=4, seed=11)
    hyper = dict(gamma=0.5, **CFG[name])
    runs = [_quiet_run(problem, VR_OPTIMIZERS[name], foreach=f, **hyper)[0] for f in (False, True, None)]
    _close(runs[1], runs[0], rtol=1e-6, atol=1e-7)
    _close(runs[2], runs[0], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# gsnr_stats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.1, 0.5])
@pytest.mark.parametrize("name", ["VRSGD", "VRLAMB"])
def test_gsnr_stats_match_reference(name, gamma):
    problem = Problem("direct", shapes=((7,), (5, 6), (4, 3)), n=4, steps=1, seed=12)
    params = problem.make_params()
    opt = VR_OPTIMIZERS[name]([{"params": params[:2]}, {"params": params[2:]}], gamma=gamma, **CFG[name])
    for i in range(problem.n):
        problem.loss(params, 0, i).backward()
    opt.step()
    stats = opt.gsnr_stats()
    ref = stats_ref(problem.sample_grads(problem.init, 0), gamma)
    for key in ("n", "step", "noise_ratio", "b_simple", "layers"):
        assert key in stats, key
    assert stats["n"] == problem.n and isinstance(stats["n"], int)
    assert stats["step"] == 1
    assert stats["b_simple"] is None
    assert stats["noise_ratio"] == pytest.approx(ref["noise_ratio"], rel=1e-4)
    assert set(stats["layers"]) == {"param_0", "param_1", "param_2"}
    for lname, lref in ref["layers"].items():
        got = stats["layers"][lname]
        assert got["gsnr_mean"] == pytest.approx(lref["gsnr_mean"], rel=1e-4)
        assert got["frac_low"] == pytest.approx(lref["frac_low"], abs=1e-6)
        assert got["frac_high"] == pytest.approx(lref["frac_high"], abs=1e-6)
        assert 0 <= got["frac_low"] + got["frac_high"] <= 1
    assert any(lr["frac_low"] > 0 for lr in ref["layers"].values())  # the fractions are exercised
    b = opt.gsnr_stats(micro_batch_size=16)
    assert b["b_simple"] == pytest.approx(16 * ref["noise_ratio"], rel=1e-4)


def test_gsnr_stats_after_several_steps_and_named_params():
    problem = Problem("direct", n=3, steps=3, seed=13)
    params = problem.make_params()
    named = [("encoder.weight", params[1]), ("encoder.bias", params[0])]
    opt = VRSGD(named, lr=0.05, momentum=0.9)
    for t in range(problem.steps):
        for i in range(problem.n):
            problem.loss(params, t, i).backward()
        opt.step()
        opt.zero_grad()
    stats = opt.gsnr_stats(micro_batch_size=8)
    assert stats["step"] == 3 and stats["n"] == 3
    assert set(stats["layers"]) == {"encoder.weight", "encoder.bias"}
    assert stats["b_simple"] == pytest.approx(8 * stats["noise_ratio"], rel=1e-6)
    for layer in stats["layers"].values():
        assert math.isfinite(layer["gsnr_mean"]) and layer["gsnr_mean"] >= 0
        assert 0 <= layer["frac_low"] + layer["frac_high"] <= 1


def test_gsnr_stats_noise_ratio_is_scale_invariant():
    """The statistics use the samples' moments, unchanged by p.grad /= n before step."""
    problem = Problem("direct", n=4, steps=1, seed=14)
    out = []
    for factor in (1.0, 0.25):
        params = problem.make_params()
        opt = VRSGD(params, lr=0.1)
        for i in range(problem.n):
            problem.loss(params, 0, i).backward()
        with torch.no_grad():
            for p in params:
                p.grad.mul_(factor)
        opt.step()
        out.append(opt.gsnr_stats())
    assert out[0]["noise_ratio"] == pytest.approx(out[1]["noise_ratio"], rel=1e-5)
    for k in out[0]["layers"]:
        assert out[0]["layers"][k]["gsnr_mean"] == pytest.approx(out[1]["layers"][k]["gsnr_mean"], rel=1e-4)


@pytest.mark.parametrize("foreach", [False, True])
def test_bound_counts_exact_for_small_pieces_estimated_for_large(foreach):
    from ds_vrgd._tensor_lists import ListOps
    from ds_vrgd.gsnr import COUNT_SAMPLE, bound_counts

    generator = torch.Generator().manual_seed(0)
    large = (torch.rand(5 * COUNT_SAMPLE + 123, generator=generator) * 0.4 + 0.8).clamp(0.9, 1.1)
    small = large[:COUNT_SAMPLE].clone()
    counts = bound_counts([large, small], 0.9, 1.1, ListOps(foreach))
    exact = torch.tensor([[(x <= 0.9).sum() for x in (large, small)], [(x >= 1.1).sum() for x in (large, small)]])
    assert torch.equal(counts[:, 1], exact[:, 1].float())
    assert torch.allclose(counts[:, 0] / large.numel(), exact[:, 0] / large.numel(), atol=0.01)
    assert not torch.equal(counts[:, 0], exact[:, 0].float())  # it is an estimate (else the test is vacuous)
