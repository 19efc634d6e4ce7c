"""The checkpoint's tensors as vLLM should see them after pruning.

Pruned experts' tensors are skipped by name, before they are read; kept
experts are renumbered 0..K-1 in ascending order of their old ids; fused
all-expert tensors and router tensors are sliced to the kept rows. This is the
same place in the pipeline where vLLM's EP weight filter skips non-local experts,
and that filter is applied afterwards in the new id space.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from vllm_aimer.checkpoint import Checkpoint
from vllm_aimer.layout import ExpertLayout
from vllm_aimer.plan import Plan


@dataclass
class LoadStats:
    expert_bytes_loaded: int = 0
    expert_bytes_skipped: int = 0
    tensors_read: set[str] = field(default_factory=set)
    """Checkpoint names of every tensor read from disk (whole or in part)."""


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) runs of ascending ids, to read fused tensors in few slices."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class PrunedWeights:
    """Iterates (name, tensor) of a checkpoint with a plan applied."""

    def __init__(self, ckpt: Checkpoint, layout: ExpertLayout, plan: Plan) -> None:
        self.ckpt = ckpt
        self.arch = layout.arch
        self.num_experts = layout.num_experts
        self.kept = {layer: plan.layer(layer).kept for layer in plan.layer_ids}
        self.new_id = {layer: {old: new for new, old in enumerate(kept)}
                       for layer, kept in self.kept.items()}
        self.stats = LoadStats()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.iterate()

    def iterate(self, skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors in file order; `skip(new_name)` drops more (e.g. non-local experts)."""
        for file in self.ckpt.files:
            with safe_open(self.ckpt.path(file), framework="pt") as f:
                for name in f.keys():
                    out = self._load(f, name, skip)
                    if out is not None:
                        yield out

    def _read(self, f, name: str) -> torch.Tensor:
        self.stats.tensors_read.add(name)
        return f.get_tensor(name)

    def _load(self, f, name: str, skip: Callable[[str], bool] | None) -> tuple[str, torch.Tensor] | None:
        info = self.ckpt.tensors[name]
        hit = self.arch.match_expert(name)
        if hit is not None and hit[0] in self.kept:
            layer, old, _ = hit
            new = self.new_id[layer].get(old)
            if new is None:
                self.stats.expert_bytes_skipped += info.nbytes
                return None
            new_name = self.arch.rename_expert(name, new)
            if skip is not None and skip(new_name):
                return None
            self.stats.expert_bytes_loaded += info.nbytes
            return new_name, self._read(f, name)

        fused = self.arch.match_fused(name)
        if fused is not None and fused[0] in self.kept:
            kept = self.kept[fused[0]]
            share = info.nbytes // self.num_experts
            self.stats.expert_bytes_loaded += share * len(kept)
            self.stats.expert_bytes_skipped += share * (self.num_experts - len(kept))
            self.stats.tensors_read.add(name)
            sl = f.get_slice(name)
            parts = [sl[a:b] for a, b in _runs(kept)]
            return name, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

        layer = self.arch.match_router(name)
        if layer is not None and layer in self.kept:
            kept = torch.tensor(self.kept[layer], dtype=torch.long)
            dim = self.arch.router_dim(name)
            return name, self._read(f, name).index_select(dim, kept).contiguous()

        if skip is not None and skip(name):
            return None
        return name, self._read(f, name)
