"""vr=False (and gamma=0) against the peer optimizers (docs/design.md §2).

* VRSGD / VRAdam / VRAdamW with vr=False or gamma=0 equal torch.optim.SGD /
  Adam / AdamW to fp32 tolerance.
* VRLARS / VRLAMB with vr=False are compared with pytorch_optimizer's LARS and
  Lamb (pytorch-optimizer 4.x). Where the variants agree the test asserts
  equality; where they differ the test asserts the difference is exactly the
  one documented below (so the documentation cannot go stale).

Variant differences, VRLAMB (docs/design.md §2) vs pytorch_optimizer.Lamb:
  L1 bias correction: VRLAMB uses m_hat = m/(1-b1^t), v_hat = v/(1-b2^t) inside
     the update and the trust ratio. Lamb never corrects v and corrects m only
     through the step size lr/(1-b1^t), applied AFTER the trust ratio: with the
     same state its step is 1/(1-b1^t) times VRLAMB's (10x at t=1 for b1=0.9).
     With b1 = 0 they agree (v's correction is a per-tensor scalar that the
     trust ratio cancels when eps and weight decay are negligible).
  L2 weight decay: Lamb's default weight_decouple=True decays W <- W(1-lr*wd)
     before the step and keeps wd out of the trust-ratio'd update; VRLAMB adds
     wd*W to the update before the trust ratio (Lamb's weight_decouple=False).
  L3 trust clipping: VRLAMB clips the ratio, min(||W||/||a||, max_trust_ratio=10);
     Lamb clamps the weight norm, min(||W||, 10)/(||u|| + eps), and does not
     clip the ratio.
  L4 eps in the trust ratio: Lamb divides by ||u|| + eps, VRLAMB by ||a||.
  L5 exclude_1d: VRLAMB (default) gives tensors with ndim <= 1 trust 1 and
     wd 0; Lamb applies trust ratio and wd to every tensor (equivalent: a
     param group with weight_decay=0, adam=True for the 1-D tensors).
  L6 Lamb extras absent from VRLAMB: pre_norm/max_grad_norm (global gradient
     rescaling, off by default), rectify (RAdam), grad_averaging=False,
     adam=True, fixed_decay, adanorm.
Variant differences, VRLARS vs pytorch_optimizer.LARS:
  R1 trust ratio with weight decay: LARS uses tc*||W|| / (||g|| + wd*||W||)
     (triangle-inequality bound), VRLARS tc*||W|| / ||g + wd*W||; equal when
     wd = 0.
  R2 exclusion: LARS always exempts ndim <= 1 tensors from trust ratio and wd
     (= VRLARS exclude_1d=True); VRLARS(exclude_1d=False) has no LARS twin.
  R3 LARS has dampening and nesterov options; VRLARS (docs/design.md) has neither (its
     momentum is b <- mu*b + trust*a, LARS's with dampening=0, nesterov=False).
  R4 Equal otherwise: momentum buffer initialised to the first trust-scaled
     update, trust = 1 when ||W|| or the denominator is 0, W <- W - lr*b.
"""

import warnings

import pytest
import torch
from pytorch_optimizer import LARS, Lamb

from ds_vrgd.optim import VRLAMB, VRLARS, VRSGD, VRAdam, VRAdamW
from tests.support.reference import Problem, run_impl

RTOL, ATOL = 2e-6, 1e-6


def _close(a, b, rtol=RTOL, atol=ATOL):
    for k, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol, msg=lambda m: f"param {k}: {m}")


def _far(a, b, min_diff=1e-4):
    d = max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b))
    assert d > min_diff, f"expected a visible difference, got {d:g}"


def _run(problem, cls, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_impl(problem, cls, **kw)[0]


VR_OFF = [pytest.param(dict(vr=False), id="vr_off"), pytest.param(dict(gamma=0.0), id="gamma0")]
PROBLEMS = ["direct", "model"]

# ---------------------------------------------------------------------------
# torch.optim peers
# ---------------------------------------------------------------------------

SGD_CFGS = [
    dict(lr=0.1),
    dict(lr=0.1, weight_decay=0.05),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05),
    dict(lr=0.1, momentum=0.8, nesterov=True),
    dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05),
]
ADAM_CFGS = [dict(lr=0.02), dict(lr=0.02, weight_decay=0.1), dict(lr=0.02, betas=(0.5, 0.9), eps=1e-6)]
ADAMW_CFGS = [dict(lr=0.02), dict(lr=0.02, weight_decay=0.0), dict(lr=0.02, weight_decay=0.2, betas=(0.5, 0.9))]


@pytest.mark.parametrize("off", VR_OFF)
@pytest.mark.parametrize("kind", PROBLEMS)
@pytest.mark.parametrize(
    "ours,theirs,cfg",
    [(VRSGD, torch.optim.SGD, c) for c in SGD_CFGS]
    + [(VRAdam, torch.optim.Adam, c) for c in ADAM_CFGS]
    + [(VRAdamW, torch.optim.AdamW, c) for c in ADAMW_CFGS],
    ids=[f"SGD{i}" for i in range(len(SGD_CFGS))]
    + [f"Adam{i}" for i in range(len(ADAM_CFGS))]
    + [f"AdamW{i}" for i in range(len(ADAMW_CFGS))],
)
def test_equals_torch_optim(ours, theirs, cfg, kind, off):
    problem = Problem(kind, n=3, steps=5, seed=1)
    a = _run(problem, ours, **cfg, **off)
    b = _run(problem, theirs, foreach=False, **cfg)
    _close(a, b)
    # power: the VR factor would have changed the result
    _far(_run(problem, ours, gamma=0.5, **cfg), b)


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_default_weight_decay_matches_torch(foreach):
    """VRAdamW's default weight_decay is torch.optim.AdamW's (1e-2)."""
    problem = Problem("model", n=2, steps=4, seed=2)
    _close(_run(problem, VRAdamW, lr=0.05, vr=False), _run(problem, torch.optim.AdamW, lr=0.05, foreach=foreach))


# ---------------------------------------------------------------------------
# LARS
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("off", VR_OFF)
@pytest.mark.parametrize("kind", PROBLEMS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_vrlars_equals_pytorch_optimizer_lars_without_weight_decay(momentum, kind, off):
    problem = Problem(kind, n=3, steps=5, seed=3)
    cfg = dict(lr=0.1, momentum=momentum, trust_coefficient=0.5, weight_decay=0.0)
    a = _run(problem, VRLARS, **cfg, **off)  # exclude_1d=True by default = LARS's ndim > 1 rule (R2)
    b = _run(problem, LARS, foreach=False, **cfg)
    _close(a, b)
    _far(_run(problem, VRLARS, gamma=0.5, **cfg), b)


def test_vrlars_vs_lars_weight_decay_trust_denominator():
    """R1: one step from the same W: LARS's step on a 2-D tensor is VRLARS's times
    ||g + wd W|| / (||g|| + wd ||W||); 1-D tensors (excluded, no wd) agree."""
    problem = Problem("direct", n=3, steps=1, seed=4, c=0.0)
    cfg = dict(lr=0.1, momentum=0.9, trust_coefficient=0.5, weight_decay=0.3)
    a = _run(problem, VRLARS, vr=False, **cfg)
    b = _run(problem, LARS, foreach=False, **cfg)
    for k, W0 in enumerate(problem.init):
        W0 = W0.float()
        g = sum(problem.G[0][i][k] for i in range(problem.n)).float()
        da, db = a[k].detach() - W0, b[k].detach() - W0
        if W0.ndim <= 1:
            torch.testing.assert_close(db, da)
        else:
            factor = (g + 0.3 * W0).norm() / (g.norm() + 0.3 * W0.norm())
            assert factor < 0.99  # the difference is real on this problem
            torch.testing.assert_close(db, da * factor, rtol=1e-5, atol=1e-7)


def test_vrlars_exclude_1d_false_has_no_lars_twin():
    """R2: with exclude_1d=False a 1-D tensor gets the trust ratio; LARS's 1-D step is plain SGD."""
    problem = Problem("direct", n=3, steps=1, seed=5, c=0.0)
    cfg = dict(lr=0.1, momentum=0.0, trust_coefficient=0.5, weight_decay=0.0)
    a = _run(problem, VRLARS, vr=False, exclude_1d=False, **cfg)
    b = _run(problem, LARS, foreach=False, **cfg)
    k = 0  # the (7,) tensor
    W0 = problem.init[k].float()
    g = sum(problem.G[0][i][k] for i in range(problem.n)).float()
    torch.testing.assert_close(b[k].detach(), W0 - 0.1 * g)
    torch.testing.assert_close(a[k].detach(), W0 - 0.1 * 0.5 * W0.norm() / g.norm() * g, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# LAMB
# ---------------------------------------------------------------------------


def _lamb_groups_excluding_1d(params):
    """Lamb configured like exclude_1d=True (L5): 1-D tensors get trust 1 and no wd."""
    return [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "adam": True},
    ]


@pytest.mark.parametrize("off", VR_OFF)
@pytest.mark.parametrize("kind", PROBLEMS)
@pytest.mark.parametrize("exclude_1d", [False, True])
def test_vrlamb_equals_lamb_without_bias_correction(exclude_1d, kind, off):
    """betas = (0, 0) removes L1; weight_decouple=False removes L2; max_trust_ratio
    large and ||W|| < 10 remove L3; L4 is below tolerance; L5 via param groups."""
    problem = Problem(kind, n=3, steps=5, seed=6)
    assert all(p.norm() < 10 for p in problem.init)
    a = _run(problem, VRLAMB, lr=0.05, betas=(0.0, 0.0), eps=1e-6, weight_decay=0.1,
             max_trust_ratio=1e4, exclude_1d=exclude_1d, **off)
    b = _run(problem, Lamb, lr=0.05, betas=(0.0, 0.0), eps=1e-6, weight_decay=0.1, weight_decouple=False,
             foreach=False, param_arg=_lamb_groups_excluding_1d if exclude_1d else None)
    _close(a, b, rtol=1e-5)
    _far(_run(problem, VRLAMB, lr=0.05, betas=(0.0, 0.0), eps=1e-6, weight_decay=0.1, max_trust_ratio=1e4,
              exclude_1d=exclude_1d, gamma=0.5), b)


@pytest.mark.parametrize("kind", PROBLEMS)
def test_vrlamb_equals_lamb_beta1_zero(kind):
    """L1 with b1 = 0: v's bias correction is a per-tensor scalar cancelled by the
    trust ratio (wd = 0, eps negligible), so the variants agree for any b2."""
    problem = Problem(kind, n=3, steps=5, seed=7)
    a = _run(problem, VRLAMB, vr=False, lr=0.05, betas=(0.0, 0.99), eps=1e-12, weight_decay=0.0,
             max_trust_ratio=1e4, exclude_1d=False)
    b = _run(problem, Lamb, lr=0.05, betas=(0.0, 0.99), eps=1e-12, weight_decay=0.0, foreach=False)
    _close(a, b, rtol=1e-5, atol=1e-5)


def _lamb_one_step_each(problem, vr_kw, lamb_kw, steps):
    """Step both optimizers with identical gradients (W-independent) while syncing
    Lamb's params to VRLAMB's before every step; return the per-step deltas."""
    pa = problem.make_params()
    pb = problem.make_params()
    oa = VRLAMB(pa, **vr_kw)
    ob = Lamb(pb, foreach=False, **lamb_kw)
    out = []
    for t in range(steps):
        with torch.no_grad():
            for x, y in zip(pa, pb):
                y.copy_(x)
        before = [x.detach().clone() for x in pa]
        for ps, o in ((pa, oa), (pb, ob)):
            for i in range(problem.n):
                problem.loss(ps, t, i).backward()
            o.step()
            o.zero_grad()
        out.append([(x.detach() - w, y.detach() - w) for x, y, w in zip(pa, pb, before)])
    return out


def test_vrlamb_vs_lamb_bias_correction_factor():
    """L1: with the same state and W, Lamb's step = VRLAMB's step / (1 - b1^t)."""
    problem = Problem("direct", n=3, steps=4, seed=8, c=0.0)
    b1 = 0.9
    common = dict(lr=0.01, betas=(b1, 0.999), eps=1e-12, weight_decay=0.0)
    deltas = _lamb_one_step_each(problem, dict(common, vr=False, max_trust_ratio=1e4, exclude_1d=False),
                                 common, 4)
    for t, per_param in enumerate(deltas, start=1):
        for da, db in per_param:
            torch.testing.assert_close(db, da / (1 - b1**t), rtol=1e-4, atol=1e-7)


def test_vrlamb_vs_lamb_weight_norm_clamp():
    """L3: for ||W|| > 10, Lamb's trust uses 10 instead of ||W||."""
    problem = Problem("direct", n=3, steps=1, seed=9, c=0.0, param_scale=6.0)
    norms = [p.norm().item() for p in problem.init]
    assert norms[1] > 10
    deltas = _lamb_one_step_each(
        problem,
        dict(lr=0.01, betas=(0.0, 0.0), eps=1e-6, weight_decay=0.0, vr=False, max_trust_ratio=1e4, exclude_1d=False),
        dict(lr=0.01, betas=(0.0, 0.0), eps=1e-6, weight_decay=0.0),
        1,
    )[0]
    for (da, db), nw in zip(deltas, norms):
        torch.testing.assert_close(db, da * min(nw, 10.0) / nw, rtol=1e-5, atol=1e-7)


def test_vrlamb_max_trust_ratio_clips_the_ratio():
    """L3, VRLAMB side: trust = min(||W||/||a||, max_trust_ratio) (vr=False, betas 0:
    a = g/(|g|+eps), so ||a|| ~ sqrt(J))."""
    problem = Problem("direct", n=3, steps=1, seed=10, c=0.0)
    p, _ = run_impl(problem, VRLAMB, lr=0.01, betas=(0.0, 0.0), eps=1e-6, weight_decay=0.0, vr=False,
                    max_trust_ratio=0.25, exclude_1d=False)
    for k, W0 in enumerate(problem.init):
        W0 = W0.float()
        g = sum(problem.G[0][i][k] for i in range(problem.n)).float()
        a = g / (g.abs() + 1e-6)
        trust = min(W0.norm().item() / a.norm().item(), 0.25)
        assert W0.norm() / a.norm() > 0.25
        torch.testing.assert_close(p[k].detach(), W0 - 0.01 * trust * a, rtol=1e-5, atol=1e-7)


def test_vrlamb_vs_lamb_decoupled_weight_decay():
    """L2: Lamb's default decoupled decay is W' = (1 - lr wd) W, then a trust-scaled
    step on u alone; VRLAMB puts wd W inside the trust-scaled update."""
    problem = Problem("direct", n=3, steps=1, seed=11, c=0.0)
    lr, wd, eps = 0.05, 0.2, 1e-6
    deltas = _lamb_one_step_each(
        problem,
        dict(lr=lr, betas=(0.0, 0.0), eps=eps, weight_decay=wd, vr=False, max_trust_ratio=1e4, exclude_1d=False),
        dict(lr=lr, betas=(0.0, 0.0), eps=eps, weight_decay=wd),  # weight_decouple=True (default)
        1,
    )[0]
    for k, (da, db) in enumerate(deltas):
        W0 = problem.init[k].float()
        g = sum(problem.G[0][i][k] for i in range(problem.n)).float()
        u = g / (g.abs() + eps)
        Wd = W0 * (1 - lr * wd)
        lamb = Wd - lr * min(Wd.norm().item(), 10.0) / (u.norm().item() + eps) * u - W0
        a = u + wd * W0
        ours = -lr * W0.norm() / a.norm() * a
        torch.testing.assert_close(db, lamb, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(da, ours, rtol=1e-5, atol=1e-7)
        assert (da - db).abs().max() > 1e-4


# ---------------------------------------------------------------------------
# bit-identical to torch.optim: cache tiles, foreach, parameters that skip steps
# ---------------------------------------------------------------------------


def _skipping_run(cls, monkeypatch, tile, **kw):
    """4 steps of 3 backward passes; the last parameter has no gradient in steps 0 and 2."""
    if tile is not None:
        monkeypatch.setattr("ds_vrgd.optim._base.CPU_TILE_NUMEL", tile)
    problem = Problem("direct", shapes=((7,), (5, 6), (4, 3)), n=3, steps=4, seed=21)
    params = problem.make_params()
    opt = cls(params, **kw)
    for t in range(problem.steps):
        for i in range(problem.n):
            problem.loss(params, t, i).backward()
        if t % 2 == 0:
            params[-1].grad = None
        opt.step()
        opt.zero_grad()
    return params


@pytest.mark.parametrize("tile", [None, 5], ids=["whole", "tile5"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "ours,theirs,cfg",
    [(VRSGD, torch.optim.SGD, SGD_CFGS[3]), (VRSGD, torch.optim.SGD, SGD_CFGS[5]),
     (VRAdam, torch.optim.Adam, ADAM_CFGS[1]), (VRAdamW, torch.optim.AdamW, ADAMW_CFGS[2])],
    ids=["SGD-dampening", "SGD-nesterov", "Adam", "AdamW"],
)
def test_vr_off_is_bit_identical_to_torch_optim(monkeypatch, ours, theirs, cfg, foreach, tile):
    """Same op order as torch.optim, per-parameter step counts, tiles that cut a tensor: equal bits."""
    a = _skipping_run(ours, monkeypatch, tile, vr=False, foreach=foreach, **cfg)
    b = _skipping_run(theirs, monkeypatch, None, foreach=foreach, **cfg)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()
