"""VR-LAMB: LAMB (You et al. 2019) with the GSNR factor rho inside the trust ratio.

    m, v as Adam;  a = rho (.) (m_hat / (sqrt(v_hat) + eps) + wd * W)
    W <- W - lr * min(||W|| / ||a||, max_trust_ratio) * a

docs/design.md §2: the rule, ``exclude_1d``, and how it differs from pytorch_optimizer's Lamb.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ds_vrgd._tensor_lists import ListOps, TensorList
from ds_vrgd.optim import rules
from ds_vrgd.optim._base import VROptimizer
from ds_vrgd.optim.blocks import Block
from ds_vrgd.optim.options import check_bool, check_range, validate_betas, validate_eps


class VRLAMB(VROptimizer):
    """Layer-wise adaptive moments (LAMB) with GSNR element-wise factors.

    Args:
        params: parameters or param groups (a group may override any option).
        lr, betas, eps, weight_decay: as Adam's (weight decay inside the trust ratio).
        max_trust_ratio: upper clip of the trust ratio ||W|| / ||a||.
        exclude_1d: layers with ndim <= 1 (biases, LayerNorm) get trust 1 and no weight decay.
        foreach: multi-tensor kernels (None: on for accelerators, off on CPU, which runs in tiles).
        **vr_options: gamma, eps_gsnr, gsnr_max, gsnr_warmup_steps, gsnr_ema, vr
            (:class:`~ds_vrgd.optim.options.VROptions`; ``vr=False`` or ``gamma=0``: LAMB exactly).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_trust_ratio: float = 10.0,
        exclude_1d: bool = True,
        *,
        foreach: Optional[bool] = None,
        **vr_options,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust_ratio=max_trust_ratio,
            exclude_1d=exclude_1d,
        )
        super().__init__(params, defaults, foreach, vr_options)

    def _validate(self, options: dict) -> None:
        """Also: betas a pair of numbers in [0, 1), eps > 0, max_trust_ratio in (0, inf], exclude_1d a bool."""
        super()._validate(options)
        validate_betas(options["betas"])
        validate_eps(options["eps"])
        check_range("max_trust_ratio", options["max_trust_ratio"], 0.0, low_open=True, high_open=False)
        check_bool("exclude_1d", options["exclude_1d"])

    uses_layer_norms = True

    def _direction(self, group: dict, block: Block, rho: Optional[TensorList], ops: ListOps) -> TensorList:
        exp_avg, update = rules.adam_moments(group, block, block.grads, ops, keep=rho is None)
        ops.div_into_(exp_avg, update)  # m / (sqrt(v_hat) + eps)
        ops.div_scalar_(update, rules.bias_correction1(group, block))
        return rules.decayed_direction(group, block, update, rho, ops)

    def _trust_ratio(self, group: dict, weight_norm: float, update_norm: float) -> float:
        return rules.trust_ratio(weight_norm, update_norm, max_ratio=group["max_trust_ratio"])

    def _apply(self, group: dict, block: Block, update: TensorList, trust: list[float], ops: ListOps) -> None:
        ops.add_scaled_(block.params, update, [-group["lr"] * r for r in trust])
