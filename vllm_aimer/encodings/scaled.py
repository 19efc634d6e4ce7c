"""Shared by the encodings whose codes are multiplied by a scale named `weight_scale`
(FP8 and INT8 per tensor, per channel, per block or per group): which scale shapes a
config allows, and their canonical form [row blocks, column blocks] with the block
(br, bc) each scale covers, so chunks of whole block rows can be scored exactly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_aimer.lazy import torch

from vllm_aimer.encodings.base import (MatrixScorer, Projection, Sums, add_block_scaled, ceil_div,
                                       f64, refuse, row_spans)

__all__ = ["Strategy", "ct_strategy", "check_scale", "expand_tile", "ScaledScorer"]


@dataclass(frozen=True)
class Strategy:
    """How one scale entry covers a weight [rows, cols]."""
    kind: str
    """tensor, channel, block or group."""
    block: tuple[int, int] | None = None
    """block: (rows, columns) of one scale block."""
    group: int | None = None
    """group: columns per scale."""

    def scale_shapes(self, rows: int, cols: int) -> list[tuple[int, ...]]:
        """The scale shapes producers write for a weight [rows, cols]."""
        if self.kind == "tensor":
            return [(), (1,), (1, 1)]
        if self.kind == "channel":
            return [(rows,), (rows, 1)]
        if self.kind == "block":
            assert self.block
            return [(ceil_div(rows, self.block[0]), ceil_div(cols, self.block[1]))]
        assert self.group
        return [(rows, ceil_div(cols, self.group))]

    def tile(self, rows: int, cols: int) -> tuple[int, int]:
        """(br, bc) one canonical scale entry covers."""
        if self.kind in ("tensor", "channel"):
            return 1, cols
        if self.kind == "block":
            assert self.block
            return self.block
        assert self.group
        return 1, self.group

    def canonical(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """Scales (or zero points) as [row blocks, column blocks] for `tile`."""
        if self.kind == "tensor":
            return t.reshape(1, 1).expand(rows, 1)
        if self.kind == "channel":
            return t.reshape(rows, 1)
        return t


def ct_strategy(weights: Mapping[str, Any]) -> Strategy | None:
    """The compressed-tensors weight strategy, or None if it is not one of ours."""
    kind = weights.get("strategy")
    if kind in ("tensor", "channel"):
        return Strategy(kind)
    if kind == "block":
        block = weights.get("block_structure")
        if isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block):
            return Strategy("block", block=(block[0], block[1]))
        return None
    if kind == "group" and isinstance(weights.get("group_size"), int):
        return Strategy("group", group=weights["group_size"])
    return None


def check_scale(proj: Projection, suffix: str, strategy: Strategy, rows: int, cols: int) -> None:
    """Check that tensor `suffix` of `proj` has a shape `strategy` allows.

    Raises:
        AimerError: it has another shape.
    """
    scale = proj.tensors[suffix]
    shapes = strategy.scale_shapes(rows, cols)
    if tuple(scale.shape) not in shapes:
        raise refuse(
            proj, f"{scale.name} has shape {list(scale.shape)}, but a {strategy.kind} scale "
            f"for weight [{rows}, {cols}] has shape {' or '.join(str(list(s)) for s in shapes)}.",
            "check the checkpoint's quantization_config against its tensors.")


def expand_tile(t: torch.Tensor, tile: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Per-entry values [rows, cols] from one value per tile (zero points)."""
    br, bc = tile
    return t.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]


class ScaledScorer(MatrixScorer):
    """Codes (FP8 or INT8) less their `weight_zero_point` (INT8 asymmetric only), times
    `weight_scale` laid out as the `Strategy` says, per expert."""

    def __init__(self, proj: Projection, strategy: Strategy) -> None:
        self.weight, self.scale = proj.tensors["weight"], proj.tensors["weight_scale"]
        self.zero = proj.tensors.get("weight_zero_point")
        super().__init__(proj, self.weight, self.scale, *([self.zero] if self.zero else []))
        self.strategy = strategy

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        rows, cols = self.weight.shape
        tile = self.strategy.tile(rows, cols)
        scale = self.strategy.canonical(f64(f.get_tensor(self.scale.name)), rows)
        zero = (self.strategy.canonical(f.get_tensor(self.zero.name).to(torch.float32), rows)
                if self.zero is not None else None)
        sl = f.get_slice(self.weight.name)
        for span in row_spans(rows, cols, chunk_elements, align=tile[0]):
            blocks = slice(span.start // tile[0], ceil_div(span.stop, tile[0]))
            v = sl[span].to(torch.float32)
            if zero is not None:
                v = v - expand_tile(zero[blocks], tile, v.shape[0], cols)
            add_block_scaled(acc, v, scale[blocks], tile)
