"""VR-LARS: LARS (You et al. 2017) with the GSNR factor rho before momentum.

    a = rho (.) (g + wd * W);  b <- mu * b + trust_coefficient * ||W|| / ||a|| * a;  W <- W - lr * b

docs/design.md §2: the rule, ``exclude_1d``, and how it differs from pytorch_optimizer's LARS.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ds_vrgd._tensor_lists import ListOps, TensorList
from ds_vrgd.optim import rules
from ds_vrgd.optim._base import VROptimizer
from ds_vrgd.optim.blocks import Block
from ds_vrgd.optim.options import check_bool, check_range


class VRLARS(VROptimizer):
    """Layer-wise adaptive rate scaling with GSNR element-wise factors.

    Args:
        params: parameters or param groups (a group may override any option).
        lr, momentum, weight_decay: as SGD's (no dampening, no Nesterov).
        trust_coefficient: tc of the trust ratio tc * ||W|| / ||a||.
        exclude_1d: layers with ndim <= 1 (biases, LayerNorm) get trust 1 and no weight decay.
        foreach: multi-tensor kernels (None: on for accelerators, off on CPU, which runs in tiles).
        **vr_options: gamma, eps_gsnr, gsnr_max, gsnr_warmup_steps, gsnr_ema, vr
            (:class:`~ds_vrgd.optim.options.VROptions`; ``vr=False`` or ``gamma=0``: LARS exactly).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        exclude_1d: bool = True,
        *,
        foreach: Optional[bool] = None,
        **vr_options,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
            exclude_1d=exclude_1d,
        )
        super().__init__(params, defaults, foreach, vr_options)

    def _validate(self, options: dict) -> None:
        """Also: momentum in [0, 1), trust_coefficient > 0, exclude_1d a bool."""
        super()._validate(options)
        check_range("momentum", options["momentum"], 0.0, 1.0)
        check_range("trust_coefficient", options["trust_coefficient"], 0.0, low_open=True)
        check_bool("exclude_1d", options["exclude_1d"])

    uses_layer_norms = True

    def _direction(self, group: dict, block: Block, rho: Optional[TensorList], ops: ListOps) -> TensorList:
        return rules.decayed_direction(group, block, ops.clone(block.grads, keep=rho is None), rho, ops)

    def _trust_ratio(self, group: dict, weight_norm: float, update_norm: float) -> float:
        return rules.trust_ratio(weight_norm, update_norm, coefficient=group["trust_coefficient"])

    def _apply(self, group: dict, block: Block, update: TensorList, trust: list[float], ops: ListOps) -> None:
        mu = group["momentum"]
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
