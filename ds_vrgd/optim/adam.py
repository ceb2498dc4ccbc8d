"""VR-Adam and VR-AdamW: Adam (torch.optim semantics) with the GSNR factor rho.

    Adam:  d = g + wd * W                      AdamW: W <- W * (1 - lr * wd); d = g
    m <- b1 m + (1 - b1) d;   v <- b2 v + (1 - b2) d^2
    W <- W - lr * rho (.) m_hat / (sqrt(v_hat) + eps)

With ``vr=False`` or ``gamma=0`` these are torch.optim.Adam / AdamW (no
amsgrad, maximize, capturable or fused options).
"""

from __future__ import annotations

from typing import Iterable, Optional

from ds_vrgd._tensor_lists import ListOps, TensorList
from ds_vrgd.optim import rules
from ds_vrgd.optim._base import VROptimizer
from ds_vrgd.optim.blocks import Block
from ds_vrgd.optim.options import validate_betas, validate_eps


class VRAdam(VROptimizer):
    """Adam with L2 weight decay and GSNR element-wise learning rates.

    Args:
        params: parameters or param groups (a group may override any option).
        lr, betas, eps, weight_decay: as torch.optim.Adam.
        foreach: multi-tensor kernels (None: on for accelerators, off on CPU, which runs in tiles).
        **vr_options: gamma, eps_gsnr, gsnr_max, gsnr_warmup_steps, gsnr_ema, vr
            (:class:`~ds_vrgd.optim.options.VROptions`; ``vr=False`` or ``gamma=0``: torch.optim.Adam exactly).
    """

    decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        foreach: Optional[bool] = None,
        **vr_options,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
        )
        super().__init__(params, defaults, foreach, vr_options)

    def _validate(self, options: dict) -> None:
        """Also: betas a pair of numbers in [0, 1), eps > 0."""
        super()._validate(options)
        validate_betas(options["betas"])
        validate_eps(options["eps"])

    def _direction(self, group: dict, block: Block, rho: Optional[TensorList], ops: ListOps) -> None:
        params, lr, wd = block.params, group["lr"], group["weight_decay"]
        if self.decoupled_weight_decay:
            ops.mul_(params, 1.0 - lr * wd)
            direction = block.grads
        else:
            direction = ops.add(block.grads, params, alpha=wd) if wd else block.grads
        exp_avg, denom = rules.adam_moments(group, block, direction, ops)
        if rho is not None:
            ops.div_(denom, rho)  # rho = 0 gives denom = inf: no step
        ops.addcdiv_(params, exp_avg, denom, [-lr / c for c in rules.bias_correction1(group, block)])


class VRAdamW(VRAdam):
    """AdamW (decoupled weight decay, default 1e-2) with GSNR element-wise learning rates.

    Arguments as :class:`VRAdam`; ``vr=False`` or ``gamma=0`` gives torch.optim.AdamW exactly.
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        foreach: Optional[bool] = None,
        **vr_options,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, foreach=foreach, **vr_options)
