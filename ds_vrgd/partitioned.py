"""Second moments for data-parallel training with (optionally) partitioned optimizer state.

:class:`PartitionedMoments` is the moment source and layout the DeepSpeed adapter installs. It
knows torch.distributed, not DeepSpeed: the adapter describes every parameter (:class:`Layer`)
and where its elements are owned (:class:`OwnedSlice`), says what travels and when (:class:`Reduction`:
local sums once per step, or every micro-step the fp32 rows or the raw samples), and brackets each
``engine.backward()`` with :meth:`~PartitionedMoments.begin_micro_step` and
:meth:`~PartitionedMoments.end_micro_step`.
The bucket and its reductions: docs/deepspeed.md, "How the second moment travels"; the sample
rules: docs/usage.md, "Which gradients are samples"; the per-layer sums: docs/design.md §4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ds_vrgd import gsnr
from ds_vrgd._tensor_lists import square_into
from ds_vrgd.capture import HELD, JOINED, NEW, NEW_HELD, MicroStepSum, requiring_grad
from ds_vrgd.layout import Piece

REPLICATED = -1
"""Destination rank meaning "every rank" (ZeRO 0)."""

EXCHANGED = -2
"""In-flight mark of an all-to-all (every rank's rows, or raw samples, of this rank's elements arrive)."""


@dataclass(frozen=True)
class Reduction:
    """How the samples' sums reach the owners (docs/deepspeed.md, "How the second moment travels").

    ``sample_sums``: the fp32 sum of the samples S travels with Q (rows (g^2, g)); False where the
    engine's reduced gradient is itself an fp32 sum of the samples: then only g^2 travels and the mean
    comes from that gradient, ``grad_rescale()`` being the factor the engine applied to it after
    reducing it (clipping, loss-scale unscaling; read at the optimizer step).
    ``local_sums``: each rank sums its micro-steps' rows locally in fp32 and they are reduced once, during
    the step's last micro-step (``last_micro_step(k)`` true when the k-th micro-step of the step begins)
    or before the optimizer step; False: reduced every micro-step.
    ``raw_samples``: a dtype, where every micro-step's samples travel as they are, in that dtype (the
    gradients'), by one all-to-all per bucket half to the owners of their elements, who square and sum
    them in fp32: a bf16 sample costs 2 bytes instead of the 8 of its fp32 (g^2, g). Only for samples
    reduced every micro-step into partitions, with no weight repeated within a micro-step (a repeat raises).
    """

    sample_sums: bool = True
    local_sums: bool = False
    last_micro_step: Callable[[int], bool] = lambda k: True
    grad_rescale: Callable[[], float] = lambda: 1.0
    raw_samples: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.raw_samples is not None and (self.local_sums or not self.sample_sums):
            raise ValueError("raw samples are reduced every micro-step and give S at their owners")

    @property
    def row(self) -> int:
        """Elements per bucket row: (g^2, g), g^2 alone, or the raw sample."""
        return 2 if self.sample_sums and self.raw_samples is None else 1

    @property
    def bucket_dtype(self) -> torch.dtype:
        return torch.float32 if self.raw_samples is None else self.raw_samples


@dataclass(frozen=True)
class OwnedSlice:
    """Elements [param_offset, param_offset + numel) of a flattened parameter, owned by ``rank``.

    On that rank they are elements [owner_offset, owner_offset + numel) of
    ``owner`` (the tensor the optimizer updates); ``owner`` is None on other ranks.
    """

    rank: int
    param_offset: int
    numel: int
    owner: Optional[Tensor]
    owner_offset: int


@dataclass(frozen=True)
class Layer:
    """One model parameter: its name, where its elements are owned, and its full size.

    ``numel``/``ndim`` are those of the whole layer (under ZeRO-3 ``param`` itself is an
    empty placeholder outside forward/backward; a ``sharded`` layer is split over the
    tensor-parallel group, whose ranks hold one shard each and see the same samples).
    """

    name: str
    param: Tensor
    slices: tuple[OwnedSlice, ...]
    numel: int
    ndim: int
    sharded: bool = False


@dataclass(frozen=True)
class _Entry:
    """The rows of elements [param_start, param_start + numel) of layer ``layer`` (flattened) at ``offset`` of a
    bucket half."""

    layer: int
    param_start: int
    numel: int
    offset: int


class PartitionedMoments:
    """Moment source and piece layout for data parallelism (docs/deepspeed.md, "How the second moment travels")."""

    def __init__(
        self, layers: list[Layer], process_group, bucket_numel: int, comm_device: torch.device, capture: bool = True,
        local_grad: Optional[Callable[[Tensor], Optional[Tensor]]] = None, tensor_parallel_group=None,
        reduction: Reduction = Reduction(), due: Callable[[], bool] = lambda: True,
    ):
        """``layers``: every model parameter the optimizer steps, in a fixed order (the layer index of
        :class:`~ds_vrgd.layout.Piece`). ``process_group``: the data-parallel ranks, whose samples are
        reduced (a group of the caller's own, so its collectives never interleave with the engine's).
        ``capture=False``: layout only (no hooks, no Q, no bucket), for an optimizer with vr off.

        ``bucket_numel``: elements of the bucket (both halves; fp32 values of the rows, or raw samples).
        ``comm_device``: where the bucket lives and collectives run (the accelerator; under
        offload the owners and their Q, S are on the host).
        ``tensor_parallel_group``: the ranks holding the other shards of ``sharded`` layers (their
        per-layer sums add up over it); None without tensor parallelism.
        ``local_grad(param)``: this rank's gradient of param accumulated so far in the step (None if
        none), where the engine keeps it (ZeRO 0/1); given, a weight may receive several gradients per
        micro-step, else a second one raises.
        ``reduction``: what travels and when (:class:`Reduction`). ``due()``: whether the coming step
        takes samples (the optimizer's ``samples_due``); asked when a step's first micro-step begins.
        """
        self.layers = layers
        self.group = process_group
        self.reduction = reduction
        self._due = due
        self._tensor_parallel = tensor_parallel_group
        self._sharded = [i for i, layer in enumerate(layers) if layer.sharded]
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self._owners = {id(s.owner): s.owner for layer in layers for s in layer.slices if s.owner is not None}
        self._partitioned = any(s.rank != REPLICATED for layer in layers for s in layer.slices)
        self._sq = {key: _state_buffer(owner) for key, owner in self._owners.items() if capture}
        self._sum = {key: _state_buffer(owner) for key, owner in self._owners.items()
                     if capture and reduction.sample_sums}
        row, total = reduction.row, sum(layer.numel for layer in layers)
        size = max(2, min(bucket_numel // row, total)) if capture else 0
        self._halves = [torch.empty(rows, row, device=comm_device, dtype=reduction.bucket_dtype)
                        for rows in (size - size // 2, size // 2)]
        self._comm_device = comm_device
        self._filling = 0  # the half the hooks write into; the other may be in flight
        self._entries: list[_Entry] = []
        self._used = 0
        self._in_flight: list[tuple] = []  # (work, values, destination rank, owned slices)
        self._micro_steps = 0  # in this step
        self._micro_step_id = 0  # of the latest micro-step (never reused)
        self._in_micro_step = False
        self._capturing = True  # this step takes samples
        self._direct = not reduction.local_sums  # this micro-step's rows go to the bucket (else to the local sums)
        self._local: dict[int, tuple[Tensor, ...]] = {}  # layer -> its local sums (flat fp32, one per channel)
        self._holding: set[int] = set()  # layers whose local sums hold micro-steps of this step
        self._sums = [MicroStepSum() for _ in layers]
        self._held: list[int] = []  # layers with a pending sum in this micro-step
        self._local_grad = local_grad
        self.comm = {"collectives": 0, "elements": 0, "bytes": 0}
        self._handles = [handle for i in range(len(layers) if capture else 0) for handle in self._register(i)]

    # ------------------------------------------------------------- capture
    def _register(self, index: int) -> list:
        param = self.layers[index].param
        with requiring_grad(param):
            return [param.register_hook(self._hook(index)),
                    param.register_post_accumulate_grad_hook(self._accumulated_hook(index))]

    def _hook(self, index: int):
        def hook(grad: Tensor) -> None:
            # outside engine.backward (e.g. torch.autograd.grad) or on a step without statistics: no sample
            if self._in_micro_step and self._capturing:
                with torch.no_grad():
                    self._sample(index, grad)

        return hook

    def _accumulated_hook(self, index: int):
        def hook(param: Tensor) -> None:
            if not self._in_micro_step:
                raise RuntimeError(
                    f"a gradient of {self.layers[index].name} was accumulated outside engine.backward() (a direct "
                    "loss.backward()?): ds_vrgd takes one GSNR sample per engine.backward call; call "
                    "engine.backward(loss)"
                )

        return hook

    def _sample(self, index: int, grad: Tensor) -> None:
        """One gradient contribution of the micro-step (see MicroStepSum)."""
        param = self.layers[index].param
        earlier = self._local_grad(param) if self._local_grad is not None else None
        kind = self._sums[index].arrive(self._micro_step_id, grad, earlier is not None)
        if kind != NEW and self.reduction.raw_samples is not None:  # the first contribution may be sent already
            raise RuntimeError(self._repeat_error(index))
        if kind == NEW:
            self._add(index, grad.reshape(-1))
        elif kind == NEW_HELD:
            self._held.append(index)
        elif kind == JOINED and earlier is not None:
            self._add(index, grad.reshape(-1), earlier.reshape(-1))
        elif kind != HELD:
            raise RuntimeError(self._repeat_error(index))

    def _repeat_error(self, index: int) -> str:
        name = self.layers[index].name
        if self.reduction.raw_samples is not None and self._local_grad is not None:
            return (f"{name} received a second gradient within one engine.backward (a weight used in several "
                    "reentrant-checkpointed segments), but its first was already sent as a raw sample: set "
                    '"vrgd": {"local_sums": true} in the ds_config, or use activation checkpointing with '
                    "use_reentrant=False")
        if self._local_grad is None:
            return (f"{name} received a second gradient within one engine.backward (a weight used in several "
                    "reentrant-checkpointed segments), which DeepSpeed cannot reduce twice when it partitions "
                    "gradients (ZeRO-2 and 3): use activation checkpointing with use_reentrant=False, or ZeRO stage 0/1")
        return (f"{name} received a second gradient within one engine.backward (a weight used in several "
                "reentrant-checkpointed segments), first seen when its gradient already held earlier micro-steps: "
                "use activation checkpointing with use_reentrant=False")

    def _add(self, index: int, flat_grad: Optional[Tensor], flat_earlier: Optional[Tensor] = None) -> None:
        """One contribution g of a parameter's micro-batch gradient: into its local sums, or as rows
        (g^2[, g]) into the filling half (with the local sums of earlier micro-steps), in chunks that fit.

        With ``flat_earlier`` (the micro-step's earlier gradients of the parameter, whose square is
        already in) it adds what completes the square of the sum: (2 earlier + g) g. ``flat_grad``
        None: only the local sums travel.
        """
        if not self._direct:
            self._add_locally(index, flat_grad, flat_earlier)
            return
        local = self._take_local(index)
        bucket = self._halves[self._filling]
        start, total = 0, local[0].numel() if flat_grad is None else flat_grad.numel()
        while start < total:
            if self._used == bucket.shape[0]:
                self._launch()
                bucket = self._halves[self._filling]
            numel = min(bucket.shape[0] - self._used, total - start)
            rows = bucket.narrow(0, self._used, numel)
            if self.reduction.raw_samples is not None:
                rows[:, 0].copy_(flat_grad.narrow(0, start, numel))
            elif flat_grad is not None:
                grad = flat_grad.narrow(0, start, numel)
                _square(rows[:, 0], grad, None if flat_earlier is None else flat_earlier.narrow(0, start, numel))
                if self.reduction.sample_sums:
                    rows[:, 1].copy_(grad)
            for channel, sums in enumerate(local or ()):
                chunk = sums.narrow(0, start, numel)
                (rows[:, channel].copy_ if flat_grad is None else rows[:, channel].add_)(chunk)
                if self._aliased(index):  # the owner's Q (and S), which take the reduced rows
                    chunk.zero_()
            self._entries.append(_Entry(index, start, numel, self._used))
            self._used += numel
            start += numel

    def _add_locally(self, index: int, flat_grad: Tensor, flat_earlier: Optional[Tensor]) -> None:
        """Add a contribution into the layer's local sums (the first of the step replaces them)."""
        sums = self._local_sums(index, flat_grad)
        first = index not in self._holding
        if first:
            _square(sums[0], flat_grad, flat_earlier)
        elif flat_earlier is None:
            sums[0].addcmul_(flat_grad, flat_grad)
        else:
            completion = torch.empty_like(sums[0])
            _square(completion, flat_grad, flat_earlier)
            sums[0].add_(completion)
        if self.reduction.sample_sums:
            (sums[1].copy_ if first else sums[1].add_)(flat_grad)
        self._holding.add(index)

    def _aliased(self, index: int) -> bool:
        """Whether a layer's local sums are its owner's Q and S (a replicated layer: no extra memory)."""
        return self.layers[index].slices[0].rank == REPLICATED

    def _local_sums(self, index: int, flat_grad: Tensor) -> tuple[Tensor, ...]:
        """The layer's local sums (flat fp32), made on first use: the owner's Q (and S) for a replicated
        layer, else buffers the size of its gradient (the whole parameter, or this rank's tensor-parallel
        shard) on the gradient's device."""
        if index not in self._local:
            if self._aliased(index):
                owner = id(self.layers[index].slices[0].owner)
                buffers = (self._sq, self._sum) if self.reduction.sample_sums else (self._sq,)
                self._local[index] = tuple(b[owner].view(-1) for b in buffers)
            else:
                self._local[index] = tuple(torch.empty_like(flat_grad, dtype=torch.float32)
                                           for _ in range(self.reduction.row))
        return self._local[index]

    def _take_local(self, index: int) -> Optional[tuple[Tensor, ...]]:
        """The layer's local sums if they hold earlier micro-steps of this step (then they are consumed)."""
        if index not in self._holding:
            return None
        self._holding.discard(index)
        return self._local[index]

    def begin_micro_step(self) -> None:
        """engine.backward starts: the gradients until :meth:`end_micro_step` are one sample per rank."""
        if self._micro_steps == 0:
            self._capturing = self._due()
        self._in_micro_step = True
        self._micro_steps += 1
        self._micro_step_id += 1
        # once the last micro-step has begun, later ones (if any) also reduce directly
        self._direct = self._direct or not self.reduction.local_sums or self.reduction.last_micro_step(self._micro_steps)

    def end_micro_step(self) -> None:
        """engine.backward returned: square the repeats' pending sums; after the step's last micro-step
        (every micro-step without local sums), send what is still local and start the last reduction."""
        for index in self._held:
            pending = self._sums[index].settle()
            if pending is not None:
                self._add(index, pending.reshape(-1))
        self._held = []
        self._in_micro_step = False
        if self._direct:
            self._send_local()
            if self._used:
                self._launch()

    def _send_local(self) -> None:
        """Rows of every layer whose local sums still hold micro-steps of this step (in layer order, the
        same on every rank) into the bucket."""
        direct, self._direct = self._direct, True
        for index in sorted(self._holding):
            self._add(index, None)
        self._direct = direct

    def flush(self) -> None:
        """Reduce everything captured so far into the owners' Q (and S) and wait for it (before the step)."""
        self._send_local()
        if self._used:
            self._launch()
        self._complete()
    def _launch(self) -> None:
        """Start reducing the filling half; finish the other half's reduction; fill that one next."""
        values = self._halves[self._filling].narrow(0, 0, self._used)
        started = self._reduce_async(self._entries, values)
        self._complete()
        self._in_flight = started
        self._filling, self._entries, self._used = 1 - self._filling, [], 0

    def _reduce_async(self, entries: list[_Entry], values: Tensor) -> list[tuple]:
        """Start sending the rows (or raw samples) ``values`` [k, row] of ``entries`` to their owners: one
        all-to-all for the partitioned elements (each slice once to its owner, which sums every rank's; a
        reduce per owner would send about twice the bytes on gloo), one all-reduce for replicated ones."""
        by_rank: dict[int, list[tuple[int, OwnedSlice]]] = {}  # rank -> (offset in values, owned part)
        for entry in entries:
            for part in _owned_parts(self.layers[entry.layer].slices, entry.param_start, entry.numel):
                by_rank.setdefault(part.rank, []).append((entry.offset + part.param_offset - entry.param_start, part))
        started = []
        replicated = by_rank.pop(REPLICATED, None)
        if replicated:
            flat = _gather(values, [(offset, part.numel) for offset, part in replicated])
            started.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, REPLICATED,
                            [part for _, part in replicated]))
            self._count(flat)
        if by_rank:
            started.append(self._exchange_async(values, by_rank))
        return started

    def _exchange_async(self, values: Tensor, by_rank: dict[int, list[tuple[int, OwnedSlice]]]) -> tuple:
        """Send each rank the rows of its elements and receive every rank's rows of this rank's:
        [world, mine, row] once complete (the ranks fill their halves in the same order, so the counts agree)."""
        counts = [sum(part.numel for _, part in by_rank.get(rank, ())) for rank in range(self.world_size)]
        send = torch.cat([_gather(values, [(offset, part.numel) for offset, part in by_rank[rank]])
                          for rank in range(self.world_size) if counts[rank]])
        mine = counts[self.rank]
        received = values.new_empty(self.world_size * mine, values.shape[1])
        work = dist.all_to_all_single(received, send, output_split_sizes=[mine] * self.world_size,
                                      input_split_sizes=counts, group=self.group, async_op=True)
        self._count(send)
        parts = [part for _, part in by_rank.get(self.rank, ())]
        return work, received.view(self.world_size, mine, values.shape[1]), EXCHANGED, parts

    def _count(self, sent: Tensor) -> None:
        self.comm["collectives"] += 1
        self.comm["elements"] += sent.numel()
        self.comm["bytes"] += sent.numel() * sent.element_size()

    def _complete(self) -> None:
        """Wait for the reductions in flight and add the results that are this rank's into Q (and S)."""
        for work, received, rank, parts in self._in_flight:
            work.wait()
            if rank == REPLICATED:  # all-reduced rows [k, row]
                self._accumulate(received.unbind(1), parts)
            elif self.reduction.raw_samples is not None:  # every rank's samples [world, k, 1]: squared, summed in fp32
                samples = received.squeeze(2).float()
                sample_sum = samples.sum(0)
                self._accumulate((samples.square_().sum(0), sample_sum), parts)
            else:  # every rank's rows [world, k, row]
                self._accumulate(received.sum(0).unbind(1), parts)
        self._in_flight = []

    def _accumulate(self, channels: tuple[Tensor, ...], pieces: list[OwnedSlice]) -> None:
        """Add reduced channels (g^2[, g]), each [k] over the pieces in turn, into Q (and S) of their owners."""
        start = 0
        for piece in pieces:
            for channel, buffers in zip(channels, (self._sq, self._sum)):
                values = channel.narrow(0, start, piece.numel).to(piece.owner.device)  # offload: to the host
                buffers[id(piece.owner)].view(-1).narrow(0, piece.owner_offset, piece.numel).add_(values)
            start += piece.numel

    def owned_numel(self) -> int:
        """Elements of the tensors this rank's optimizer updates (its partition: all sub-groups, offloaded or not)."""
        return sum(owner.numel() for owner in self._owners.values())

    def buffer_numel(self) -> dict:
        """Extra fp32 elements held: ``{"sq": Q and S buffers, "bucket": both halves, "local": the local sums
        of partitioned layers}`` (local sums are made at the first micro-step that is not a step's last)."""
        held = sum(b.numel() for b in self._sq.values()) + sum(b.numel() for b in self._sum.values())
        local = sum(t.numel() for i, sums in self._local.items() if not self._aliased(i) for t in sums)
        return {"sq": held, "bucket": sum(h.numel() for h in self._halves), "local": local}

    # -------------------------------------------------- MomentSource protocol
    def num_samples(self) -> int:
        """n = micro-steps in this step x data-parallel world size (0 on a step without statistics)."""
        return self._micro_steps * self.world_size if self._capturing else 0

    def sq_sum(self, param: Tensor) -> Optional[Tensor]:
        """Q of an owned tensor (fp32, its shape; all ranks' samples of its elements), or None."""
        return self._sq.get(id(param)) if self.num_samples() else None

    def sample_sum(self, param: Tensor) -> Optional[Tensor]:
        """S of an owned tensor (fp32, its shape), or None where only g^2 travels (the mean then comes
        from the gradient)."""
        return self._sum.get(id(param)) if self.num_samples() else None

    def grad_scales(self, params: list[Tensor]) -> list[float]:
        """c with grad = c * (sum of the samples): the engine averages over the ranks, then rescales
        by ``reduction.grad_rescale()`` (clipping, loss-scale unscaling)."""
        return [self.reduction.grad_rescale() / self.world_size] * len(params)

    def step_done(self) -> None:
        """One param group stepped; the engine calls :meth:`reset` after the whole step."""

    def reset(self) -> None:
        """New step: finish reductions in flight, zero Q and S and forget the micro-steps."""
        self._complete()
        for buffer in (*self._sq.values(), *self._sum.values()):
            buffer.zero_()
        self._entries, self._used, self._micro_steps = [], 0, 0
        self._in_micro_step, self._held, self._holding = False, [], set()
        self._direct = not self.reduction.local_sums

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------- layout
    def pieces(self, owners: list[Tensor]) -> list[Piece]:
        """``owners`` (tensors this rank's optimizer updates) cut at layer boundaries into pieces, in layer order."""
        wanted = {id(owner) for owner in owners}
        return [
            Piece(s.owner, s.owner_offset, s.numel, i)
            for i, layer in enumerate(self.layers)
            for s in layer.slices
            if s.owner is not None and id(s.owner) in wanted and s.rank in (REPLICATED, self.rank)
        ]

    def table(self, pieces: list[Piece]) -> gsnr.LayerTable:
        """All layers (whole sizes) for ``pieces``, with the cross-rank reduce where layers are split."""
        return gsnr.LayerTable(
            piece_layer=[piece.layer for piece in pieces],
            layer_numel=[layer.numel for layer in self.layers],
            layer_ndim=[layer.ndim for layer in self.layers],
            layer_names=[layer.name for layer in self.layers],
            reduce=self._all_reduce if self._partitioned or self._sharded else None,
        )

    def _all_reduce(self, tensor: Tensor) -> None:
        """Per-layer sums [K, L] in place: over the data-parallel group (partitions), then the sharded
        layers' columns over the tensor-parallel group (replicated layers are counted once), through
        the communication device (the sums of offloaded owners are on the host)."""
        work = tensor.to(self._comm_device)
        if self._partitioned:
            dist.all_reduce(work, group=self.group)
        if self._sharded and self._tensor_parallel is not None:
            columns = work[:, self._sharded]  # a copy: advanced indexing
            dist.all_reduce(columns, group=self._tensor_parallel)
            work[:, self._sharded] = columns
        if work is not tensor:
            tensor.copy_(work)


def _square(out: Tensor, grad: Tensor, earlier: Optional[Tensor]) -> None:
    """out <- g^2, or (2 earlier + g) g: what completes the square of (earlier + g); computed in out's
    dtype (fp32) also for half-precision gradients (``torch.add(..., out=)`` would round in theirs)."""
    if earlier is None:
        square_into(out, grad)
    else:
        out.copy_(earlier)
        out.mul_(2.0).add_(grad).mul_(grad)


def _state_buffer(owner: Tensor) -> Tensor:
    """A zero fp32 buffer like an owned tensor, where it lives (host memory under ZeRO-Offload, pinned if it is)."""
    buffer = torch.zeros_like(owner, dtype=torch.float32)
    return buffer.pin_memory() if owner.is_pinned() else buffer


def _owned_parts(slices: tuple[OwnedSlice, ...], start: int, numel: int) -> list[OwnedSlice]:
    """The owned slices of a parameter cut to its elements [start, start + numel)."""
    parts = []
    for piece in slices:
        first, last = max(start, piece.param_offset), min(start + numel, piece.param_offset + piece.numel)
        if first < last:
            shift = first - piece.param_offset
            parts.append(OwnedSlice(piece.rank, first, last - first, piece.owner, piece.owner_offset + shift))
    return parts


def _gather(values: Tensor, runs: list[tuple[int, int]]) -> Tensor:
    """The (offset, numel) runs of ``values`` as one flat tensor: a view when they are adjacent, else a copy."""
    adjacent = all(offset == runs[i - 1][0] + runs[i - 1][1] for i, (offset, _) in enumerate(runs) if i)
    if adjacent:
        return values.narrow(0, runs[0][0], sum(numel for _, numel in runs))
    return torch.cat([values.narrow(0, offset, numel) for offset, numel in runs])
