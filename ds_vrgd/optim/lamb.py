"""VR-LAMB: LAMB (You et al. 2019) with the GSNR factor rho inside the trust ratio.

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    a = rho (.) (m_hat / (sqrt(v_hat) + eps) + wd * W)
    trust = min(||W|| / ||a||, max_trust_ratio)   (1 if either norm is 0)
    W <- W - lr * trust * a

With ``exclude_1d`` (default) layers with ndim <= 1 (biases, LayerNorm) get
trust = 1 and no weight decay. Norms are per layer, exact under ZeRO
(DeepSpeed's FusedLamb takes them over the flat partition instead).

This is the bias-corrected LAMB of the paper (v3+) and NVIDIA's BERT recipe.
Differences from ``pytorch_optimizer.Lamb`` 4.x, each asserted in
tests/test_optim_peers.py:

* bias correction: here m and v are both corrected inside the update (so
  inside the trust ratio); Lamb never corrects v and corrects m only through
  its step size lr / (1 - beta1^t), applied after the trust ratio;
* weight decay: here wd*W is added to the update before the trust ratio
  (Lamb with ``weight_decouple=False``); Lamb's default decouples it;
* trust clipping: here min(||W|| / ||a||, max_trust_ratio); Lamb clamps the
  weight norm, min(||W||, 10) / (||u|| + eps), and does not clip the ratio;
* 1-D tensors: Lamb applies trust ratio and decay to every tensor; here
  ``exclude_1d`` gives them trust 1 and no decay (Lamb with a 1-D param group
  ``weight_decay=0, adam=True``);
* Lamb's ``pre_norm``, ``rectify``, ``grad_averaging``, ``adanorm`` have no
  analogue here.

They agree exactly for betas (0, 0), ``weight_decouple=False``, ||W|| < 10
and a large max_trust_ratio.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ds_vrgd.gsnr import GSNR_MAX
from ds_vrgd._tensor_lists import ListOps, TensorList
from ds_vrgd.optim._base import Block, VROptimizer, trust_ratio
from ds_vrgd.optim.options import check_bool, check_range, reject_unknown, validate_betas, validate_eps


class VRLAMB(VROptimizer):
    """Layer-wise adaptive moments (LAMB) with GSNR element-wise factors."""

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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust_ratio=max_trust_ratio,
            exclude_1d=exclude_1d,
            gamma=gamma, eps_gsnr=eps_gsnr, gsnr_max=gsnr_max, gsnr_warmup_steps=gsnr_warmup_steps,
            gsnr_ema=gsnr_ema, vr=vr,
        )
        super().__init__(params, defaults, foreach)

    def _validate(self, options: dict) -> None:
        """Also: betas a pair of numbers in [0, 1), eps > 0, max_trust_ratio in (0, inf], exclude_1d a bool."""
        super()._validate(options)
        validate_betas(options["betas"])
        validate_eps(options["eps"])
        check_range("max_trust_ratio", options["max_trust_ratio"], 0.0, low_open=True, high_open=False)
        check_bool("exclude_1d", options["exclude_1d"])

    uses_layer_norms = True

    def _direction(self, group: dict, block: Block, rho: Optional[TensorList], ops: ListOps) -> None:
        exp_avg, update = self._adam_moments(group, block, block.grads, ops, keep=rho is None)
        ops.div_into_(exp_avg, update)  # m / (sqrt(v_hat) + eps)
        ops.div_scalar_(update, self._bias_correction1(group, block))
        self._keep_direction(group, block, update, rho, ops)

    def _trust_ratio(self, group: dict, weight_norm: float, update_norm: float) -> float:
        return trust_ratio(weight_norm, update_norm, max_ratio=group["max_trust_ratio"])

    def _apply(self, group: dict, block: Block, trust: list[float], ops: ListOps) -> None:
        ops.add_scaled_(block.params, block.update, [-group["lr"] * r for r in trust])
