"""VR-SGD: SGD (torch.optim.SGD semantics) with the GSNR factor rho.

    d = g + wd * W
    b <- mu * b + (1 - dampening) * d          (b = d on the first step)
    s = d + mu * b if nesterov else b          (s = d when mu = 0)
    W <- W - lr * rho (.) s

With ``vr=False`` or ``gamma=0`` this is torch.optim.SGD (no ``maximize``).
"""

from __future__ import annotations

from typing import Iterable, Optional

from ds_vrgd._tensor_lists import ListOps, TensorList
from ds_vrgd.optim._base import VROptimizer
from ds_vrgd.optim.blocks import Block
from ds_vrgd.optim.options import check_bool, check_range


class VRSGD(VROptimizer):
    """SGD with momentum/Nesterov and GSNR element-wise learning rates.

    Args:
        params: parameters or param groups (a group may override any option).
        lr, momentum, dampening, weight_decay, nesterov: as torch.optim.SGD.
        foreach: multi-tensor kernels (None: on for accelerators, off on CPU, which runs in tiles).
        **vr_options: gamma, eps_gsnr, gsnr_max, gsnr_warmup_steps, gsnr_ema, vr
            (:class:`~ds_vrgd.optim.options.VROptions`; ``vr=False`` or ``gamma=0``: torch.optim.SGD exactly).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        foreach: Optional[bool] = None,
        **vr_options,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        )
        super().__init__(params, defaults, foreach, vr_options)

    def _validate(self, options: dict) -> None:
        """Also: momentum >= 0, dampening in [0, 1], nesterov a bool (True needs momentum > 0, dampening 0)."""
        super()._validate(options)
        check_range("momentum", options["momentum"], 0.0)
        check_range("dampening", options["dampening"], 0.0, 1.0, high_open=False)
        check_bool("nesterov", options["nesterov"])
        if options["nesterov"] and (options["momentum"] <= 0 or options["dampening"] != 0):
            raise ValueError(
                f"Invalid nesterov: True with momentum={options['momentum']!r}, dampening={options['dampening']!r}; "
                "Nesterov momentum requires momentum > 0 and dampening = 0"
            )

    def _direction(self, group: dict, block: Block, rho: Optional[TensorList], ops: ListOps) -> None:
        params, wd, mu = block.params, group["weight_decay"], group["momentum"]
        direction = ops.add(block.grads, params, alpha=wd) if wd else block.grads
        if mu:
            buffers = block.state("momentum_buffer")
            first = [i for i, t in enumerate(block.steps) if t == 1]
            later = [i for i, t in enumerate(block.steps) if t > 1]
            ops.copy_([buffers[i] for i in first], [direction[i] for i in first])
            ops.mul_([buffers[i] for i in later], mu)
            ops.add_([buffers[i] for i in later], [direction[i] for i in later], alpha=1.0 - group["dampening"])
            direction = ops.add(direction, buffers, alpha=mu) if group["nesterov"] else buffers
        if rho is None:
            ops.add_(params, direction, alpha=-group["lr"])
        else:
            ops.addcmul_(params, rho, direction, -group["lr"])
