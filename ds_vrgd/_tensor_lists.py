"""Element-wise ops on lists of tensors: ``torch._foreach_*`` or a per-tensor loop.

The update rules and the GSNR transform are written once against
:class:`ListOps`. ``ListOps(foreach=True)`` sends every call to the fused
multi-tensor kernel (one launch per list on GPU); ``foreach=False`` loops over
the tensors with the ordinary in-place methods. Both give the same numbers.

An argument named ``scalars`` may be one number or one number per tensor.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

TensorList = list[Tensor]
Scalars = Union[float, Sequence[float]]


def _per_tensor(scalars: Scalars, i: int) -> float:
    return scalars[i] if isinstance(scalars, (list, tuple)) else scalars


class ListOps:
    """In-place and reducing element-wise ops over tensor lists."""

    def __init__(self, foreach: bool):
        self.foreach = foreach

    def mul_(self, xs: TensorList, scalars: Scalars) -> None:
        """x_i <- x_i * c_i."""
        if self.foreach:
            torch._foreach_mul_(xs, scalars)
        else:
            for i, x in enumerate(xs):
                x.mul_(_per_tensor(scalars, i))

    def mul_tensors_(self, xs: TensorList, ys: TensorList) -> None:
        """x_i <- x_i * y_i (element-wise)."""
        if self.foreach:
            torch._foreach_mul_(xs, ys)
        else:
            for x, y in zip(xs, ys):
                x.mul_(y)

    def div_tensors_(self, xs: TensorList, ys: TensorList) -> None:
        """x_i <- x_i / y_i (element-wise)."""
        if self.foreach:
            torch._foreach_div_(xs, ys)
        else:
            for x, y in zip(xs, ys):
                x.div_(y)

    def add_scalar_(self, xs: TensorList, scalars: Scalars) -> None:
        """x_i <- x_i + c_i."""
        if self.foreach:
            torch._foreach_add_(xs, scalars)
        else:
            for i, x in enumerate(xs):
                x.add_(_per_tensor(scalars, i))

    def add_(self, xs: TensorList, ys: TensorList, alpha: float = 1.0) -> None:
        """x_i <- x_i + alpha * y_i."""
        if self.foreach:
            torch._foreach_add_(xs, ys, alpha=alpha)
        else:
            for x, y in zip(xs, ys):
                x.add_(y, alpha=alpha)

    def add(self, xs: TensorList, ys: TensorList, alpha: float = 1.0) -> TensorList:
        """New list x_i + alpha * y_i."""
        if self.foreach:
            return list(torch._foreach_add(xs, ys, alpha=alpha))
        return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys)]

    def div(self, xs: TensorList, ys: TensorList) -> TensorList:
        """New list x_i / y_i."""
        if self.foreach:
            return list(torch._foreach_div(xs, ys))
        return [torch.div(x, y) for x, y in zip(xs, ys)]

    def sub_(self, xs: TensorList, ys: TensorList) -> None:
        """x_i <- x_i - y_i."""
        self.add_(xs, ys, alpha=-1.0)

    def addcmul_(self, xs: TensorList, ys: TensorList, zs: TensorList, scalars: Scalars) -> None:
        """x_i <- x_i + c_i * y_i * z_i."""
        if self.foreach:
            torch._foreach_addcmul_(xs, ys, zs, scalars)
        else:
            for i, (x, y, z) in enumerate(zip(xs, ys, zs)):
                x.addcmul_(y, z, value=_per_tensor(scalars, i))

    def addcdiv_(self, xs: TensorList, ys: TensorList, zs: TensorList, scalars: Scalars) -> None:
        """x_i <- x_i + c_i * y_i / z_i."""
        if self.foreach:
            torch._foreach_addcdiv_(xs, ys, zs, scalars)
        else:
            for i, (x, y, z) in enumerate(zip(xs, ys, zs)):
                x.addcdiv_(y, z, value=_per_tensor(scalars, i))

    def lerp_(self, xs: TensorList, ys: TensorList, weight: float) -> None:
        """x_i <- x_i + weight * (y_i - x_i)."""
        if self.foreach:
            torch._foreach_lerp_(xs, ys, weight)
        else:
            for x, y in zip(xs, ys):
                x.lerp_(y, weight)

    def clamp_(self, xs: TensorList, low: float, high: float) -> None:
        """x_i <- min(max(x_i, low), high)."""
        if self.foreach:
            torch._foreach_clamp_min_(xs, low)
            torch._foreach_clamp_max_(xs, high)
        else:
            for x in xs:
                x.clamp_(low, high)

    def clamp_min_(self, xs: TensorList, low: float) -> None:
        """x_i <- max(x_i, low)."""
        if self.foreach:
            torch._foreach_clamp_min_(xs, low)
        else:
            for x in xs:
                x.clamp_min_(low)

    def sqrt(self, xs: TensorList) -> TensorList:
        """New list sqrt(x_i)."""
        if self.foreach:
            return list(torch._foreach_sqrt(xs))
        return [torch.sqrt(x) for x in xs]

    def square_fp32(self, xs: TensorList) -> TensorList:
        """New fp32 list x_i^2 (inputs of any float dtype are squared in fp32)."""
        xs32 = [x.float() for x in xs]
        if self.foreach:
            return list(torch._foreach_mul(xs32, xs32))
        return [x * x for x in xs32]

    def clone(self, xs: TensorList) -> TensorList:
        """New list of copies."""
        return [x.clone() for x in xs]

    def norms(self, xs: TensorList, ord: float = 2.0) -> Tensor:
        """Vector [len(xs)] of fp32 norms ||x_i||_ord (ord=1 on non-negative x is the sum)."""
        if not xs:
            return torch.zeros(0)
        if self.foreach:
            return torch.stack(torch._foreach_norm(xs, ord, dtype=torch.float32))
        return torch.stack([torch.linalg.vector_norm(x, ord, dtype=torch.float32) for x in xs])
