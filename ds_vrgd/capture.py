"""Moment sources: where the GSNR samples of a step come from.

A moment source gives the optimizer, for each parameter tensor it updates,
the sum of squared gradient samples Q (fp32, the parameter's shape), the
number of samples n, and the scale c with ``p.grad = c * (sum of samples)``.
For gradients in fp16/bf16 it also keeps the fp32 sum of the samples, from
which the mean is taken instead of the half-precision gradient
(docs/design.md §3).

:class:`BackwardHookMoments` is the plain-PyTorch source: every
``backward()`` between two optimizer steps is one sample. A tensor hook on
each parameter sees that backward's gradient g and adds g^2 into Q; a
post-accumulate hook records ||p.grad|| after the backward. At step time
``c = ||p.grad|| / ||p.grad at capture||`` picks up any uniform rescaling the
user applied after backward (``GradScaler.unscale_``,
``clip_grad_norm_``, division by the number of micro-batches), so m and s
keep the same units. An element-wise change of p.grad (``clip_grad_value_``)
is not detected.

A new step's collection starts after ``optimizer.step()`` or
``optimizer.zero_grad()``, or at the first backward that finds ``p.grad is
None`` (``model.zero_grad()``), so samples of a step that a GradScaler
skipped for overflow are dropped.

The DeepSpeed adapter and the DDP hook provide other sources with the same
interface.
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol

import torch
from torch import Tensor

from ds_vrgd._tensor_lists import sq_norm, square_into


class MomentSource(Protocol):
    """What the VR optimizers need from a source of gradient samples."""

    def num_samples(self) -> int:
        """n: samples in the current step (0 when nothing was captured)."""

    def sq_sum(self, param: Tensor) -> Optional[Tensor]:
        """Q for ``param`` (fp32, param's shape), or None if it saw no sample."""

    def sample_sum(self, param: Tensor) -> Optional[Tensor]:
        """The fp32 sum of the samples of ``param``, or None where the mean comes from its grad."""

    def grad_scales(self, params: list[Tensor]) -> list[float]:
        """c per owned tensor, such that its grad = c * (sum of its samples)."""

    def step_done(self) -> None:
        """The optimizer finished a step() call (one param group under DeepSpeed ZeRO)."""

    def reset(self) -> None:
        """Start a new step: forget the samples (zero_grad)."""

    def close(self) -> None:
        """Stop capturing and free buffers."""


def keeps_sample_sum(grad_dtype: torch.dtype) -> bool:
    """Whether gradients of this dtype need an fp32 sum of the samples for the mean (fp16, bf16)."""
    return grad_dtype not in (torch.float32, torch.float64)


class _ParamCapture:
    """Per-parameter capture state of :class:`BackwardHookMoments`."""

    __slots__ = ("sq", "sum", "count", "generation", "grad_norm", "handles")

    def __init__(self) -> None:
        self.sq: Optional[Tensor] = None
        self.sum: Optional[Tensor] = None
        self.count = 0
        self.generation = -1
        self.grad_norm: Optional[Tensor] = None
        self.handles: list = []


class BackwardHookMoments:
    """Samples = backward passes, captured by hooks on the parameters."""

    records_grad_norm_after_backward = True
    """Record ||p.grad|| after each backward (subclasses that know it later turn this off)."""

    def __init__(self) -> None:
        self._captures: dict[int, _ParamCapture] = {}
        self._generation = 0

    def watch(self, params: Iterable[Tensor]) -> None:
        """Register the capture hooks on every parameter that requires grad."""
        for param in params:
            if not param.requires_grad or id(param) in self._captures:
                continue
            capture = _ParamCapture()
            capture.handles = [param.register_hook(self._sample_hook(param, capture))]
            if self.records_grad_norm_after_backward:
                capture.handles.append(param.register_post_accumulate_grad_hook(self._accumulated_hook(capture)))
            self._captures[id(param)] = capture

    def _sample_hook(self, param: Tensor, capture: _ParamCapture):
        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                fresh = capture.generation != self._generation or param.grad is None
                if capture.sq is None:
                    capture.sq = torch.zeros_like(param, dtype=torch.float32)
                    if keeps_sample_sum(param.dtype):
                        capture.sum = torch.zeros_like(param, dtype=torch.float32)
                if fresh:
                    square_into(capture.sq, grad)
                    if capture.sum is not None:
                        capture.sum.copy_(grad)
                    capture.count = 0
                    capture.generation = self._generation
                else:
                    capture.sq.addcmul_(grad, grad)
                    if capture.sum is not None:
                        capture.sum.add_(grad)
                capture.count += 1

        return hook

    @staticmethod
    def _accumulated_hook(capture: _ParamCapture):
        def hook(param: Tensor) -> None:
            with torch.no_grad():
                capture.grad_norm = sq_norm(param.grad).sqrt()

        return hook

    def _current(self, param: Tensor) -> Optional[_ParamCapture]:
        capture = self._captures.get(id(param))
        if capture is None or capture.generation != self._generation or capture.count == 0:
            return None
        return capture

    def num_samples(self) -> int:
        counts = [c.count for c in self._captures.values() if c.generation == self._generation]
        return max(counts, default=0)

    def sq_sum(self, param: Tensor) -> Optional[Tensor]:
        capture = self._current(param)
        return None if capture is None else capture.sq

    def sample_sum(self, param: Tensor) -> Optional[Tensor]:
        capture = self._current(param)
        return None if capture is None else capture.sum

    def grad_scales(self, params: list[Tensor]) -> list[float]:
        """||p.grad|| now / at capture (one read of the gradients: in-place rescaling such as
        GradScaler's unscale kernel need not bump the version counter, so it cannot be skipped)."""
        captured = [self._current(p) for p in params]
        known = [i for i, c in enumerate(captured) if c is not None and c.grad_norm is not None]
        scales = [1.0] * len(params)
        if known:
            now = torch.stack([sq_norm(params[i].grad) for i in known]).sqrt()
            then = torch.stack([captured[i].grad_norm for i in known])
            for i, norm_now, norm_then in zip(known, now.tolist(), then.tolist()):
                scales[i] = norm_now / norm_then if norm_then > 0.0 else 1.0
        return scales

    def reset(self) -> None:
        self._generation += 1

    step_done = reset

    def close(self) -> None:
        for capture in self._captures.values():
            for handle in capture.handles:
                handle.remove()
        self._captures.clear()
