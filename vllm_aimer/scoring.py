"""AIMER expert scores, computed straight from safetensors files.

score(w) = mean(|w|) / sqrt(mean(w^2)) = ||w||_1 / (sqrt(N) ||w||_2) over the
concatenated gate, up and down weights of one expert, dequantized. It lies in
[1/sqrt(N), 1] and does not change when w is scaled. Each projection's encoding
(vllm_aimer/encodings) adds its sums from bounded chunks, so memory stays flat
however large the experts are; sums are float64 across chunks. Plain float weights are
read from memory maps of the shards and reduced by a pool of threads (or on a GPU);
each projection's partial sums are merged in a fixed order, so scores do not depend on
the number of threads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vllm_aimer.checkpoint import Checkpoint
from vllm_aimer.encodings.base import CHUNK_ELEMENTS, Sums
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout, ScoredTensor
from vllm_aimer.lazy import imported
from vllm_aimer.shards import Shards, default_threads

__all__ = ["CHUNK_ELEMENTS", "ScoringResult", "aimer_score", "aimer_score_of", "score_checkpoint",
           "scoring_device", "DEVICES"]


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


def aimer_score_of(tensors: Iterable[Any]) -> float:
    """AIMER score of weights already in memory (numpy arrays or torch tensors; used by
    tools, benchmarks and tests)."""
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
    threads: int = 1
    """CPU threads that reduced plain float weights."""
    device: str = "cpu"
    """Where plain float weights were reduced ("cpu", or a CUDA device)."""

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9)

    def where(self) -> str:
        return (f"on {self.device}" if self.device != "cpu"
                else f"on the CPU, {self.threads} thread{'s' if self.threads > 1 else ''}")


def _partial(st: ScoredTensor, shards: Shards, experts: int, chunk_elements: int) -> list[Sums]:
    """One projection's sums, into fresh accumulators (merged in a fixed order later,
    so the result does not depend on which thread ran it or when)."""
    accs = [Sums() for _ in range(experts if st.expert is None else 1)]
    st.scorer.add(shards, accs, chunk_elements)
    return accs


def _partials(sts: list[ScoredTensor], shards: Shards, experts: int,
              chunk_elements: int) -> list[list[Sums]]:
    return [_partial(st, shards, experts, chunk_elements) for st in sts]


def score_checkpoint(
    ckpt: Checkpoint,
    layout: ExpertLayout,
    chunk_elements: int = CHUNK_ELEMENTS,
    progress: bool = True,
    layers: Iterable[int] | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> ScoringResult:
    """Score every routed expert of every MoE layer (trunk and MTP), or of `layers`
    only; reads only expert tensors.

    `threads`: CPU threads reducing plain float weights (default: `default_threads`);
    scores are identical for any count. `device`: "cuda" (or
    "cuda:N") reduces plain float weights on that GPU (`gpu_scoring`); quantized
    encodings are always decoded on the CPU."""
    if not layout.scorable:
        raise RuntimeError(f"layout built without scorers: {layout.unscorable}")
    wanted = tuple(layout.all_layers if layers is None else layers)
    if any(not st.scorer.threaded for layer in wanted for st in layout.scored[layer]):
        import torch  # noqa: F401 (quantized encodings decode with it: not scoring time)
    start = time.perf_counter()
    sums = {layer: [Sums() for _ in range(layout.num_experts)] for layer in wanted}
    # File order, then offset: each shard is read front to back.
    items = sorted(((layer, st) for layer in wanted for st in layout.scored[layer]),
                   key=lambda x: (x[1].info.file, x[1].info.offset))
    total = sum(t.nbytes for _, st in items for t in st.scorer.reads)
    bar = _progress_bar(total, progress)
    workers = max(1, threads if threads is not None else default_threads())
    on_device = device is not None and device != "cpu"
    bytes_read = 0
    shards = Shards(ckpt)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        device_parts: dict[int, list[Sums]] = {}
        if on_device:
            from vllm_aimer.gpu_scoring import device_sums

            plain = [i for i, (_, st) in enumerate(items) if st.scorer.plain_float]
            for i, part in zip(plain, device_sums(
                    shards, [(items[i][1], layout.num_experts) for i in plain], device,
                    workers)):
                device_parts[i] = part
        # Threaded projections go to the pool in runs of consecutive ones (a few MB
        # each: a task per small tensor would cost more than reducing it).
        pooled = [i for i, (_, st) in enumerate(items)
                  if pool is not None and st.scorer.threaded and i not in device_parts]
        target = min(64 << 20, max(1 << 20, total // (workers * 8)))
        task_of: dict[int, tuple[Future[list[list[Sums]]], int]] = {}
        run: list[int] = []
        run_bytes = 0
        for n, i in enumerate(pooled):
            run.append(i)
            run_bytes += items[i][1].info.nbytes
            if n + 1 == len(pooled) or run_bytes >= target:
                future = pool.submit(_partials, [items[j][1] for j in run], shards,
                                     layout.num_experts, chunk_elements)
                task_of.update({j: (future, k) for k, j in enumerate(run)})
                run, run_bytes = [], 0
        for i, (layer, st) in enumerate(items):
            if i in device_parts:
                part = device_parts.pop(i)
            elif i in task_of:
                future, k = task_of.pop(i)
                part = future.result()[k]
            else:
                part = _partial(st, shards, layout.num_experts, chunk_elements)
            accs = sums[layer] if st.expert is None else [sums[layer][st.expert]]
            for acc, p in zip(accs, part):
                acc.add_totals(p.abs_sum, p.sq_sum, p.numel)
            read = sum(t.nbytes for t in st.scorer.reads)
            bytes_read += read
            if bar is not None:
                bar.update(read)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        shards.close()
        if bar is not None:
            bar.close()
    scores = {layer: [aimer_score(s.abs_sum, s.sq_sum, s.numel) for s in sums[layer]]
              for layer in wanted}
    norms = {layer: [math.sqrt(s.sq_sum) for s in sums[layer]] for layer in wanted}
    return ScoringResult(scores, time.perf_counter() - start, bytes_read, norms,
                         threads=workers if pooled else 1,
                         device=device if on_device else "cpu")


DEVICES = ("auto", "cpu", "cuda")


def scoring_device(requested: str = "auto") -> tuple[str, str]:
    """(device for `score_checkpoint`, why), for "auto", "cpu", "cuda" or "cuda:N".

    "auto" takes the current CUDA device when torch is imported already (the loader, in
    a vLLM worker) and one is present; it never imports torch itself, which costs more
    seconds than a GPU saves `vllm-aimer score` on a CPU that reads as fast as the disk
    (pass "cuda" to insist). "cuda" without a usable device is an error, not a silent
    fallback."""
    if requested not in DEVICES and not requested.startswith("cuda:"):
        raise AimerError(f"scoring device {requested!r} is not one of {', '.join(DEVICES)} "
                         "or cuda:N.", "pass auto, cpu, cuda or cuda:N.")
    if requested == "cpu":
        return "cpu", "CPU requested"
    if requested == "auto" and not imported("torch"):
        return "cpu", "torch is not loaded (plain float weights need no torch on the CPU)"
    import torch

    if not torch.cuda.is_available():
        if requested == "auto":
            return "cpu", "no CUDA device"
        raise AimerError(f"scoring device {requested!r} requested, but torch sees no CUDA "
                         "device.", "score on the CPU (device cpu or auto).")
    device = requested if requested.startswith("cuda:") else f"cuda:{torch.cuda.current_device()}"
    return device, f"CUDA device {torch.cuda.get_device_name(device)}"


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="AIMER scoring experts",
                delay=1.0)
