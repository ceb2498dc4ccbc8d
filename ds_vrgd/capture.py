"""Moment sources: where the GSNR samples of a step come from.

A source (:class:`MomentSource`) gives the optimizer, per parameter, Q (the fp32 sum of
squared samples), n and c with ``p.grad = c * (sum of samples)``, plus the fp32 sum of the
samples S for fp16/bf16 gradients. :class:`BackwardHookMoments` is the plain-PyTorch source
(one sample per outermost ``backward()``); :mod:`ds_vrgd.ddp` extends it, and
:mod:`ds_vrgd.partitioned` is DeepSpeed's. How it works: docs/design.md §4, "The
plain-PyTorch source"; which gradients are samples: docs/usage.md, same-named section.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterable, Optional, Protocol, Sequence

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


class OutermostBackward:
    """Calls ``on_end`` once at the end of the outermost backward in which :meth:`arm` was called.

    A reentrant checkpoint runs its segment's backward as a nested graph task
    inside the checkpoint's node. At the end of a graph task
    ``torch._C._current_autograd_node()`` is None for an outermost task and the
    enclosing node for a nested one; for a nested end, a post-hook on that node
    arms the enclosing task when the node finishes, and so on outwards. So a
    backward whose first parameter gradient arrives inside a checkpoint (with
    none in the outer task) still ends once, at the outer end.
    """

    def __init__(self, on_end: Callable[[], None]):
        self._on_end = on_end
        self._armed: set[int] = set()  # graph tasks whose end is queued

    def arm(self) -> None:
        """From an autograd hook: have the running graph task report its end (once per task)."""
        task = torch._C._current_graph_task_id()
        if task not in self._armed:
            self._armed.add(task)
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._task_ended, task))

    def _task_ended(self, task: int) -> None:
        self._armed.discard(task)
        node = torch._C._current_autograd_node()
        if node is None:
            self._on_end()
            return

        def enclosing_task_resumed(grad_inputs, grad_outputs) -> None:
            handle.remove()
            self.arm()

        handle = node.register_hook(enclosing_task_resumed)

    def clear(self) -> None:
        """Forget tasks armed by a backward that raised (their callbacks never run)."""
        self._armed.clear()


NEW, NEW_HELD, HELD, JOINED, UNSEPARABLE = range(5)
"""Kinds of a gradient contribution (:meth:`MicroStepSum.arrive`)."""


class MicroStepSum:
    """One parameter's gradient contributions per micro-step; the sample is their sum.

    Usually one contribution per micro-step arrives, and the source squares it
    at once (NEW). A weight used in two reentrant-checkpointed segments gets
    several. The second one of a micro-step that began with no gradient
    accumulated for the parameter is JOINED: the accumulated gradient then
    holds exactly the micro-step's earlier contributions, so the source can
    complete the square (Q += 2 * earlier * g + g^2). From then on the
    parameter *repeats*: its contributions are summed in an fp32 pending
    buffer P (NEW_HELD, HELD) that the source squares once when the
    micro-step ends (:meth:`settle`). A repeat first seen in a micro-step that
    began with gradients of earlier micro-steps accumulated cannot be
    separated from them (UNSEPARABLE): the source raises.
    """

    __slots__ = ("micro_step", "started_empty", "pending", "holding")

    def __init__(self) -> None:
        self.micro_step = -1
        self.started_empty = False
        self.pending: Optional[Tensor] = None
        self.holding = False

    def arrive(self, micro_step: int, grad: Tensor, had_grad: bool) -> int:
        """Classify the contribution ``grad`` of micro-step ``micro_step`` (an id, never reused);
        ``had_grad``: the parameter had a gradient accumulated before it. Returns its kind (NEW ... UNSEPARABLE)."""
        if self.micro_step != micro_step:
            self.micro_step, self.started_empty = micro_step, not had_grad
            if self.pending is None:
                return NEW
            self.pending.copy_(grad)
            self.holding = True
            return NEW_HELD
        if self.holding:
            self.pending.add_(grad)
            return HELD
        if not self.started_empty:
            return UNSEPARABLE
        if self.pending is None:
            self.pending = torch.zeros_like(grad, dtype=torch.float32)
        return JOINED

    def settle(self) -> Optional[Tensor]:
        """The micro-step's pending sum, to square, the first time it is asked for; else None."""
        if not self.holding:
            return None
        self.holding = False
        return self.pending


@contextlib.contextmanager
def requiring_grad(param: Tensor):
    """Let hooks be registered on a frozen parameter: torch refuses them on a tensor that does not
    require grad, but keeps a leaf's hooks when it is frozen again, and they fire once it is unfrozen."""
    frozen = not param.requires_grad
    if frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        if frozen:
            param.requires_grad_(False)


def describe(name: Optional[str], param: Tensor, index: int) -> str:
    """How error messages name a parameter."""
    return name if name is not None else f"parameter {index} (shape {tuple(param.shape)})"


class _ParamCapture:
    """Per-parameter capture state of :class:`BackwardHookMoments`."""

    __slots__ = ("name", "trainable_at_watch", "sq", "sum", "count", "generation", "grad_norm", "incoming",
                 "contributions", "handles")

    def __init__(self, name: str, trainable: bool) -> None:
        self.name = name
        self.trainable_at_watch = trainable
        self.sq: Optional[Tensor] = None
        self.sum: Optional[Tensor] = None
        self.count = 0  # micro-steps with a sample in this generation
        self.generation = -1
        self.grad_norm: Optional[Tensor] = None
        self.incoming: Optional[tuple[Tensor, bool]] = None  # (gradient, had a grad) from the tensor hook
        self.contributions = MicroStepSum()
        self.handles: list = []


class BackwardHookMoments:
    """Samples = outermost backward passes, captured by hooks on the parameters
    (docs/design.md §4, "The plain-PyTorch source").

    The tensor hook only hands the gradient to the post-accumulate hook, which
    fires when the gradient reaches p.grad: ``torch.autograd.grad`` runs the
    tensor hook but not the other, so its gradients are no samples.
    """

    records_grad_norm_after_backward = True
    """Record ||p.grad|| after each backward (subclasses that know it later turn this off)."""

    def __init__(self, due: Optional[Callable[[], bool]] = None) -> None:
        """``due()``: whether the coming step takes samples (the optimizer's ``samples_due``); default always."""
        self._due = due if due is not None else (lambda: True)
        self._captures: dict[int, _ParamCapture] = {}
        self._generation = 0
        self._micro_step = 0  # id of the latest micro-step (never reused)
        self._in_micro_step = False
        self._capturing = True  # in this micro-step
        self._held: list[_ParamCapture] = []  # captures with a pending sum in this micro-step
        self._backward = OutermostBackward(self._end_micro_step)

    def watch(self, params: Iterable[Tensor], names: Optional[Sequence[Optional[str]]] = None) -> None:
        """Register the capture hooks on every tensor of ``params`` (also frozen ones: see
        :func:`requiring_grad`); a tensor already watched is skipped.

        ``names`` (aligned with ``params``) name the parameters in error messages.
        """
        params = list(params)
        for param, name in zip(params, names if names is not None else [None] * len(params)):
            if id(param) in self._captures:
                continue
            capture = _ParamCapture(describe(name, param, len(self._captures)), param.requires_grad)
            with requiring_grad(param):
                capture.handles = [param.register_hook(self._sample_hook(param, capture)),
                                   param.register_post_accumulate_grad_hook(self._accumulated_hook(capture))]
            self._captures[id(param)] = capture

    @staticmethod
    def _sample_hook(param: Tensor, capture: _ParamCapture):
        def hook(grad: Tensor) -> None:
            capture.incoming = (grad.detach(), param.grad is not None)  # an alias: p.grad may still take g over

        return hook

    def _accumulated_hook(self, capture: _ParamCapture):
        def hook(param: Tensor) -> None:
            grad, had_grad = capture.incoming
            capture.incoming = None
            if not self._in_micro_step:
                self._in_micro_step = True
                self._micro_step += 1
                self._capturing = self.samples_wanted()
            self._backward.arm()
            if not self._capturing:
                return
            with torch.no_grad():
                self._record(param, capture, grad, had_grad)
                if self.records_grad_norm_after_backward:
                    capture.grad_norm = sq_norm(param.grad).sqrt()

        return hook

    def _record(self, param: Tensor, capture: _ParamCapture, grad: Tensor, had_grad: bool) -> None:
        """Add one gradient contribution of the running micro-step to the capture (see MicroStepSum)."""
        kind = capture.contributions.arrive(self._micro_step, grad, had_grad)
        if kind == UNSEPARABLE:
            raise RuntimeError(
                f"{capture.name} received a second gradient within one backward (a weight used in several "
                "reentrant-checkpointed segments) while p.grad held earlier backwards' gradients, which cannot be "
                "told apart from this backward's sample: use torch.utils.checkpoint with use_reentrant=False, or "
                "optimizer.zero_grad(set_to_none=True) so the repeat is first seen in a backward that starts with "
                "p.grad None"
            )
        if kind in (NEW, NEW_HELD):
            fresh = self._count_sample(capture, param, had_grad)
            if kind == NEW:
                self._put_square(capture, grad, replace=fresh)
            else:
                self._held.append(capture)
                if fresh:  # settle adds the square into the new collection
                    for buffer in (capture.sq, capture.sum):
                        if buffer is not None:
                            buffer.zero_()
        elif kind == JOINED:  # p.grad is the micro-step's sum so far; Q and S hold only its first part
            self._put_square(capture, param.grad, replace=True)

    def _count_sample(self, capture: _ParamCapture, param: Tensor, had_grad: bool) -> bool:
        """Count a micro-step's sample; returns whether it starts a new collection (p.grad was None
        or the step is new), whose sums the first sample replaces."""
        if capture.sq is None:
            capture.sq = torch.zeros_like(param, dtype=torch.float32)
            if keeps_sample_sum(param.dtype):
                capture.sum = torch.zeros_like(param, dtype=torch.float32)
        fresh = not had_grad or capture.generation != self._generation
        if fresh:
            capture.count = 0
            capture.generation = self._generation
        capture.count += 1
        return fresh

    @staticmethod
    def _put_square(capture: _ParamCapture, sample: Tensor, replace: bool) -> None:
        """Q (+)= sample^2 and S (+)= sample (``replace``: = instead of +=)."""
        if replace:
            square_into(capture.sq, sample)
            if capture.sum is not None:
                capture.sum.copy_(sample)
        else:
            capture.sq.addcmul_(sample, sample)
            if capture.sum is not None:
                capture.sum.add_(sample)

    def _settle(self, capture: _ParamCapture) -> None:
        """Square the pending sum of a repeating parameter's micro-step into Q (once)."""
        pending = capture.contributions.settle()
        if pending is not None:
            self._put_square(capture, pending, replace=False)

    def _end_micro_step(self) -> None:
        for capture in self._held:
            self._settle(capture)
        self._held = []
        self._in_micro_step = False

    def samples_wanted(self) -> bool:
        """Whether this step's backward passes are samples (no capture on the optimizer's other steps)."""
        return self._due()

    def _current(self, param: Tensor) -> Optional[_ParamCapture]:
        capture = self._captures.get(id(param))
        if capture is None or capture.generation != self._generation or capture.count == 0:
            return None
        return capture

    def num_samples(self) -> int:
        """n: the most micro-steps any parameter has a sample of in this step (0 before the first backward)."""
        counts = [c.count for c in self._captures.values() if c.generation == self._generation]
        return max(counts, default=0)

    def sq_sum(self, param: Tensor) -> Optional[Tensor]:
        """Q of ``param`` in this step (fp32, param's shape), or None if it has no sample."""
        capture = self._current(param)
        return None if capture is None else capture.sq

    def sample_sum(self, param: Tensor) -> Optional[Tensor]:
        """S of ``param`` (fp32, param's shape) for fp16/bf16 parameters; None for fp32/fp64 or without a sample."""
        capture = self._current(param)
        return None if capture is None else capture.sum

    def grad_scales(self, params: list[Tensor]) -> list[float]:
        """c per tensor of ``params``: ||p.grad|| now / at capture (1.0 where unknown or zero). One read of
        the gradients: in-place rescaling such as GradScaler's unscale kernel need not bump the version
        counter, so it cannot be skipped."""
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
        """New step; also drops what a backward that raised (or torch.autograd.grad) left behind."""
        self._generation += 1
        self._in_micro_step = False
        self._held = []
        self._backward.clear()
        for capture in self._captures.values():
            capture.incoming = None

    step_done = reset

    def close(self) -> None:
        """Remove the hooks and forget every parameter."""
        for capture in self._captures.values():
            for handle in capture.handles:
                handle.remove()
        self._captures.clear()
