"""Second moments for data-parallel training with (optionally) partitioned optimizer state.

This is the moment source the DeepSpeed adapter installs. It knows
torch.distributed but not DeepSpeed: the adapter describes where every
parameter's elements live (:class:`OwnedSlice`) and what the optimizer owns.

Per micro-step (one ``backward()``), on every rank, a tensor hook on each
parameter receives the local gradient g of that micro-batch and writes g^2
(fp32) into a reduction bucket. When the bucket is full, and at the end of
the backward pass, it is reduced along the same path as the gradient:

* partitioned (ZeRO 1/2): the slice destined to rank r is ``reduce``-d to r
  (one collective per destination rank present in the bucket, the pattern
  DeepSpeed's own ``average_tensor`` uses), and r adds it into its fp32
  buffer Q of its partition's size;
* replicated (ZeRO 0): the bucket is all-reduced and every rank adds it into
  Q of the full parameter.

So after a step's micro-steps, Q = sum over ranks and micro-batches of g^2 for
exactly the elements this rank's optimizer updates, and n = world_size x
micro-steps. Extra memory: Q (partition-sized, fp32) plus one fp32 bucket.
Collectives use their own process group (a clone of the data-parallel group)
so they never interleave with the engine's own on one communicator.

The layout side (:meth:`pieces`, :meth:`table`) cuts every owned tensor into
per-layer pieces and sums per-layer partial vectors over the group, so GSNR
layer means and LARS/LAMB norms are exact even for a layer split across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ds_vrgd import gsnr
from ds_vrgd._tensor_lists import square_into
from ds_vrgd.optim._base import Piece

REPLICATED = -1
"""Destination rank meaning "every rank" (ZeRO 0)."""


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
    """One model parameter: its name, shape facts and where its elements are owned."""

    name: str
    param: Tensor
    slices: tuple[OwnedSlice, ...]


class PartitionedMoments:
    """Moment source and piece layout for data parallelism (see module docstring)."""

    def __init__(self, layers: list[Layer], process_group, bucket_numel: int):
        self.layers = layers
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self._layer_of = {id(layer.param): i for i, layer in enumerate(layers)}
        owners = {id(s.owner): s.owner for layer in layers for s in layer.slices if s.owner is not None}
        self._sq = {key: torch.zeros_like(owner, dtype=torch.float32) for key, owner in owners.items()}
        total = sum(layer.param.numel() for layer in layers)
        device = layers[0].param.device if layers else torch.device("cpu")
        self._bucket = torch.empty(max(1, min(bucket_numel, total)), dtype=torch.float32, device=device)
        self._entries: list[tuple[int, int]] = []  # (layer index, bucket offset)
        self._used = 0
        self._micro_steps = 0
        self._in_backward = False
        self._grad_scale: dict[int, float] = {}
        self.comm = {"collectives": 0, "elements": 0}
        self._handles = [layer.param.register_hook(self._hook(i)) for i, layer in enumerate(layers)
                         if layer.param.requires_grad]

    # ------------------------------------------------------------- capture
    def _hook(self, index: int):
        def hook(grad: Tensor) -> None:
            if not self._in_backward:
                self._in_backward = True
                self._micro_steps += 1
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            with torch.no_grad():
                self._add(index, grad)

        return hook

    def _add(self, index: int, grad: Tensor) -> None:
        numel = grad.numel()
        if self._used + numel > self._bucket.numel() and self._used:
            self.flush()
        if numel > self._bucket.numel():
            self._reduce_into_owners([(index, 0)], grad.detach().float().reshape(-1).square())
            return
        square_into(self._bucket.narrow(0, self._used, numel), grad.reshape(-1))
        self._entries.append((index, self._used))
        self._used += numel

    def _end_of_backward(self) -> None:
        self._in_backward = False
        self.flush()

    def flush(self) -> None:
        """Reduce the bucket's squared gradients into their owners' Q buffers."""
        if self._used:
            self._reduce_into_owners(self._entries, self._bucket.narrow(0, 0, self._used))
        self._entries, self._used = [], 0

    def _reduce_into_owners(self, entries: list[tuple[int, int]], values: Tensor) -> None:
        """values[bucket_offset + k] is element k of layer ``index``'s flattened g^2."""
        by_rank: dict[int, list[tuple[Tensor, OwnedSlice]]] = {}
        for index, start in entries:
            for piece in self.layers[index].slices:
                chunk = values.narrow(0, start + piece.param_offset, piece.numel)
                by_rank.setdefault(piece.rank, []).append((chunk, piece))
        for rank in sorted(by_rank):
            chunks = by_rank[rank]
            flat = chunks[0][0] if len(chunks) == 1 else torch.cat([c for c, _ in chunks])
            if rank == REPLICATED:
                dist.all_reduce(flat, group=self.group)
            else:
                dist.reduce(flat, dst=dist.get_global_rank(self.group, rank), group=self.group)
            self.comm["collectives"] += 1
            self.comm["elements"] += flat.numel()
            if rank in (REPLICATED, self.rank):
                self._accumulate(flat, [piece for _, piece in chunks])

    def _accumulate(self, flat: Tensor, pieces: list[OwnedSlice]) -> None:
        start = 0
        for piece in pieces:
            sq = self._sq[id(piece.owner)].view(-1).narrow(0, piece.owner_offset, piece.numel)
            sq.add_(flat.narrow(0, start, piece.numel))
            start += piece.numel

    def buffer_numel(self) -> dict:
        """Extra fp32 elements held: the Q buffers and the reduction bucket."""
        return {"sq": sum(sq.numel() for sq in self._sq.values()), "bucket": self._bucket.numel()}

    # -------------------------------------------------- MomentSource protocol
    def num_samples(self) -> int:
        return self._micro_steps * self.world_size

    def sq_sum(self, param: Tensor) -> Optional[Tensor]:
        return self._sq.get(id(param)) if self._micro_steps else None

    def set_grad_scale(self, owner: Tensor, scale: float) -> None:
        """The engine rescaled owner's gradient by ``scale`` after reduction (unscale, clipping)."""
        self._grad_scale[id(owner)] = scale

    def grad_scales(self, params: list[Tensor]) -> list[float]:
        """c = (engine rescale) / world_size: the gradient is the rank-average of the sample sums."""
        return [self._grad_scale.get(id(p), 1.0) / self.world_size for p in params]

    def step_done(self) -> None:
        """One param group stepped; the engine calls :meth:`reset` after the whole step."""

    def reset(self) -> None:
        for sq in self._sq.values():
            sq.zero_()
        self._entries, self._used, self._micro_steps = [], 0, 0
        self._grad_scale.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------- layout
    def pieces(self, owners: list[Tensor]) -> list[Piece]:
        """Every owned tensor cut at layer boundaries, in layer order."""
        wanted = {id(owner) for owner in owners}
        return [
            Piece(s.owner, s.owner_offset, s.numel, i)
            for i, layer in enumerate(self.layers)
            for s in layer.slices
            if s.owner is not None and id(s.owner) in wanted and s.rank in (REPLICATED, self.rank)
        ]

    def table(self, pieces: list[Piece]) -> gsnr.LayerTable:
        replicated = all(s.rank == REPLICATED for layer in self.layers for s in layer.slices)
        return gsnr.LayerTable(
            piece_layer=[piece.layer for piece in pieces],
            layer_numel=[layer.param.numel() for layer in self.layers],
            layer_ndim=[layer.param.ndim for layer in self.layers],
            layer_names=[layer.name for layer in self.layers],
            reduce=None if replicated else self._all_reduce,
        )

    def _all_reduce(self, tensor: Tensor) -> None:
        dist.all_reduce(tensor, group=self.group)
