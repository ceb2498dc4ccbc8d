"""GSNR samples under torch DistributedDataParallel: a communication hook.

:func:`enable_gsnr` gives a VR optimizer every rank's backward passes as samples: each rank
squares its micro-batch gradients (:class:`DDPMoments`, the hooks of :mod:`ds_vrgd.capture`) and
:func:`gsnr_allreduce_hook` reduces the squares together with DDP's gradient buckets. What is
reduced and what it costs: docs/huggingface.md, "torch DDP"; the sample rules: docs/usage.md,
"Which gradients are samples".
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's annotations against the
# real ``dist.GradBucket`` and ``Future`` types.

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ds_vrgd._tensor_lists import sq_norm
from ds_vrgd.capture import BackwardHookMoments, _ParamCapture, keeps_sample_sum
from ds_vrgd.optim import VROptimizer


class DDPMoments(BackwardHookMoments):
    """Backward-pass samples of every rank, reduced by :func:`gsnr_allreduce_hook`.

    ``process_group``: the ranks DDP reduces over (None: the default group); ``due``: as
    :class:`~ds_vrgd.capture.BackwardHookMoments`.
    """

    records_grad_norm_after_backward = False

    def __init__(self, process_group=None, due=None):
        super().__init__(due)
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self._reduced: set[int] = set()  # captures whose sums hold all ranks' samples (after a reduction)

    def num_samples(self) -> int:
        """n = this rank's backward passes in the step x world size."""
        return super().num_samples() * self.world_size

    def grad_scales(self, params: list[Tensor]) -> list[float]:
        """p.grad = (user rescale) x (rank average of the sample sums)."""
        return [c / self.world_size for c in super().grad_scales(params)]

    def _record(self, param: Tensor, capture: _ParamCapture, grad: Tensor, had_grad: bool) -> None:
        if not capture.trainable_at_watch:
            raise RuntimeError(
                f"{capture.name} did not require grad when DDP was built, so DDP does not average its gradient "
                "across ranks: build DDP (and call enable_gsnr) again after unfreezing it"
            )
        self._to_rank_share(capture)
        super()._record(param, capture, grad, had_grad)

    def _to_rank_share(self, capture: _ParamCapture) -> None:
        """Scale all-rank sums back to this rank's share (1 / world_size of them) before they are added to
        or reduced again: DDP without ``no_sync`` reduces every micro-step, and each sample must count once."""
        if id(capture) in self._reduced:
            self._reduced.discard(id(capture))
            for buffer in (capture.sq, capture.sum):
                if buffer is not None:
                    buffer.div_(self.world_size)

    def reset(self) -> None:
        """New step: forget the samples (zero_grad)."""
        super().reset()
        self._reduced.clear()

    step_done = reset

    def bucket_moments(self, params: list[Tensor], sample_sums: bool) -> Tensor:
        """This rank's sums of squared samples of the bucket's ``params`` (then, with ``sample_sums``,
        the sums of the samples), flattened in order: fp32 [sum numel] (x2 with ``sample_sums``).
        Pending sums of repeats are settled first; a parameter without a sample gives zeros."""
        for param in params:
            capture = self._current(param)
            if capture is not None:
                self._to_rank_share(capture)
                self._settle(capture)
        kinds = (self.sq_sum, self.sample_sum) if sample_sums else (self.sq_sum,)
        parts = []
        for kind in kinds:
            for param in params:
                buffer = kind(param)
                parts.append(buffer.reshape(-1) if buffer is not None else torch.zeros(param.numel(), device=param.device))
        return torch.cat(parts)

    def store_reduced(self, params: list[Tensor], grads: Tensor, moments: Tensor) -> None:
        """Write the all-rank ``moments`` (laid out as :meth:`bucket_moments`) back into the buffers of
        ``params`` and record the norms of the reduced, averaged ``grads`` (the bucket's flat gradient)."""
        start, total = 0, grads.numel()
        for param in params:
            numel = param.numel()
            capture = self._current(param)
            if capture is not None:
                capture.sq.view(-1).copy_(moments.narrow(0, start, numel))
                if capture.sum is not None:
                    capture.sum.view(-1).copy_(moments.narrow(0, total + start, numel))
                self._reduced.add(id(capture))
                capture.grad_norm = sq_norm(grads.narrow(0, start, numel)).sqrt()
            start += numel


def gsnr_allreduce_hook(state: DDPMoments, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the gradient bucket and sum its squared samples, together.

    ``state``: the source :func:`enable_gsnr` registered; ``bucket``: DDP's. Returns a future of the
    averaged flat gradient (the bucket's buffer), as DDP's default hook.
    """
    grads, params = bucket.buffer(), bucket.parameters()
    if not state.samples_wanted():  # a step without statistics: the gradient alone
        return dist.all_reduce(grads, group=state.group, async_op=True).get_future().then(
            lambda fut: fut.value()[0].div_(state.world_size))
    squares = state.bucket_moments(params, sample_sums=keeps_sample_sum(grads.dtype))
    numel = grads.numel()
    if grads.dtype == torch.float32:
        combined = torch.cat([grads, squares])
        future = dist.all_reduce(combined, group=state.group, async_op=True).get_future()

        def split(fut) -> Tensor:
            reduced = fut.value()[0]
            grads.copy_(reduced.narrow(0, 0, numel)).div_(state.world_size)
            state.store_reduced(params, grads, reduced.narrow(0, numel, squares.numel()))
            return grads

        return future.then(split)
    grad_future = dist.all_reduce(grads, group=state.group, async_op=True).get_future()
    square_future = dist.all_reduce(squares, group=state.group, async_op=True).get_future()

    def average(fut) -> Tensor:
        square_future.wait()
        grads.div_(state.world_size)
        state.store_reduced(params, grads, squares)
        return grads

    return grad_future.then(average)


def enable_gsnr(model: DistributedDataParallel, optimizer: VROptimizer, process_group=None) -> DDPMoments:
    """Give ``optimizer`` (a VR optimizer over ``model``'s parameters) the samples of all ranks of
    ``model`` (a DDP module) by registering the comm hook; ``process_group`` defaults to DDP's.
    Returns the :class:`DDPMoments` source. ValueError for a non-DDP model or a non-VR optimizer."""
    if not isinstance(model, DistributedDataParallel):
        raise ValueError(f"enable_gsnr needs a torch DistributedDataParallel model, got {type(model).__name__}")
    if not isinstance(optimizer, VROptimizer):
        raise ValueError(f"enable_gsnr needs a ds_vrgd VR optimizer, got {type(optimizer).__name__}")
    group: Optional[object] = process_group if process_group is not None else model.process_group
    source = DDPMoments(group, due=optimizer.samples_due)
    optimizer.use_moments(source)
    names = {id(p): name for name, p in model.module.named_parameters()}
    params = [p for g in optimizer.param_groups if g["vr"] for p in g["params"]]
    source.watch(params, [names.get(id(p)) for p in params])
    model.register_comm_hook(source, gsnr_allreduce_hook)
    return source
