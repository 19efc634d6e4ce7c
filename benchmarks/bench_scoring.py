"""Figure 1: scoring throughput of `score_checkpoint` next to (a) a plain chunked read
of the same expert bytes and (b) the offline tools' path: load the dense model with
transformers, then score its in-memory expert parameters."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks.common import Figure, Result, evict_page_cache, shard_files
from vllm_aimer.checkpoint import Checkpoint, open_checkpoint
from vllm_aimer.layout import ExpertLayout, expert_layout
from vllm_aimer.scoring import CHUNK_ELEMENTS, aimer_score_of, score_checkpoint

Scores = dict[int, list[float]]


def aimer(ckpt: Checkpoint, layout: ExpertLayout) -> Scores:
    return score_checkpoint(ckpt, layout, progress=False).scores


def plain_read(ckpt: Checkpoint, layout: ExpertLayout) -> Scores:
    """The same tensors, files and chunks as score_checkpoint; each chunk only summed."""
    by_file: dict[str, list[str]] = {}
    for layer in layout.layers:
        for st in layout.scored[layer]:
            by_file.setdefault(st.info.file, []).append(st.info.name)
    total = 0.0
    for file in sorted(by_file):
        with safe_open(ckpt.path(file), framework="pt") as f:
            for name in by_file[file]:
                sl = f.get_slice(name)
                rows = sl.get_shape()[0]
                step = max(1, CHUNK_ELEMENTS // (ckpt.tensors[name].numel // rows))
                for start in range(0, rows, step):
                    total += float(sl[start:start + step].sum())
    return {-1: [total]}


def dense_then_score(ckpt: Checkpoint, layout: ExpertLayout) -> Scores:
    """What offline pruning tools do: the whole model in memory, then score it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt.directory, dtype=torch.float32)
    scores: Scores = {}
    with torch.no_grad():
        for layer in layout.layers:
            experts = model.model.layers[layer].mlp.experts  # fused [E, ...] in memory
            scores[layer] = [aimer_score_of([experts.gate_up_proj[e], experts.down_proj[e]])
                             for e in range(layout.num_experts)]
    del model
    gc.collect()
    return scores


PATHS: dict[str, Callable[[Checkpoint, ExpertLayout], Scores]] = {
    "aimer_score_checkpoint": aimer,
    "plain_chunked_read": plain_read,
    "transformers_dense_load_then_score": dense_then_score,
}


def run(model: Path, repeats: int = 2, threads: int = 1) -> Result:
    """`threads`: torch intra-op threads, 1 as in vLLM's CPU worker (bound to one core),
    which also keeps the figures steady when other jobs share the two cores."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(model, repeats)
    finally:
        torch.set_num_threads(previous_threads)


def _run(model: Path, repeats: int) -> Result:
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    expert_bytes = sum(st.info.nbytes for layer in layout.layers for st in layout.scored[layer])
    seconds: dict[str, list[float]] = {name: [] for name in PATHS}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in PATHS}
    scores: dict[str, Scores] = {}
    aimer_score_of([torch.ones(8)])  # first-call set-up of the float64 kernels, untimed
    # Interleaved: cold (pages evicted from the page cache first), then warm.
    for attempt in range(repeats):
        for name, path in PATHS.items():
            if attempt == 0:
                evict_page_cache(shard_files(model))
            start, cpu = time.perf_counter(), time.process_time()
            scores[name] = path(ckpt, layout)
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu)

    # The dense path must compute the very scores the loader uses.
    diff = max(abs(a - b) for layer in layout.layers for a, b in
               zip(scores["aimer_score_checkpoint"][layer],
                   scores["transformers_dense_load_then_score"][layer]))
    if diff > 1e-9:
        raise AssertionError(f"dense-path scores differ from score_checkpoint by {diff}")

    gbps = {name: [expert_bytes / s / 1e9 for s in secs] for name, secs in seconds.items()}
    a, p, d = (seconds[n] for n in PATHS)
    ca, cp, cd = (cpu_seconds[n] for n in PATHS)
    figures = []
    for i, label in enumerate(("cold", "warm")[:repeats]):
        vs_read = p[i] / a[i]
        vs_dense = d[i] / a[i]
        figures.append(Figure(
            f"1. scoring vs plain chunked read ({label})", ">= 0.8x", vs_read, vs_read >= 0.8,
            f"aimer {gbps['aimer_score_checkpoint'][i]:.2f} GB/s, plain read "
            f"{gbps['plain_chunked_read'][i]:.2f} GB/s ({expert_bytes / 1e9:.2f} GB of experts); "
            f"CPU s: aimer {ca[i]:.2f}, plain read {cp[i]:.2f}"))
        figures.append(Figure(
            f"1. scoring vs dense load then score ({label})", ">= 10x faster", vs_dense,
            vs_dense >= 10,
            f"aimer {a[i]:.2f} s, transformers from_pretrained + score {d[i]:.2f} s; CPU s: "
            f"aimer {ca[i]:.2f}, dense {cd[i]:.2f}"))
    method = (
        f"Each path reads the same {len(layout.layers) * layout.num_experts} experts' gate/up/down "
        f"weights ({expert_bytes / 1e9:.2f} GB, float32, {len(ckpt.files)} shards). The paths run "
        "interleaved, twice: before the first (cold) run of each path the shards' pages are "
        "evicted from the page cache (fsync + posix_fadvise DONTNEED), the second (warm) run "
        "reads them from memory. Throughput = expert bytes / wall time. The plain read uses the "
        f"same files, tensors, safe_open + get_slice and chunk size ({CHUNK_ELEMENTS} elements) "
        "as score_checkpoint and sums each chunk. The dense path is "
        "AutoModelForCausalLM.from_pretrained(float32) followed by aimer_score_of on each "
        "expert's in-memory parameters; its scores are checked equal to score_checkpoint's "
        f"(max |diff| {diff:.1e}). torch threads: {torch.get_num_threads()}. 'CPU s': "
        "this process's user + system CPU time for the path, which other jobs on the "
        "machine hardly change.")
    raw = {"expert_bytes": expert_bytes, "seconds": seconds, "cpu_seconds": cpu_seconds,
           "gb_per_s": gbps,
           "max_score_diff_dense_vs_aimer": diff, "chunk_elements": CHUNK_ELEMENTS,
           "torch_threads": torch.get_num_threads()}
    return Result("scoring", figures, method, raw)
