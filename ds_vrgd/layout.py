"""Layouts: which pieces of the optimizer's tensors belong to which model layer.

The optimizer updates *pieces*, each a view of one tensor it owns that lies
inside one model layer (docs/design.md §4). A :class:`Layout` cuts the owned
tensors into pieces and describes the layers (:class:`ds_vrgd.gsnr.LayerTable`,
with a cross-rank reduce where layers are split over ranks). In plain PyTorch
each parameter is one layer (:class:`WholeParamLayout`); the DeepSpeed source
(:class:`ds_vrgd.partitioned.PartitionedMoments`) is the layout of ZeRO
partitions and tensor-parallel shards.
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
        index = {id(p): i for i, (_, p) in enumerate(self._params())}
        return [Piece(p, 0, p.numel(), index[id(p)]) for p in params]

    def table(self, pieces: list[Piece]) -> gsnr.LayerTable:
        named = self._params()
        return gsnr.LayerTable(
            piece_layer=[piece.layer for piece in pieces],
            layer_numel=[p.numel() for _, p in named],
            layer_ndim=[p.ndim for _, p in named],
            layer_names=[name for name, _ in named],
        )
