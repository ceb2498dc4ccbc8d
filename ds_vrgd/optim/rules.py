"""Steps the base rules share: Adam's moments, LARS/LAMB's decayed direction and trust ratio
(docs/design.md §2). Each takes a :class:`~ds_vrgd.optim.blocks.Block` of pieces and list ops."""

from __future__ import annotations

import math
from typing import Optional

from ds_vrgd._tensor_lists import ListOps, TensorList
from ds_vrgd.optim.blocks import Block


def trust_ratio(weight_norm: float, update_norm: float, coefficient: float = 1.0, max_ratio: float = math.inf) -> float:
    """min(coefficient * ||W|| / ||update||, max_ratio), or 1 where either norm is 0."""
    if weight_norm == 0.0 or update_norm == 0.0:
        return 1.0
    return min(coefficient * weight_norm / update_norm, max_ratio)


def adam_moments(
    group: dict, block: Block, direction: TensorList, ops: ListOps, keep: bool = False
) -> tuple[TensorList, TensorList]:
    """Adam's moments of d, in torch.optim's order; returns (m, sqrt(v_hat) + eps) of the block.

    m <- b1 m + (1 - b1) d;  v <- b2 v + (1 - b2) d^2;  v_hat = v / (1 - b2^t). The
    denominator is a temporary of the block unless ``keep``.
    """
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = block.state("exp_avg"), block.state("exp_avg_sq")
    ops.lerp_(exp_avg, direction, 1.0 - beta1)
    ops.mul_(exp_avg_sq, beta2)
    ops.addcmul_(exp_avg_sq, direction, direction, 1.0 - beta2)
    denom = ops.sqrt(exp_avg_sq, keep=keep)
    ops.div_scalar_(denom, [(1.0 - beta2**t) ** 0.5 for t in block.steps])  # torch.optim: ** 0.5
    ops.add_scalar_(denom, group["eps"])
    return exp_avg, denom


def bias_correction1(group: dict, block: Block) -> list[float]:
    """Per piece 1 - beta1^t."""
    return [1.0 - group["betas"][0] ** t for t in block.steps]


def decayed_direction(
    group: dict, block: Block, update: TensorList, rho: Optional[TensorList], ops: ListOps
) -> TensorList:
    """LARS/LAMB: returns rho (.) (update + wd * W), the direction phase 3 applies.

    Weight decay goes to the decayed pieces only (not ndim <= 1 with exclude_1d);
    with rho the result is written over rho, which the step no longer needs.
    """
    if group["weight_decay"]:
        decayed = block.decayed(group["exclude_1d"])
        ops.add_([update[i] for i in decayed], [block.params[i] for i in decayed], alpha=group["weight_decay"])
    if rho is None:
        return update
    ops.mul_tensors_(rho, update)
    return rho
