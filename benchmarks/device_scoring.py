"""Scoring throughput on a GPU machine, side by side: plain chunked read, CPU scoring
with 1 thread and with every core, GPU scoring; cold and warm page cache.

    PYTHONPATH=. python3 -m benchmarks.device_scoring --out OUT [--size 4] [--fp32-size 3]

Needs torch, numpy and safetensors only (no vLLM, no pydantic), so it runs on a GPU
machine where vLLM is not installed. It generates a bf16 checkpoint of --size GB
(and, while its --budget allows, a float32 one of --fp32-size GB) under --dir, then
per checkpoint and page-cache state times each path (best of --repeats), with
transformers from_pretrained + scoring (what offline tools do) as well unless
--no-dense, checks that the GPU's (and the dense path's) scores equal the CPU's within
1e-6 relative and that 1 thread and all threads give identical scores, and writes OUT/device_scoring.json plus a table on
stdout. Without a CUDA device the GPU path is skipped and the reason recorded.

Cold = the shards' pages evicted with posix_fadvise(DONTNEED) just before; the share
of pages still cached (mincore) is recorded, since on tmpfs or some filesystems the
eviction has no effect (then "cold" is warm, and the JSON says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.checkpoints import (BF16, FULL, QUICK, ModelSpec, build_checkpoint,
                                    evict_page_cache, resident_fraction, shard_files,
                                    warm_page_cache)
from benchmarks.dense_baseline import dense_then_score, warm_up
from benchmarks.plain_read import plain_read
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.layout import expert_layout
from vllm_aimer.scoring import score_checkpoint
from vllm_aimer.shards import usable_cpus

SCORE_REL = 1e-6


def spec_for(size_gb: float, dtype: str) -> ModelSpec:
    """A generated Qwen3-MoE of about `size_gb` GB of `dtype` experts: the benchmark's
    layer shape (64 experts of 1024 x 512), or below 1 GB the quick model's (32 of
    512 x 256) so that small runs stay quick."""
    base = (BF16 if dtype == "bfloat16" else FULL) if size_gb >= 1 else QUICK
    base = replace(base, dtype=dtype)
    per_layer = base.expert_bytes // base.layers
    layers = max(1, round(size_gb * 1e9 / per_layer))
    return replace(base, name=f"device-{dtype}-{layers}l", layers=layers)


def gpu_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    torch.zeros(1, device="cuda")  # CUDA context up front, as in a vLLM worker
    return True, torch.cuda.get_device_name(0)


def measure(model: Path, repeats: int, gpu: bool, deadline: float,
            dense: bool = True) -> dict[str, Any]:
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    files = shard_files(model)
    expert_bytes = sum(st.info.nbytes for layer in layout.layers for st in layout.scored[layer])
    cores = usable_cpus()
    paths = {
        "plain_read_1_thread": lambda: plain_read(model),
        f"plain_read_{cores}_threads": lambda: plain_read(model, cores),
        "cpu_scoring_1_thread": lambda: score_checkpoint(ckpt, layout, progress=False,
                                                         threads=1),
        f"cpu_scoring_{cores}_threads": lambda: score_checkpoint(ckpt, layout, progress=False,
                                                                 threads=cores),
    }
    if gpu:
        paths["gpu_scoring"] = lambda: score_checkpoint(ckpt, layout, progress=False,
                                                        threads=cores, device="cuda")
    if dense:
        paths["transformers_dense_then_score"] = lambda: dense_then_score(
            model, layout.layers, layout.num_experts)
    seconds: dict[str, dict[str, list[float]]] = {"cold": {}, "warm": {}}
    resident: dict[str, list[float | None]] = {"cold": [], "warm": []}
    scores: dict[str, Any] = {}
    skipped: list[str] = []
    failed: dict[str, str] = {}
    for round_ in range(repeats):
        for state in ("cold", "warm"):
            for name, fn in paths.items():
                if round_ and time.perf_counter() > deadline:
                    skipped.append(f"round {round_ + 1} {state} {name}: out of time")
                    continue
                if name in failed:
                    continue
                (evict_page_cache if state == "cold" else warm_page_cache)(files)
                resident[state].append(resident_fraction(files))
                start = time.perf_counter()
                try:
                    out = fn()
                except Exception as e:  # keep the other paths' figures; say what broke
                    failed[name] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                    continue
                seconds[state].setdefault(name, []).append(time.perf_counter() - start)
                scores[name] = getattr(out, "scores", out)
    one, many = scores["cpu_scoring_1_thread"], scores[f"cpu_scoring_{cores}_threads"]
    checks: dict[str, Any] = {"cpu_1_thread_equals_all_threads": one == many}
    checks.update({f"{name}_ran": False for name in failed})
    for name, check in (("gpu_scoring", "gpu"), ("transformers_dense_then_score", "dense")):
        if name in scores:
            diff = max(abs(a - b) / b for layer in layout.layers
                       for a, b in zip(scores[name][layer], many[layer]))
            checks[f"{check}_vs_cpu_max_rel_diff"] = diff
            checks[f"{check}_equals_cpu_within_1e-6"] = diff <= SCORE_REL
    best = {s: {k: min(v) for k, v in d.items()} for s, d in seconds.items()}
    return {"model": model.name, "dtype": ckpt.config.get("torch_dtype"),
            "expert_bytes": expert_bytes, "experts": len(layout.layers) * layout.num_experts,
            "shards": len(files), "cores": cores, "seconds": seconds, "best_seconds": best,
            "gb_per_s": {s: {k: expert_bytes / v / 1e9 for k, v in d.items()}
                         for s, d in best.items()},
            "resident_before": resident, "checks": checks, "skipped": skipped,
            "failed": failed}


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| checkpoint | cache | path | GB/s | vs plain read (1 thread) "
             "| transformers load + score time / this |", "|---|---|---|---|---|---|"]
    for r in runs:
        for state, rates in r["gb_per_s"].items():
            res = [x for x in r["resident_before"][state] if x is not None]
            cached = f" ({max(res):.0%} cached before)" if state == "cold" and res else ""
            base = rates.get("plain_read_1_thread")
            dense = rates.get("transformers_dense_then_score")
            for name, rate in rates.items():
                ratio = f"{rate / base:.2f}x" if base else "-"
                faster = (f"{rate / dense:.1f}x" if dense and "scoring" in name
                          and "transformers" not in name else "-")
                lines.append(f"| {r['model']} ({r['expert_bytes'] / 1e9:.2f} GB experts) "
                             f"| {state}{cached} | {name} | {rate:.2f} | {ratio} | {faster} |")
    return "\n".join(lines)


def write(out: Path, context: dict[str, Any], started: float, generation: dict[str, Any],
          runs: list[dict[str, Any]]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    result = {**context, "seconds": round(time.perf_counter() - started, 1),
              "checkpoints": generation, "runs": runs}
    (out / "device_scoring.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for device_scoring.json")
    ap.add_argument("--size", type=float, default=4.0, help="bf16 checkpoint, GB of experts")
    ap.add_argument("--fp32-size", type=float, default=3.0,
                    help="float32 checkpoint, GB of experts (0: none)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/aimer-device-scoring"),
                    help="where the checkpoints are generated (removed afterwards "
                         "unless --keep)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds; later rounds and the float32 checkpoint are skipped "
                         "once past it")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-dense", action="store_true",
                    help="skip transformers from_pretrained + scoring (the offline tools' path)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget
    gpu, gpu_note = gpu_available()
    import numpy as np
    import torch

    context: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
        "gpu": gpu_note if gpu else None,
        "gpu_scoring": "measured" if gpu else f"skipped: {gpu_note}",
    }
    print(f"GPU scoring: {context['gpu_scoring']}; {usable_cpus()} usable CPUs", flush=True)
    if not args.no_dense:
        warm_up()
    runs, generation = [], {}
    wanted = [("bfloat16", args.size)] + ([("float32", args.fp32_size)] if args.fp32_size else [])
    for n, (dtype, size) in enumerate(wanted):
        if n and time.perf_counter() > started + args.budget / 2:
            context.setdefault("skipped", []).append(f"{dtype} checkpoint: out of time")
            continue
        spec = spec_for(size, dtype)
        t = time.perf_counter()
        model = build_checkpoint(spec, args.dir / spec.name, tokenizer=False)
        generation[spec.name] = {"seconds": round(time.perf_counter() - t, 1), **asdict(spec),
                                 "expert_bytes": spec.expert_bytes}
        print(f"generated {spec.name}: {spec.expert_bytes / 1e9:.2f} GB of {dtype} experts "
              f"in {generation[spec.name]['seconds']} s", flush=True)
        runs.append(measure(model, args.repeats, gpu, deadline, dense=not args.no_dense))
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
        write(args.out, context, started, generation, runs)  # kept if a later step fails
    result = write(args.out, context, started, generation, runs)
    print(table(runs))
    failed = [f"{r['model']}: {k}" for r in runs for k, v in r["checks"].items()
              if v is False]
    for r in runs:
        print(f"{r['model']}: checks {r['checks']}" + (f"; skipped {r['skipped']}"
                                                      if r["skipped"] else ""))
    print(f"{result['seconds']:.0f} s -> {args.out / 'device_scoring.json'}"
          + (f"; FAILED: {'; '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
