"""Figure 3: time to ready of `vllm serve` (start to /health 200): 50 % pruned vs stock
vLLM on the dense checkpoint, a second pruned start that finds its plan cached, and
that start again with vLLM's enable_multithread_load (num_threads 8, its default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import Figure, Result, aimer_args, serve, shard_files, warm_page_cache

RATIO = 0.5
THREADS = 8  # DefaultModelLoader.DEFAULT_NUM_THREADS


def start(model: Path, workdir: Path, args: list[str]) -> dict[str, Any]:
    with serve(model, workdir, args) as s:
        report = s.report()
        return {
            "ready_seconds": s.ready_seconds,
            "load_seconds": s.load_seconds,
            "cpu_seconds_to_ready": s.cpu_seconds_to_ready,
            "loading_weights_seconds": s.log_seconds("Loading weights took"),
            "init_engine_seconds": s.log_seconds(
                "init engine (profile, create kv cache, warmup model) took"),
            "source": report["source"] if report else "stock",
            "scoring_seconds": report["scoring_seconds"] if report else 0.0,
        }


def run(model: Path, work: Path, repeats: int) -> Result:
    warm_page_cache(shard_files(model))
    runs: dict[str, list[dict[str, Any]]] = {"stock": [], "pruned_first": [], "pruned_cached": [],
                                             "pruned_cached_multithread": []}
    for i in range(repeats):  # interleaved, so slow phases of a shared machine hit all kinds
        cache = work / f"plans-{i}"  # empty: the first pruned start scores and fills it
        runs["stock"].append(start(model, work / "stock", []))
        runs["pruned_first"].append(start(model, work / "pruned", aimer_args(RATIO, cache)))
        runs["pruned_cached"].append(start(model, work / "pruned", aimer_args(RATIO, cache)))
        runs["pruned_cached_multithread"].append(start(
            model, work / "pruned", aimer_args(RATIO, cache, enable_multithread_load=True,
                                               num_threads=THREADS)))
    for r in runs["pruned_first"]:
        assert r["source"] == "score", r
    for r in runs["pruned_cached"] + runs["pruned_cached_multithread"]:
        assert r["source"] == "cache", r
    from vllm_aimer.checkpoint import open_checkpoint
    from vllm_aimer.layout import expert_layout

    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    expert_bytes = sum(st.info.nbytes for layer in layout.layers for st in layout.scored[layer])

    best = {k: min(r["ready_seconds"] for r in v) for k, v in runs.items()}
    best_load = {k: min(r["load_seconds"] for r in v) for k, v in runs.items()}

    def times(key: str) -> str:
        return "/".join(f"{r['ready_seconds']:.1f}" for r in runs[key]) + " s"

    def loads(key: str) -> str:
        return "/".join(f"{r['loading_weights_seconds']:.1f}" for r in runs[key]) + " s"

    def phases(key: str) -> str:
        return "/".join(f"{r['load_seconds']:.2f}" for r in runs[key]) + " s"

    def cpu(key: str) -> str:
        return "/".join(f"{r['cpu_seconds_to_ready']:.0f}" for r in runs[key]) + " CPU s"

    first = best["pruned_first"] / best["stock"]
    cached = best["pruned_cached"] / best["pruned_first"]
    scoring = "/".join(f"{r['scoring_seconds']:.1f}" for r in runs["pruned_first"])
    scoring_rate = "/".join(f"{expert_bytes / r['scoring_seconds'] / 1e9:.1f}"
                            for r in runs["pruned_first"])
    threaded = best_load["pruned_cached_multithread"] / best_load["pruned_cached"]
    figures = [
        Figure(f"3. time to ready, {RATIO:.0%} pruned / stock dense", "<= 1.0x", first,
               first <= 1.0,
               f"pruned {times('pruned_first')} (scoring {scoring} s = {scoring_rate} GB/s "
               f"in the loader, loading weights "
               f"{loads('pruned_first')}; {cpu('pruned_first')}), stock {times('stock')} "
               f"(loading weights {loads('stock')}; {cpu('stock')})"),
        Figure(f"3. time to ready, {RATIO:.0%} pruned with cached plan / first pruned start",
               "< 1.0x", cached, cached < 1.0,
               f"cached {times('pruned_cached')} (loading weights {loads('pruned_cached')}; "
               f"{cpu('pruned_cached')}), first {times('pruned_first')}"),
        Figure(f"3. load phase in the worker, {RATIO:.0%} pruned / stock dense",
               "<= 1.0x", best_load["pruned_first"] / best_load["stock"],
               best_load["pruned_first"] <= best_load["stock"],
               f"pruned {phases('pruned_first')}, stock {phases('stock')}"),
        Figure("3. load phase in the worker, cached plan / first pruned start",
               "< 1.0x", best_load["pruned_cached"] / best_load["pruned_first"],
               best_load["pruned_cached"] < best_load["pruned_first"],
               f"cached {phases('pruned_cached')}, first {phases('pruned_first')}"),
        Figure(f"3. load phase in the worker, cached plan with enable_multithread_load "
               f"(num_threads {THREADS}) / without", "<= 1.0x", threaded, threaded <= 1.0,
               f"with {phases('pruned_cached_multithread')} (loading weights "
               f"{loads('pruned_cached_multithread')}), without {phases('pruned_cached')} "
               f"(loading weights {loads('pruned_cached')})"),
    ]
    method = (
        "Wall time from starting `vllm serve` (process spawn) to the first 200 from /health, "
        "polled every 0.1 s; --dtype float32 --enforce-eager --max-model-len 512, "
        "VLLM_CPU_KVCACHE_SPACE=1. The shards are read once before (warm page cache) so "
        f"that no start pays for cold disk reads the others do not. Rounds: {repeats}, each: "
        "stock vLLM (no --load-format), pruned with a new empty plan_cache dir (scores), "
        "pruned again with the same dir (plan from the cache), and once more with "
        f"enable_multithread_load and num_threads {THREADS} in --model-loader-extra-config "
        "(vLLM's options; the pruned stream then reads ahead with that many threads); the "
        "figures compare the best "
        "(lowest) time of each kind, the least disturbed by other jobs on the machine. "
        "'Loading weights' is vLLM's own log line. The load phase is the part of the start "
        "that pruning changes, timed from the arrival in the server log of the worker's "
        "'Starting to load model' line to its KV-cache line (the next one after the weights "
        "are loaded and repacked; log polled every 50 ms): model construction, scoring or "
        "the plan cache, reading and repacking the weights. The rest of a start (three "
        "Python processes importing vLLM and torch) is the same for all kinds and, on a "
        "shared 2-core machine, the noisiest part. 'CPU s': user + system CPU seconds the "
        "server's processes had used when it became ready, which other jobs on the machine "
        "hardly change. Scoring GB/s in the loader: routed expert bytes / the report's "
        "scoring_seconds.")
    return Result("startup", figures, method,
                  {"runs": runs, "best_seconds": best, "best_load_seconds": best_load})
