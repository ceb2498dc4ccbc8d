"""What one step of a VR optimizer works on (docs/design.md §4, "How a step runs").

Blocks of consecutive pieces (on CPU, cache-sized tiles), each param group's share of the step, the
results its phases hand on, and the per-layer sums with named rows, packed and unpacked only here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from ds_vrgd import gsnr
from ds_vrgd._tensor_lists import ListOps, TensorList
from ds_vrgd.layout import Piece

FIRST_ROWS = gsnr.PARTIAL_ROWS + ("numel",)
"""Rows of reduction 1: gsnr's partial sums and the element count of the layers with GSNR."""
SECOND_ROWS = ("at_low", "at_high", "weight_sq", "update_sq")
"""Rows of reduction 2: elements at the bounds of rho, and for LARS/LAMB ||W||^2 and ||update||^2."""


class PieceSums:
    """Per-piece partial sums [K, P] with named rows, filled by phase and summed per layer in one call."""

    def __init__(self, rows: Sequence[str], table: gsnr.LayerTable, device: torch.device):
        self.rows = tuple(rows)
        self.table = table
        self.values = torch.zeros(len(self.rows), len(table.piece_layer), device=device)

    def put(self, columns: slice, **rows: Tensor) -> None:
        """Each named row's values [len(columns)] into the given piece columns."""
        for name, values in rows.items():
            self.values[self.rows.index(name), columns] = values

    def layer_sums(self) -> "LayerSums":
        """The per-layer sums over all ranks (:meth:`gsnr.LayerTable.layer_sums`)."""
        return LayerSums(self.rows, self.table.layer_sums(self.values))


class LayerSums:
    """Per-layer sums [K, L] of one reduction, read by row name as [L] floats."""

    def __init__(self, rows: tuple[str, ...], sums: Tensor):
        self.rows = rows
        self.sums = sums

    @functools.cached_property
    def _values(self) -> list[list[float]]:
        return self.sums.tolist()  # one host sync for all rows

    def __getitem__(self, row: str) -> list[float]:
        return self._values[self.rows.index(row)]

    def sqrt(self, *rows: str) -> list[list[float]]:
        """The square roots of the named rows (fp32, as the sums), with one host sync."""
        return self.sums[[self.rows.index(row) for row in rows]].sqrt().tolist()


class Block:
    """Consecutive pieces of one param group that are processed together.

    ``columns`` is the block's slice of the step's layer table. ``steps`` holds
    each piece's step count t of this step (its count after the step).
    """

    def __init__(self, state: dict, pieces: list[Piece], first: int, table: gsnr.LayerTable):
        self.pieces = pieces
        self.columns = slice(first, first + len(pieces))
        self.params: TensorList = [piece.of(piece.owner) for piece in pieces]
        self.grads: TensorList = [piece.of(piece.owner.grad) for piece in pieces]
        self.steps: list[int] = [int(state[piece.owner]["step"]) + 1 for piece in pieces]
        self.is_matrix: list[bool] = [table.layer_ndim[piece.layer] > 1 for piece in pieces]
        self._state = state

    def state(self, key: str, dtype: Optional[torch.dtype] = None, fill: float = 0.0) -> TensorList:
        """Views of the per-element state ``key`` (created like the owner, filled with ``fill``)."""
        views = []
        for piece in self.pieces:
            owner_state = self._state[piece.owner]
            if key not in owner_state:
                owner_state[key] = torch.full_like(piece.owner, fill, dtype=dtype, memory_format=torch.preserve_format)
            views.append(piece.of(owner_state[key]))
        return views

    def decayed(self, exclude_1d: bool) -> list[int]:
        """Indices of the pieces that take weight decay (all, or only ndim > 1 with exclude_1d)."""
        return [i for i, is_matrix in enumerate(self.is_matrix) if is_matrix or not exclude_1d]


@dataclass(frozen=True)
class GroupStep:
    """One param group's part of a step: its blocks, its list ops, whether GSNR is computed this step
    (``gsnr``) or rho is held from the last statistics step (``held``); neither: rho = 1."""

    group: dict
    blocks: list[Block]
    ops: ListOps
    gsnr: bool
    held: bool = False

    def each_block(self) -> Iterable[Block]:
        """The blocks in order; a block's temporaries are dead when the next starts, so scratch is reused."""
        for block in self.blocks:
            if self.ops.scratch is not None:
                self.ops.scratch.reset()
            yield block


Ratios = list[list[Optional[gsnr.GsnrRatio]]]
"""Phase 1's result per group and block: the GSNR ratio, or None where GSNR is off."""
Updates = list[list[Optional[TensorList]]]
"""Phase 2's result per group and block: the LARS/LAMB direction that phase 3 applies (else None)."""


def tiles(piece: Piece, size: int) -> list[Piece]:
    """The piece cut into tiles of at most ``size`` elements (views need a contiguous owner and grad)."""
    if piece.owner.is_contiguous() and piece.owner.grad.is_contiguous():
        return piece.tiles(size)
    return [piece]


def block_runs(pieces: list[Piece], size: Optional[int]) -> list[tuple[int, list[Piece]]]:
    """Consecutive runs of pieces with at most ``size`` elements each (one run if size is None).

    Returns (index of the run's first piece, pieces) pairs. Pieces are expected
    to be tiles of at most ``size`` elements already.
    """
    if size is None:
        return [(0, pieces)] if pieces else []
    runs, current, start, total = [], [], 0, 0
    for index, piece in enumerate(pieces):
        if current and total + piece.numel > size:
            runs.append((start, current))
            current, start, total = [], index, 0
        current.append(piece)
        total += piece.numel
    if current:
        runs.append((start, current))
    return runs
