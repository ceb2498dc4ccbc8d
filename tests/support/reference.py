"""Independent float64 reference of the VRGD algorithm (docs/design.md §2-3).

Written from docs/design.md only (not from ds_vrgd's code), so that the numerical
tests compare two independent readings of the spec. Everything is float64 and
deliberately naive: one tensor at a time, no foreach, no in-place tricks.

Choices where docs/design.md is not explicit (the implementation must match them):

* ``gsnr_warmup_steps = k``: optimizer steps t = 1..k (t counts steps that were
  taken, from 1) use rho = 1; from step k+1 on rho is the GSNR factor.
* ``gsnr_ema = beta > 0``: an exponential moving average of q (the
  layer-normalised GSNR, before clamping) across steps with Adam-style bias
  correction, then the clamp::

      e_t   = beta * e_{t-1} + (1 - beta) * q_t        (e_0 = 0)
      rho_t = clamp(e_t / (1 - beta**t), max(0, 1 - gamma), 1 + gamma)

  where t counts the steps whose q entered the average. The combinations of
  EMA with warmup and of EMA with n < 2 fallback steps are not specified by
  docs/design.md; this reference refuses them rather than invent a contract.
* n < 2 samples: rho = 1 (the base optimizer's update).
* ``gsnr_interval = k``: the statistics steps are t = w+1, w+1+k, w+1+2k, ... (w =
  ``gsnr_warmup_steps``); every other step after warm-up applies the rho of the
  last statistics step (rho = 1 before the first), and only statistics steps
  enter the EMA.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

F64 = torch.float64

# Defaults of the public constructors (docs/design.md §2 plus the
# torch.optim defaults of the base optimizers).
VR_DEFAULTS = dict(gamma=0.1, eps_gsnr=1e-20, gsnr_max=1e3, gsnr_warmup_steps=0, gsnr_ema=0.0, gsnr_interval=1,
                   vr=True)
BASE_DEFAULTS = {
    "VRSGD": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    "VRAdam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "VRAdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "VRLARS": dict(momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, exclude_1d=True),
    "VRLAMB": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_trust_ratio=10.0, exclude_1d=True),
}
KINDS = tuple(BASE_DEFAULTS)


# ---------------------------------------------------------------------------
# GSNR math for one layer
# ---------------------------------------------------------------------------


def moments(samples: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Mean m and second moment s (both 1/n) of the gradient samples of one layer."""
    stack = torch.stack([x.to(F64) for x in samples])
    return stack.mean(0), (stack * stack).mean(0)


def bounds(gamma: float) -> tuple[float, float]:
    return max(0.0, 1.0 - gamma), 1.0 + gamma


def gsnr_parts(m: Tensor, s: Tensor, eps_gsnr: float, gsnr_max: float | None = VR_DEFAULTS["gsnr_max"]) -> dict:
    """v, r (capped at gsnr_max unless None), q of docs/design.md §2 for one layer (float64)."""
    m = m.to(F64)
    s = s.to(F64)
    v = torch.clamp(s - m * m, min=0.0)
    r = (m * m) / (v + eps_gsnr)
    capped = torch.zeros_like(r, dtype=torch.bool) if gsnr_max is None else r >= gsnr_max
    if gsnr_max is not None:
        r = torch.clamp(r, max=gsnr_max)
    mean_r = r.mean()
    if mean_r.item() == 0.0:
        q = torch.ones_like(r)
    else:
        q = r / mean_r
    return dict(m=m, s=s, v=v, r=r, q=q, capped=capped)


def rho_from_moments_ref(
    m: Tensor, s: Tensor, gamma: float, eps_gsnr: float = 1e-20, gsnr_max: float | None = VR_DEFAULTS["gsnr_max"]
) -> Tensor:
    lo, hi = bounds(gamma)
    return torch.clamp(gsnr_parts(m, s, eps_gsnr, gsnr_max)["q"], lo, hi)


def stats_ref(samples_per_layer: Sequence[Sequence[Tensor]], gamma: float, eps_gsnr: float = 1e-20,
              names: Sequence[str] | None = None, micro_batch_size: int | None = None,
              gsnr_max: float | None = VR_DEFAULTS["gsnr_max"]) -> dict:
    """What ``opt.gsnr_stats()`` should report for one step's samples (no EMA, no warmup, n >= 2)."""
    lo, hi = bounds(gamma)
    layers = {}
    sum_v = 0.0
    sum_m2 = 0.0
    for k, samples in enumerate(samples_per_layer):
        m, s = moments(samples)
        p = gsnr_parts(m, s, eps_gsnr, gsnr_max)
        rho = torch.clamp(p["q"], lo, hi)
        sum_v += p["v"].sum().item()
        sum_m2 += (p["m"] ** 2).sum().item()
        name = names[k] if names is not None else f"param_{k}"
        layers[name] = dict(
            gsnr_mean=p["r"].mean().item(),
            frac_low=(p["q"] <= lo).to(F64).mean().item(),
            frac_high=(p["q"] >= hi).to(F64).mean().item(),
            frac_capped=p["capped"].to(F64).mean().item(),
            rho=rho,
        )
    noise_ratio = sum_v / sum_m2
    return dict(
        n=len(samples_per_layer[0]),
        noise_ratio=noise_ratio,
        b_simple=None if micro_batch_size is None else noise_ratio * micro_batch_size,
        layers=layers,
    )


# ---------------------------------------------------------------------------
# The optimizers
# ---------------------------------------------------------------------------


class ReferenceVR:
    """Float64 reference of VRSGD / VRAdam / VRAdamW / VRLARS / VRLAMB.

    ``params``: an iterable of tensors or of param-group dicts (like
    torch.optim); the tensors are cloned to float64 and owned by the
    reference (``self.params`` lists them in global order). Hyperparameters
    in a group dict override the constructor's.

    ``step(grads, samples)``: ``grads[k]`` is the gradient the base optimizer
    sees for parameter k (p.grad at step time), ``samples[k]`` the list of
    that parameter's gradient samples of this step (one per backward call).
    """

    def __init__(self, kind: str, params: Iterable, **hyper):
        if kind not in BASE_DEFAULTS:
            raise ValueError(kind)
        self.kind = kind
        defaults = {**BASE_DEFAULTS[kind], **VR_DEFAULTS, **hyper}
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        self.groups = []
        self.params: list[Tensor] = []
        for g in params:
            group = {**defaults, **{k: v for k, v in g.items() if k != "params"}}
            group["params"] = [p.detach().to(F64).clone() for p in g["params"]]
            self.params.extend(group["params"])
            self.groups.append(group)
        self.state: list[dict] = [dict() for _ in self.params]
        self.t = 0  # steps taken
        self.ema_t = 0  # steps whose q entered the EMA
        self.last_rho: list[Tensor] = []

    # -- GSNR factor ---------------------------------------------------------
    @staticmethod
    def statistics_step(group: dict, t: int) -> bool:
        warm = group["gsnr_warmup_steps"]
        return t > warm and (t - warm - 1) % group["gsnr_interval"] == 0

    def _rho(self, group: dict, k: int, samples: Sequence[Tensor], shape) -> Tensor:
        ones = torch.ones(shape, dtype=F64)
        if not group["vr"]:
            return ones
        warm = group["gsnr_warmup_steps"]
        beta = group["gsnr_ema"]
        if beta > 0 and warm > 0:
            raise ValueError("reference: EMA combined with warmup is not specified by docs/design.md")
        if self.t <= warm:
            return ones
        if not self.statistics_step(group, self.t):
            return self.state[k].get("rho", ones)
        if len(samples) < 2:
            if beta > 0:
                raise ValueError("reference: EMA combined with n < 2 is not specified by docs/design.md")
            return ones
        m, s = moments(samples)
        q = gsnr_parts(m, s, group["eps_gsnr"], group["gsnr_max"])["q"].reshape(shape)
        if beta > 0:
            st = self.state[k]
            e = st.get("q_ema", torch.zeros(shape, dtype=F64))
            e = beta * e + (1.0 - beta) * q
            st["q_ema"] = e
            q = e / (1.0 - beta ** self.ema_t)
        lo, hi = bounds(group["gamma"])
        self.state[k]["rho"] = torch.clamp(q, lo, hi)
        return self.state[k]["rho"]

    # -- one step ----------------------------------------------------------------
    def step(self, grads: Sequence[Tensor], samples: Sequence[Sequence[Tensor]]) -> None:
        assert len(grads) == len(self.params) == len(samples)
        self.t += 1
        if any(g["vr"] and g["gsnr_ema"] > 0 and self.statistics_step(g, self.t) for g in self.groups):
            self.ema_t += 1
        self.last_rho = []
        k = 0
        for group in self.groups:
            for W in group["params"]:
                g = grads[k].to(F64).reshape(W.shape)
                rho = self._rho(group, k, samples[k], W.shape)
                self.last_rho.append(rho)
                getattr(self, "_" + self.kind)(group, W, g, rho, self.state[k])
                k += 1

    def _sgd_like_direction(self, group, W, g, st):
        wd, mu, damp, nest = group["weight_decay"], group["momentum"], group["dampening"], group["nesterov"]
        d = g + wd * W
        if mu == 0:
            return d
        if "b" not in st:
            b = d.clone()
        else:
            b = mu * st["b"] + (1.0 - damp) * d
        st["b"] = b
        return d + mu * b if nest else b

    def _VRSGD(self, group, W, g, rho, st):
        s = self._sgd_like_direction(group, W, g, st)
        W.sub_(group["lr"] * rho * s)

    def _adam_direction(self, group, d, st):
        b1, b2 = group["betas"]
        m = b1 * st.get("m", torch.zeros_like(d)) + (1 - b1) * d
        v = b2 * st.get("v", torch.zeros_like(d)) + (1 - b2) * d * d
        st["m"], st["v"] = m, v
        m_hat = m / (1 - b1 ** self.t)
        v_hat = v / (1 - b2 ** self.t)
        return m_hat / (torch.sqrt(v_hat) + group["eps"])

    def _VRAdam(self, group, W, g, rho, st):
        d = g + group["weight_decay"] * W
        u = self._adam_direction(group, d, st)
        W.sub_(group["lr"] * rho * u)

    def _VRAdamW(self, group, W, g, rho, st):
        W.mul_(1.0 - group["lr"] * group["weight_decay"])
        u = self._adam_direction(group, g, st)
        W.sub_(group["lr"] * rho * u)

    @staticmethod
    def _excluded(group, W) -> bool:
        return bool(group["exclude_1d"]) and W.ndim <= 1

    def _VRLARS(self, group, W, g, rho, st):
        excluded = self._excluded(group, W)
        wd = 0.0 if excluded else group["weight_decay"]
        d = g + wd * W
        a = rho * d
        if excluded:
            trust = 1.0
        else:
            nw, na = torch.linalg.vector_norm(W).item(), torch.linalg.vector_norm(a).item()
            trust = group["trust_coefficient"] * nw / na if (nw > 0 and na > 0) else 1.0
        mu = group["momentum"]
        if mu != 0 and "b" in st:
            b = mu * st["b"] + trust * a
        else:
            b = trust * a
        if mu != 0:
            st["b"] = b
        W.sub_(group["lr"] * b)

    def _VRLAMB(self, group, W, g, rho, st):
        excluded = self._excluded(group, W)
        wd = 0.0 if excluded else group["weight_decay"]
        u = self._adam_direction(group, g, st)
        a = rho * (u + wd * W)
        if excluded:
            trust = 1.0
        else:
            nw, na = torch.linalg.vector_norm(W).item(), torch.linalg.vector_norm(a).item()
            trust = min(nw / na, group["max_trust_ratio"]) if (nw > 0 and na > 0) else 1.0
        W.sub_(group["lr"] * trust * a)


# ---------------------------------------------------------------------------
# Test problems shared by the test files
# ---------------------------------------------------------------------------


def fp32_exact(x: Tensor) -> Tensor:
    """Round to float32 and back so both sides see identical data."""
    return x.to(torch.float32).to(F64)


class Problem:
    """A deterministic stream of per-sample losses.

    ``kind="direct"``: parameters are free tensors; sample i of step t has the
    loss ``sum_k <G[t,i,k], p_k> + 0.5*c*||p_k||^2``, so its gradient is
    ``G + c*p``: the samples are known exactly, and their across-sample
    variance is exactly ``sigma**2`` per element (the noise is standardised
    over the samples, which keeps s - m^2 well conditioned in fp32).
    ``kind="model"``: a tiny linear regression ``y = x W^T + b`` with a fresh
    random micro-batch per sample (gradients from autograd).
    """

    def __init__(self, kind: str, shapes=((7,), (5, 6)), steps: int = 4, n: int = 3, seed: int = 0,
                 c: float = 0.1, param_scale: float = 1.0):
        self.kind, self.steps, self.n, self.c = kind, steps, n, c
        gen = torch.Generator().manual_seed(seed)
        if kind == "model":
            shapes = ((4, 5), (4,))
        self.shapes = shapes
        self.init = [fp32_exact(torch.randn(sh, generator=gen, dtype=F64) * param_scale) for sh in shapes]
        if kind == "direct":
            self.G = []
            for _t in range(steps):
                per_step = []
                mus = [torch.randn(sh, generator=gen, dtype=F64) * (0.2 + torch.rand(sh, generator=gen, dtype=F64))
                       for sh in shapes]
                sig = [0.3 + torch.rand(sh, generator=gen, dtype=F64) for sh in shapes]
                noise = [torch.randn((max(n, 2),) + tuple(sh), generator=gen, dtype=F64) for sh in shapes]
                if n >= 2:
                    noise = [(e - e.mean(0)) / e.std(0, unbiased=False) for e in noise]
                for i in range(n):
                    per_step.append([fp32_exact(mus[k] + sig[k] * noise[k][i]) for k in range(len(shapes))])
                self.G.append(per_step)
        else:
            w_true = torch.randn(4, 5, generator=gen, dtype=F64)
            self.data = []
            for _t in range(steps):
                per_step = []
                for _i in range(n):
                    x = torch.randn(2, 5, generator=gen, dtype=F64)
                    y = x @ w_true.T + 2.0 * torch.randn(2, 4, generator=gen, dtype=F64)
                    per_step.append((fp32_exact(x), fp32_exact(y)))
                self.data.append(per_step)

    def loss(self, params: Sequence[Tensor], t: int, i: int) -> Tensor:
        dt = params[0].dtype
        if self.kind == "direct":
            tot = 0
            for p, G in zip(params, self.G[t][i]):
                tot = tot + (p * G.to(dt)).sum() + 0.5 * self.c * (p * p).sum()
            return tot
        W, b = params
        x, y = (z.to(dt) for z in self.data[t][i])
        return ((x @ W.T + b - y) ** 2).mean()

    def make_params(self, dtype=torch.float32) -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(p.to(dtype).clone()) for p in self.init]

    def sample_grads(self, params64: Sequence[Tensor], t: int) -> list[list[Tensor]]:
        """Per-parameter lists of float64 sample gradients at the given weights."""
        leaves = [p.detach().clone().requires_grad_(True) for p in params64]
        out = [[] for _ in leaves]
        for i in range(self.n):
            grads = torch.autograd.grad(self.loss(leaves, t, i), leaves)
            for k, g in enumerate(grads):
                out[k].append(g.detach())
        return out


def run_reference(problem: Problem, kind: str, groups=None, steps=None, grad_transform=None, **hyper) -> ReferenceVR:
    """Run the reference on a problem: g = sum of the samples (what p.grad holds)
    unless ``grad_transform(list_of_grads) -> list_of_grads`` models a user rescale."""
    ref = ReferenceVR(kind, groups if groups is not None else problem.init, **hyper)
    for t in range(problem.steps if steps is None else steps):
        samples = problem.sample_grads(ref.params, t)
        grads = [torch.stack(s).sum(0) for s in samples]
        if grad_transform is not None:
            grads = grad_transform(grads)
        ref.step(grads, samples)
    return ref


def run_impl(problem: Problem, opt_cls, params=None, steps=None, dtype=torch.float32, before_step=None,
             param_arg=None, **hyper):
    """Run an implementation optimizer on a problem: n backward() calls per step."""
    params = problem.make_params(dtype) if params is None else params
    opt = opt_cls(params if param_arg is None else param_arg(params), **hyper)
    for t in range(problem.steps if steps is None else steps):
        for i in range(problem.n):
            problem.loss(params, t, i).backward()
        if before_step is not None:
            before_step(params, opt)
        opt.step()
        opt.zero_grad()
    return params, opt


# ---------------------------------------------------------------------------
# The error bound of docs/design.md §3 ("Error bound of each path")
# ---------------------------------------------------------------------------

U32 = 2.0 ** -24
"""fp32's unit roundoff."""


def rho_error_bound(samples: Sequence[Tensor], gamma: float, mean_extra: float = 0.0, eps_gsnr: float = 1e-20,
                    gsnr_max: float | None = VR_DEFAULTS["gsnr_max"]) -> Tensor:
    """Per element of one layer, the first-order bound on |rho(fp32 sums) - rho(float64)| of docs/design.md §3,
    from the layer's float64 samples: Q and S are fp32 sums of n terms (|dQ| <= n u, |dS| <= (n-1) u kappa,
    kappa = sum|g| / |sum g|), the mean has the path's ``mean_extra`` relative error on top of dS, and v, r, the
    cap, the layer mean and q follow (the cap and the clamp are 1-Lipschitz). ``mean_extra``: 0 where the mean
    comes from S or an untouched p.grad, u more for a rank average, 3u for DeepSpeed's rescaled gradient."""
    stack = torch.stack([x.to(F64) for x in samples])
    n = stack.shape[0]
    m, s = moments(samples)
    v = torch.clamp(s - m * m, min=0.0)
    total, absolute = stack.sum(0), stack.abs().sum(0)
    kappa = torch.where(total == 0, torch.ones_like(total), absolute / total.abs())
    d_q = (n + 2) * U32  # and the step's own subtraction and division (docs/design.md §3: z G^2, Q - z G^2, ratio)
    d_m = (n - 1) * U32 * kappa + mean_extra + U32  # and the rounding of G^2
    dv = d_q * (v + m * m) + 2 * d_m * m * m  # |error of v|
    m_lo, m_hi = m.abs() * torch.clamp(1 - d_m, min=0.0), m.abs() * (1 + d_m)
    r = m * m / (v + eps_gsnr)
    r_lo = m_lo**2 / (v + dv + eps_gsnr)
    r_hi = m_hi**2 / (torch.clamp(v - dv, min=0.0) + eps_gsnr)
    cap = float("inf") if gsnr_max is None else gsnr_max
    capped = torch.clamp(r, max=cap)
    err_r = torch.maximum(torch.clamp(r_hi, max=cap) - capped, capped - torch.clamp(r_lo, max=cap))
    mean_r = capped.mean()
    if mean_r.item() == 0.0:
        return torch.zeros_like(r)
    q = capped / mean_r
    err_q = err_r / mean_r + q * err_r.mean() / mean_r
    lo, hi = bounds(gamma)
    # the clamp: no error where q (with its error) stays beyond one bound
    outside = (q + err_q < lo) | (q - err_q > hi)
    return torch.where(outside, torch.zeros_like(err_q), err_q)
