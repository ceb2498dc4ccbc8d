"""VR-LARS: LARS (You et al. 2017) with the GSNR factor rho before momentum.

    d = g + wd * W
    a = rho (.) d
    trust = trust_coefficient * ||W|| / ||a||   (1 if either norm is 0)
    b <- mu * b + trust * a                    (b = trust * a on the first step)
    W <- W - lr * b

With ``exclude_1d`` (default) layers with ndim <= 1 (biases, LayerNorm) get
trust = 1 and no weight decay. Norms are per layer, exact under ZeRO.

Differences from ``pytorch_optimizer.LARS`` 4.x, each asserted in
tests/test_optim_peers.py:

* trust ratio with weight decay: LARS uses tc*||W|| / (||g|| + wd*||W||),
  here tc*||W|| / ||rho (.) (g + wd*W)|| (equal for wd = 0 and rho = 1);
* 1-D tensors: LARS always exempts ndim <= 1 tensors from trust ratio and
  decay, which is ``exclude_1d=True``; ``exclude_1d=False`` has no LARS analogue;
* LARS has ``dampening`` and ``nesterov``; this rule matches LARS with both off.

Otherwise identical (momentum start, trust 1 for a zero norm, W <- W - lr*b):
exact agreement at wd = 0 with momentum 0 and 0.9.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ds_vrgd.gsnr import GSNR_MAX
from ds_vrgd._tensor_lists import ListOps, TensorList
from ds_vrgd.optim._base import Block, VROptimizer, trust_ratio
from ds_vrgd.optim.options import check_bool, check_range, reject_unknown


class VRLARS(VROptimizer):
    """Layer-wise adaptive rate scaling with GSNR element-wise factors."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        exclude_1d: bool = True,
        *,
        gamma: float = 0.1,
        eps_gsnr: float = 1e-20,
        gsnr_max: Optional[float] = GSNR_MAX,
        gsnr_warmup_steps: int = 0,
        gsnr_ema: float = 0.0,
        vr: bool = True,
        foreach: Optional[bool] = None,
        **unknown,
    ):
        reject_unknown(type(self), unknown)
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
            exclude_1d=exclude_1d,
            gamma=gamma, eps_gsnr=eps_gsnr, gsnr_max=gsnr_max, gsnr_warmup_steps=gsnr_warmup_steps,
            gsnr_ema=gsnr_ema, vr=vr,
        )
        super().__init__(params, defaults, foreach)

    def _validate(self, options: dict) -> None:
        """Also: momentum in [0, 1), trust_coefficient > 0, exclude_1d a bool."""
        super()._validate(options)
        check_range("momentum", options["momentum"], 0.0, 1.0)
        check_range("trust_coefficient", options["trust_coefficient"], 0.0, low_open=True)
        check_bool("exclude_1d", options["exclude_1d"])

    uses_layer_norms = True

    def _direction(self, group: dict, block: Block, rho: Optional[TensorList], ops: ListOps) -> None:
        self._keep_direction(group, block, ops.clone(block.grads, keep=rho is None), rho, ops)

    def _trust_ratio(self, group: dict, weight_norm: float, update_norm: float) -> float:
        return trust_ratio(weight_norm, update_norm, coefficient=group["trust_coefficient"])

    def _apply(self, group: dict, block: Block, trust: list[float], ops: ListOps) -> None:
        update, mu = block.update, group["momentum"]
        if mu:
            buffers = block.state("momentum_buffer")
            first = [i for i, t in enumerate(block.steps) if t == 1]
            later = [i for i, t in enumerate(block.steps) if t > 1]
            ops.copy_([buffers[i] for i in first], [update[i] for i in first])
            ops.mul_([buffers[i] for i in first], [trust[i] for i in first])
            ops.mul_([buffers[i] for i in later], mu)
            ops.add_scaled_([buffers[i] for i in later], [update[i] for i in later], [trust[i] for i in later])
            ops.add_(block.params, buffers, alpha=-group["lr"])
        else:
            ops.add_scaled_(block.params, update, [-group["lr"] * r for r in trust])
