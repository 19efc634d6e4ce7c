"""AIMER expert scores, computed straight from safetensors files.

score(w) = mean(|w|) / sqrt(mean(w^2)) = ||w||_1 / (sqrt(N) ||w||_2) over the
concatenated gate, up and down weights of one expert, dequantized. It lies in
[1/sqrt(N), 1] and does not change when w is scaled. Each projection's encoding
(vllm_aimer/encodings) adds its sums from bounded chunks, so memory stays flat
however large the experts are; sums are float64 across chunks.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vllm_aimer.checkpoint import Checkpoint
from vllm_aimer.encodings.base import CHUNK_ELEMENTS, Sums
from vllm_aimer.layout import ExpertLayout

__all__ = ["CHUNK_ELEMENTS", "ScoringResult", "aimer_score", "aimer_score_of", "score_checkpoint"]


def aimer_score(abs_sum: float, sq_sum: float, numel: int) -> float:
    """The AIMER score from the sums of |w| and w^2 over `numel` entries.

    An all-zero expert has no defined ratio; it is scored 1.0 (the flattest
    possible), so it is the first to be pruned, which is what a dead expert deserves.
    """
    if numel <= 0:
        raise ValueError("an expert must have at least one weight")
    if sq_sum <= 0.0:
        return 1.0
    score = (abs_sum / numel) / math.sqrt(sq_sum / numel)
    # Rounding can step a hair outside the mathematical range; keep the invariant.
    return min(1.0, max(1.0 / math.sqrt(numel), score))


def aimer_score_of(tensors: Iterable[torch.Tensor]) -> float:
    """AIMER score of tensors already in memory (used by tools and tests)."""
    acc = Sums()
    for t in tensors:
        acc.add(t)
    return aimer_score(acc.abs_sum, acc.sq_sum, acc.numel)


@dataclass(frozen=True)
class ScoringResult:
    scores: dict[int, list[float]]
    """Per MoE layer, the score of each routed expert (index = expert id)."""
    seconds: float
    bytes_read: int
    magnitudes: dict[int, list[float]] | None = None
    """Per MoE layer, each expert's L2 norm sqrt(sum w^2) over the same weights (the
    magnitude baseline, vllm_aimer.criteria), from the same pass."""


class _Shards:
    """get_slice/get_tensor by tensor name over a checkpoint's shards (a weight and its
    scales may sit in different files); a few files stay open at a time."""

    OPEN = 4

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.handles: OrderedDict[str, Any] = OrderedDict()

    def _handle(self, name: str) -> Any:
        file = self.ckpt.tensors[name].file
        if file in self.handles:
            self.handles.move_to_end(file)
            return self.handles[file]
        while len(self.handles) >= self.OPEN:
            self.handles.popitem(last=False)[1].__exit__(None, None, None)
        handle = safe_open(self.ckpt.path(file), framework="pt")
        self.handles[file] = handle.__enter__()
        return self.handles[file]

    def get_slice(self, name: str) -> Any:
        return self._handle(name).get_slice(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        while self.handles:
            self.handles.popitem()[1].__exit__(None, None, None)


def score_checkpoint(
    ckpt: Checkpoint,
    layout: ExpertLayout,
    chunk_elements: int = CHUNK_ELEMENTS,
    progress: bool = True,
    layers: Iterable[int] | None = None,
) -> ScoringResult:
    """Score every routed expert of every MoE layer (trunk and MTP), or of `layers`
    only; reads only expert tensors."""
    if not layout.scorable:
        raise RuntimeError(f"layout built without scorers: {layout.unscorable}")
    start = time.perf_counter()
    wanted = tuple(layout.all_layers if layers is None else layers)
    sums = {layer: [Sums() for _ in range(layout.num_experts)] for layer in wanted}
    items = sorted(((st.info.file, layer, st) for layer in wanted
                    for st in layout.scored[layer]), key=lambda x: x[0])
    total = sum(t.nbytes for _, _, st in items for t in st.scorer.reads)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="AIMER scoring experts",
               disable=not progress, delay=1.0)
    bytes_read = 0
    shards = _Shards(ckpt)
    try:
        for _, layer, st in items:
            accs = sums[layer] if st.expert is None else [sums[layer][st.expert]]
            st.scorer.add(shards, accs, chunk_elements)
            read = sum(t.nbytes for t in st.scorer.reads)
            bytes_read += read
            bar.update(read)
    finally:
        shards.close()
        bar.close()
    scores = {layer: [aimer_score(s.abs_sum, s.sq_sum, s.numel) for s in sums[layer]]
              for layer in wanted}
    norms = {layer: [math.sqrt(s.sq_sum) for s in sums[layer]] for layer in wanted}
    return ScoringResult(scores, time.perf_counter() - start, bytes_read, norms)
