"""Figure 1: scoring throughput, side by side in one run, on a float32 and a bf16
checkpoint of 3+ GB, with a cold and a warm page cache:

- `score_checkpoint` (what the loader and `vllm-aimer score` run) next to a plain
  chunked read of the same expert bytes into a float32 buffer (benchmarks/plain_read.py);
- the whole `vllm-aimer score` process next to a plain chunked-read process (bf16);
- transformers `from_pretrained` of the dense model followed by scoring its in-memory
  expert parameters (what offline pruning tools do).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.checkpoints import (evict_page_cache, resident_fraction, shard_files,
                                    warm_page_cache)
from benchmarks.common import REPO, Figure, Result
from benchmarks.dense_baseline import dense_then_score, warm_up
from benchmarks.plain_read import plain_read
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.layout import expert_layout
from vllm_aimer.scoring import score_checkpoint
from vllm_aimer.shards import default_threads

STATES = ("cold", "warm")


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def _process(argv: list[str]) -> float:
    """Wall time of a child process, start-up included."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _prepare(state: str, files: list[Path]) -> float | None:
    (evict_page_cache if state == "cold" else warm_page_cache)(files)
    return resident_fraction(files)


def measure(model: Path, out_dir: Path, repeats: int, threads: int, cli: bool) -> dict[str, Any]:
    """Best (lowest) wall time of each path per page-cache state, over `repeats`
    interleaved rounds; each path gets the cache state it is measured in just before."""
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    files = shard_files(model)
    expert_bytes = sum(st.info.nbytes for layer in layout.layers for st in layout.scored[layer])
    paths: dict[str, Callable[[], Any]] = {
        "plain_read": lambda: plain_read(model),
        f"plain_read_{threads}_threads": lambda: plain_read(model, threads),
        "aimer_1_thread": lambda: score_checkpoint(ckpt, layout, progress=False, threads=1),
        "aimer": lambda: score_checkpoint(ckpt, layout, progress=False, threads=threads),
        "dense": lambda: dense_then_score(model, layout.layers, layout.num_experts),
    }
    processes: dict[str, list[str]] = {}
    if cli:
        processes = {
            "plain_read_process": [sys.executable, "-m", "benchmarks.plain_read", str(model)],
            "cli_process": [str(Path(sys.executable).with_name("vllm-aimer")), "score",
                            str(model), "--ratio", "0.5", "--quiet", "--output",
                            str(out_dir / "cli-score")],
        }
    seconds: dict[str, dict[str, list[float]]] = {s: {} for s in STATES}
    cpu: dict[str, dict[str, list[float]]] = {s: {} for s in STATES}
    resident: dict[str, list[float | None]] = {s: [] for s in STATES}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for state in STATES:
            for name, fn in paths.items():
                resident[state].append(_prepare(state, files))
                wall, used, results[name] = _timed(fn)
                seconds[state].setdefault(name, []).append(wall)
                cpu[state].setdefault(name, []).append(used)
            for name, argv in processes.items():
                resident[state].append(_prepare(state, files))
                seconds[state].setdefault(name, []).append(_process(argv))
    aimer, dense, single = (results[k] for k in ("aimer", "dense", "aimer_1_thread"))
    # The dense path and every thread count must give the scores the loader uses.
    diff = max(abs(a - b) / b for layer in layout.layers
               for a, b in zip(aimer.scores[layer], dense[layer]))
    if diff > 1e-6:
        raise AssertionError(f"dense-path scores differ from score_checkpoint by {diff:.1e}")
    if single.scores != aimer.scores:
        raise AssertionError("scores differ between 1 and %d threads" % threads)
    return {"model": model.name, "dtype": ckpt.config.get("torch_dtype"),
            "shards": len(ckpt.files), "expert_bytes": expert_bytes,
            "experts": len(layout.layers) * layout.num_experts, "threads": threads,
            "seconds": seconds, "cpu_seconds": cpu, "resident_before": resident,
            "max_rel_score_diff_dense": diff}


def run(models: list[Path], out_dir: Path, repeats: int = 2, cli_model: Path | None = None,
        threads: int | None = None) -> Result:
    threads = threads or default_threads()
    warm_up()
    runs = [measure(m, out_dir, repeats, threads, cli=(m == cli_model)) for m in models]
    figures: list[Figure] = []
    for r in runs:
        gb = r["expert_bytes"] / 1e9
        for state in STATES:
            best = {k: min(v) for k, v in r["seconds"][state].items()}
            c = {k: min(v) for k, v in r["cpu_seconds"][state].items()}
            rate = {k: gb / v for k, v in best.items()}
            label = f"{r['dtype']}, {state}"
            vs_read = best["plain_read"] / best["aimer"]
            figures.append(Figure(
                f"1. scoring vs plain chunked read ({label})", ">= 0.8x", vs_read,
                vs_read >= 0.8,
                f"aimer {rate['aimer']:.2f} GB/s ({threads} threads; 1 thread "
                f"{rate['aimer_1_thread']:.2f}), plain read {rate['plain_read']:.2f} GB/s "
                f"(1 thread; {threads} threads {rate[f'plain_read_{threads}_threads']:.2f}); "
                f"{gb:.2f} GB of experts; CPU s: aimer {c['aimer']:.2f}, plain read "
                f"{c['plain_read']:.2f}"))
            vs_dense = best["dense"] / best["aimer"]
            figures.append(Figure(
                f"1. scoring vs dense load then score ({label})", ">= 10x faster", vs_dense,
                vs_dense >= 10,
                f"aimer {best['aimer']:.2f} s, transformers from_pretrained + score "
                f"{best['dense']:.2f} s; CPU s: aimer {c['aimer']:.2f}, dense {c['dense']:.2f}"))
            if "cli_process" in best:
                vs_proc = best["plain_read_process"] / best["cli_process"]
                figures.append(Figure(
                    f"1. whole `vllm-aimer score` process vs plain chunked-read process "
                    f"({label})", ">= 0.8x", vs_proc, vs_proc >= 0.8,
                    f"vllm-aimer score {best['cli_process']:.2f} s "
                    f"({gb / best['cli_process']:.2f} GB/s), plain read process "
                    f"{best['plain_read_process']:.2f} s ({gb / best['plain_read_process']:.2f} "
                    "GB/s), start-up included"))
    desc = "; ".join(f"{r['model']} ({r['dtype']}, {r['expert_bytes'] / 1e9:.2f} GB of experts "
                     f"in {r['experts']} experts, {r['shards']} shards)" for r in runs)
    resident = {r["model"]: {s: [x for x in r["resident_before"][s] if x is not None]
                             for s in STATES} for r in runs}
    cold_max = max((max(v["cold"], default=0.0) for v in resident.values()), default=0.0)
    warm_min = min((min(v["warm"], default=1.0) for v in resident.values()), default=1.0)
    method = (
        f"Models: {desc}. Each path reads the same routed experts' gate/up/down weights. "
        f"Rounds: {repeats}; in each, every path runs once cold (the shards' pages evicted "
        "just before: fsync + posix_fadvise DONTNEED; mincore found at most "
        f"{cold_max:.0%} of the pages still cached) and once warm (the shards read once "
        f"just before; at least {warm_min:.0%} cached); figures compare the best time of "
        "each path. Throughput = expert bytes / wall time. aimer = score_checkpoint (the "
        "loader's and `vllm-aimer score`'s code): shards memory-mapped, bf16 widened by "
        "a 16-bit shift of a uint16 view, |w| and w^2 summed by two BLAS dot products "
        f"per 256 values, {threads} threads (default: one per CPU, at least 4, since a "
        "cold cache is read through page faults and more in flight read faster). Plain "
        "read = benchmarks/plain_read.py: 1 MiB preads into a reused buffer, bf16 widened "
        "into a float32 buffer, one thread (also shown with as many threads as aimer). "
        "The whole-process figure runs `vllm-aimer score MODEL --ratio 0.5 --quiet` "
        "(scores, plan files) against `python -m benchmarks.plain_read MODEL`, both as "
        "child processes timed from spawn to exit. The dense path is "
        "AutoModelForCausalLM.from_pretrained in the checkpoint's dtype, then "
        "aimer_score_of on each expert's in-memory parameters; its scores equal "
        "score_checkpoint's within "
        f"{max(r['max_rel_score_diff_dense'] for r in runs):.1e} relative, and scores "
        "with 1 thread equal those with all threads exactly. 'CPU s': this process's "
        "user + system CPU time for the path.")
    return Result("scoring", figures, method, {"runs": runs})
