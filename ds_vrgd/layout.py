"""Layouts: which pieces of the optimizer's tensors belong to which model layer.

The optimizer updates *pieces* (:class:`Piece`), each a view of one tensor it owns lying inside
one model layer; a :class:`Layout` cuts the owned tensors into pieces and describes the layers
(:class:`ds_vrgd.gsnr.LayerTable`). Plain PyTorch: :class:`WholeParamLayout`, one layer per
parameter; DeepSpeed: :class:`ds_vrgd.partitioned.PartitionedMoments` (ZeRO partitions,
tensor-parallel shards). Per-layer sums across ranks: docs/design.md §4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from ds_vrgd import gsnr


@dataclass(frozen=True)
class Piece:
    """Elements [offset, offset + numel) of the flattened owned tensor ``owner``, in ``layer``."""

    owner: Tensor
    offset: int
    numel: int
    layer: int

    def of(self, tensor: Tensor) -> Tensor:
        """The piece's view of a tensor shaped like the owner (the owner itself, its grad, state)."""
        if self.offset == 0 and self.numel == tensor.numel():
            return tensor
        return tensor.view(-1).narrow(0, self.offset, self.numel)

    def tiles(self, size: int) -> list["Piece"]:
        """The piece cut into consecutive pieces of at most ``size`` elements."""
        if self.numel <= size:
            return [self]
        return [
            Piece(self.owner, self.offset + start, min(size, self.numel - start), self.layer)
            for start in range(0, self.numel, size)
        ]


class Layout(Protocol):
    """What the optimizer needs to know about where its tensors' elements lie."""

    def pieces(self, owners: list[Tensor]) -> list[Piece]:
        """The owned tensors (those with a gradient this step) cut at layer boundaries."""

    def table(self, pieces: list[Piece]) -> gsnr.LayerTable:
        """The layers of ``pieces`` (all layers, with their total sizes and the cross-rank reduce)."""


class WholeParamLayout:
    """Each parameter is one layer and one piece; no cross-rank reduce. ``optimizer``: anything with
    torch's ``param_groups`` (names from a group's ``param_names``, else ``param_<i>``)."""

    def __init__(self, optimizer):
        self._optimizer = optimizer

    def _params(self) -> list[tuple[str, Tensor]]:
        named = []
        for group in self._optimizer.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            named.extend(zip(names, group["params"]))
        return [(name or f"param_{i}", p) for i, (name, p) in enumerate(named)]

    def pieces(self, params: list[Tensor]) -> list[Piece]:
        """One whole piece per tensor of ``params`` (parameters of the optimizer), in that order."""
        index = {id(p): i for i, (_, p) in enumerate(self._params())}
        return [Piece(p, 0, p.numel(), index[id(p)]) for p in params]

    def table(self, pieces: list[Piece]) -> gsnr.LayerTable:
        """Every parameter of the optimizer as a layer; no cross-rank reduce."""
        named = self._params()
        return gsnr.LayerTable(
            piece_layer=[piece.layer for piece in pieces],
            layer_numel=[p.numel() for _, p in named],
            layer_ndim=[p.ndim for _, p in named],
            layer_names=[name for name, _ in named],
        )
