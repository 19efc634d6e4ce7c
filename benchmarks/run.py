"""`make bench`: every benchmark on generated checkpoints, one JSON per benchmark and a
summary.md in benchmarks/results/ (with --quick: a smoke run on a small checkpoint,
results in benchmarks/work/results-quick/).

    .venv/bin/python -m benchmarks.run [--quick] [--keep] [--only scoring,memory,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import (bench_export, bench_generation, bench_memory, bench_scoring,
                        bench_startup)
from benchmarks.common import (BF16, FULL, GIB, QUICK, QUICK_BF16, REPO, WORK, Figure, Result,
                               build_checkpoint, machine_info, write_result)

NAMES = ("scoring", "memory", "startup", "generation", "export")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small checkpoint, fewer repeats")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--only", default=",".join(NAMES),
                    help="comma-separated subset of " + ", ".join(NAMES))
    ap.add_argument("--out", type=Path, help="results directory")
    args = ap.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(only) - set(NAMES):
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {NAMES}")
    spec = QUICK if args.quick else FULL
    bf16_spec = QUICK_BF16 if args.quick else BF16
    default_out = WORK / "results-quick" if args.quick else REPO / "benchmarks" / "results"
    out = args.out.resolve() if args.out else default_out
    started = time.perf_counter()

    print(f"generating {spec.name} ({spec.total_bytes / GIB:.2f} GiB, float32) ...", flush=True)
    t = time.perf_counter()
    model = build_checkpoint(spec, WORK / f"ckpt-{spec.name}")
    tiny = build_checkpoint(spec.without_experts(), WORK / f"ckpt-{spec.without_experts().name}")
    # The scoring benchmark's bf16 model (served by nothing: no tokenizer).
    bf16 = (build_checkpoint(bf16_spec, WORK / f"ckpt-{bf16_spec.name}", tokenizer=False)
            if "scoring" in only else None)
    generation_seconds = time.perf_counter() - t
    context: dict[str, Any] = {
        "mode": "quick" if args.quick else "full", "machine": machine_info(),
        "model": {**asdict(spec), "total_bytes": spec.total_bytes,
                  "expert_bytes": spec.expert_bytes},
        "bf16_model": {**asdict(bf16_spec), "total_bytes": bf16_spec.total_bytes,
                       "expert_bytes": bf16_spec.expert_bytes},
    }

    runs: dict[str, Callable[[], Result]] = {
        "scoring": lambda: bench_scoring.run([model, bf16], WORK / "scoring",
                                             repeats=1 if args.quick else 2, cli_model=bf16),
        "memory": lambda: bench_memory.run(model, tiny, WORK / "servers" / "memory",
                                           (0.5,) if args.quick else (0.25, 0.5)),
        "startup": lambda: bench_startup.run(model, WORK / "servers" / "startup",
                                             repeats=1 if args.quick else 3),
        "generation": lambda: bench_generation.run(
            model, WORK / "servers" / "generation", concurrency=16,
            max_tokens=16 if args.quick else 128, rounds=1 if args.quick else 4),
        "export": lambda: bench_export.run(model, WORK / "export"),
    }
    # Server work dirs hold plan caches: start empty, so the first pruned start scores.
    shutil.rmtree(WORK / "servers", ignore_errors=True)
    failed = []
    for name in only:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        load_before = os.getloadavg()[0]
        try:
            result = runs[name]()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            (out / f"{name}.json").unlink(missing_ok=True)  # no stale figures in summary.md
            continue
        seconds = time.perf_counter() - t
        path = write_result(out, result, {**context, "seconds": round(seconds, 1),
                                          "load_average": [load_before, os.getloadavg()[0]]})
        for f in result.figures:
            print(f.row(), flush=True)
        print(f"   {seconds:.0f} s -> {os.path.relpath(path, REPO)}", flush=True)

    total = time.perf_counter() - started
    summary = write_summary(out, context, total, generation_seconds, failed)
    print(f"\nsummary: {os.path.relpath(summary, REPO)} ({total / 60:.1f} min in all)")
    if not args.keep:
        for d in (model, tiny, bf16):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def write_summary(out: Path, context: dict[str, Any], total: float, gen_seconds: float,
                  failed: list[str]) -> Path:
    """summary.md from the result files in `out` (so --only reruns keep the others)."""
    m, spec, b = context["machine"], context["model"], context["bf16_model"]
    lines = [
        "# vllm-aimer benchmarks", "",
        f"`make bench`{' --quick' if context['mode'] == 'quick' else ''}, {m['date']}, "
        f"git {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''}; this run {total / 60:.1f} min "
        f"(checkpoint generation {gen_seconds:.0f} s). Rerun: `make bench` (about 15-25 min), "
        "`make bench BENCH_ARGS=--quick` (small checkpoint, a few minutes).", "",
        "Each figure is a ratio of two things measured side by side in this run. The machine "
        "is shared: other jobs may run on its two cores (the 1-min load average before and "
        "after each benchmark is given under Method), so wall-clock figures use the best of "
        "several interleaved repeats, and the CPU seconds used are given next to them as a "
        "view that other jobs hardly change.", "",
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM, "
        f"{m['os']}; Python {m['python']}, vLLM {m['vllm']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, safetensors {m['safetensors']}.", "",
        f"Model: generated {spec['name']}, a random Qwen3-MoE ({spec['layers']} layers, "
        f"{spec['experts']} experts of hidden {spec['hidden']} x moe_intermediate "
        f"{spec['moe_intermediate']}, top-{spec['top_k']}, {spec['heads']} heads of "
        f"{spec['head_dim']}, vocab {spec['vocab']}), float32, "
        f"{spec['total_bytes'] / GIB:.2f} GiB of which routed experts "
        f"{spec['expert_bytes'] / GIB:.2f} GiB, shards of <= {spec['shard_bytes'] / GIB:.2f} GiB. "
        f"Scoring also uses {b['name']}: the same layers, {b['layers']} of them, in bfloat16, "
        f"{b['total_bytes'] / GIB:.2f} GiB ({b['total_bytes'] / 1e9:.2f} GB) of which routed "
        f"experts {b['expert_bytes'] / GIB:.2f} GiB.",
        "",
        "| figure | goal | measured ratio | met | raw numbers |",
        "|---|---|---|---|---|",
    ]
    results = []
    for name in NAMES:
        path = out / f"{name}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            results.append(data)
            lines += [Figure(**f).row() for f in data["figures"]]
    if failed:
        lines += ["", f"**Failed in this run** (see its output): {', '.join(failed)}."]
    lines += ["", "## Method", ""]
    for data in results:
        a, b = data["load_average"]
        when = data.get("machine", {})
        lines += [f"**{data['benchmark']}** ({data['seconds']:.0f} s; 1-min load average "
                  f"{a:.1f} before, {b:.1f} after; run {when.get('date', '?')}, git "
                  f"{when.get('git_commit', '?')}): {data['method']}", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
