"""`make gpu-check`: what the CPU suite cannot show, on an NVIDIA GPU with vLLM.

Builds its checkpoints here (nothing downloaded), runs each vLLM engine in its own
process (benchmarks/gpu_probe.py) and prints one table; results go to
benchmarks/results/gpu-check.json. About 5-8 minutes on one H100/H200.

1. Fidelity in bf16: the generated moe-small (4 layers x 32 experts, top-4) pruned
   at 0.5 with `--load-format aimer` against stock vLLM serving the test suite's own
   slice of the checkpoint with the same plan (tests/helpers/reference.py). Same
   weights, same kernels: the logprobs may differ only where bf16 batches are
   reduced in another order, so the bound is 0.05 nats (a few bf16 steps of a logit
   around 2-8); the unpruned model must differ by far more.
2. The pruned engine holds K expert rows per layer, on the GPU.
3. Memory: moe-3g (3.1 GiB float32, served in bf16) dense and pruned at 0.5; the
   device memory vLLM measured for loading must drop by the pruned experts' bf16
   bytes (within 2 %).
4. Time to ready and generation throughput, pruned / dense (moe-3g).
5. Block FP8 (compute capability >= 8.9): moe-small with attention and experts in
   128x128-block FP8 (DeepSeek-V3 / Qwen3-FP8 layout), pruned vs the sliced FP8
   checkpoint, as in 1 (bound 0.1: FP8 activations are quantized per token group).
6. With two GPUs: tensor parallelism 2 and expert parallelism 2 against step 1's
   single-GPU pruned logprobs (bound 0.05).

Step 0 needs only torch with CUDA and runs first, so it also runs where vLLM is
missing (the script then stops after it, saying so): GPU scoring throughput on
moe-3g with a warm page cache, next to CPU scoring on every core and a plain chunked
read, and its scores against the CPU's (1e-6 relative). benchmarks/device_scoring.py
measures the same with cold caches, bf16 and one thread as well.

On a machine without a CUDA GPU it stops at once with "needs a CUDA GPU".
`--cpu-smoke` runs step 1 on a tiny model on vLLM's CPU build in float32 (the tests
use it to keep this script working; its figures say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_aimer.units import human_bytes

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "work" / "gpu-check"
RESULT = REPO / "benchmarks" / "results" / "gpu-check.json"
PROMPTS = [[5, 17, 42, 9, 100, 33, 71, 8], [200, 150, 77, 12], [3, 3, 3, 90, 14], [61, 2, 250]]
BF16_BOUND = 0.05
FP8_BOUND = 0.1
MEMORY_BOUND = 0.02


def cuda_devices() -> int:
    """CUDA GPUs torch sees (0 without a CUDA build of torch or a driver)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def probe(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run one engine (benchmarks/gpu_probe.py) and return what it printed."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    log.write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("GPU-PROBE "):
            return json.loads(line[len("GPU-PROBE "):])
    raise RuntimeError(f"engine failed (rc={proc.returncode}); log: {log}\n{proc.stderr[-3000:]}")


def worst(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    """Largest |difference| of a token's logprob over the tokens both top-20s hold."""
    return max(abs(x[t] - y[t]) for x, y in zip(a, b) for t in x if t in y)


class Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, check: str, measured: str, bound: str, ok: bool | None) -> None:
        self.rows.append({"check": check, "measured": measured, "bound": bound,
                          "ok": ok})
        mark = {True: "ok", False: "FAIL", None: "-"}[ok]
        print(f"| {check} | {measured} | {bound} | {mark} |", flush=True)


def sliced_like(model: Path, plan_dir: Path, out: Path) -> Path:
    """The tests' own slice of `model` with the plan the pruned engine wrote."""
    sys.path.insert(0, str(REPO))
    from tests.helpers.reference import slice_checkpoint

    pruned = json.loads((plan_dir / "pruned_experts.json").read_text())
    return slice_checkpoint(model, out, {int(k): v for k, v in pruned.items()})


def fidelity(table: Table, name: str, model: Path, work: Path, base: dict[str, Any],
             bound: float) -> dict[str, Any]:
    slug = model.name
    plan_dir = work / f"{slug}-plan"
    pruned = probe({**base, "model": str(model), "prompts": PROMPTS,
                    "extra": {"prune_ratio": 0.5, "plan_cache": False,
                              "plan_out": str(plan_dir)}}, work / f"{slug}-pruned.log")
    ref_dir = sliced_like(model, plan_dir, work / f"{slug}-sliced")
    stock = probe({**base, "model": str(ref_dir), "prompts": PROMPTS},
                  work / f"{slug}-stock.log")
    dense = probe({**base, "model": str(model), "prompts": PROMPTS}, work / f"{slug}-dense.log")
    d, u = worst(pruned["logprobs"], stock["logprobs"]), worst(dense["logprobs"], stock["logprobs"])
    table.add(f"{name}: max |d logprob| pruned vs stock vLLM on the sliced checkpoint",
              f"{d:.2e} (unpruned: {u:.2f})", f"<= {bound}", d <= bound < u)
    rows = sorted({tuple(v) for v in pruned["rows"][0].values()})
    expected = sorted({tuple(v) for v in stock["rows"][0].values()})
    table.add(f"{name}: expert rows and device per MoE layer (pruned)",
              ", ".join(f"{r} on {dev}" for r, dev in rows), f"= stock's {expected}",
              rows == expected)
    return pruned


def gpu_scoring(table: Table, model: Path, device: str = "cuda") -> None:
    """Step 0: GPU scoring throughput (warm page cache, best of 2) next to CPU scoring
    on every core and a plain chunked read; GPU scores equal CPU scores within 1e-6.
    (device "cpu": the same steps with CPU scoring twice, how the tests run it.)"""
    import torch

    from benchmarks.checkpoints import warm_page_cache, shard_files
    from benchmarks.plain_read import plain_read
    from vllm_aimer.checkpoint import open_checkpoint
    from vllm_aimer.layout import expert_layout
    from vllm_aimer.scoring import score_checkpoint
    from vllm_aimer.shards import usable_cpus

    if device != "cpu":
        torch.zeros(1, device=device)  # the CUDA context exists in a vLLM worker already
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    cores = usable_cpus()
    warm_page_cache(shard_files(model))
    best: dict[str, float] = {}
    results: dict[str, Any] = {}
    for _ in range(2):
        for name, fn in (("plain", lambda: plain_read(model)),
                         ("cpu", lambda: score_checkpoint(ckpt, layout, progress=False,
                                                          threads=cores)),
                         ("gpu", lambda: score_checkpoint(ckpt, layout, progress=False,
                                                          threads=cores, device=device))):
            t = time.perf_counter()
            results[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    gb = results["cpu"].bytes_read / 1e9
    table.add(f"{model.name}: GPU scoring throughput (warm page cache)",
              f"{gb / best['gpu']:.2f} GB/s = {best['plain'] / best['gpu']:.2f}x plain read "
              f"({gb / best['plain']:.2f} GB/s); CPU scoring on {cores} cores "
              f"{gb / best['cpu']:.2f} GB/s", ">= 0.8x plain read",
              best["plain"] / best["gpu"] >= 0.8)
    diff = max(abs(a - b) / b for layer in layout.layers
               for a, b in zip(results["gpu"].scores[layer], results["cpu"].scores[layer]))
    table.add(f"{model.name}: GPU scores vs CPU scores, max relative difference", f"{diff:.1e}",
              "<= 1e-6", diff <= 1e-6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="step 1 only, on vLLM's CPU build in float32 (script test)")
    ap.add_argument("--out", type=Path, default=RESULT, help="result JSON")
    args = ap.parse_args(argv)
    gpus = 0 if args.cpu_smoke else cuda_devices()
    if not gpus and not args.cpu_smoke:
        print("gpu-check needs a CUDA GPU (torch.cuda finds none here); nothing was run. "
              "Run `make gpu-check` on a machine with an NVIDIA GPU and vLLM built for CUDA.",
              file=sys.stderr)
        return 2
    from benchmarks.checkpoints import FULL, QUICK, build_checkpoint

    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    table = Table()
    print("| check | measured | bound | ok |\n|---|---|---|---|", flush=True)
    if not args.cpu_smoke:
        gpu_scoring(table, build_checkpoint(FULL, WORK / "moe-3g"))
    try:
        import vllm
    except ImportError:
        print("gpu-check needs vLLM (pip install vllm, the CUDA build) next to vllm-aimer "
              "for the engine checks; only step 0 (GPU scoring) was run.", file=sys.stderr)
        _finish(table, args.out, started, {"mode": "gpu, no vLLM"})
        return 2
    from vllm_aimer.testing.tiny import quantize_experts_fp8

    if args.cpu_smoke:
        from vllm_aimer.testing.tiny import build_tiny_moe

        tiny = WORK / "tiny"
        if not (tiny / "config.json").is_file():
            build_tiny_moe(tiny, "qwen3_moe")
        fidelity(table, "tiny float32 (CPU smoke)", tiny, WORK, {"dtype": "float32"}, 1e-3)
        return _finish(table, args.out, started, {"mode": "cpu-smoke"})
    small = build_checkpoint(QUICK, WORK / "moe-small")

    import torch

    capability = torch.cuda.get_device_capability(0)
    context = {"mode": "gpu", "gpus": gpus, "device": torch.cuda.get_device_name(0),
               "capability": list(capability), "torch": torch.__version__,
               "vllm": vllm.__version__}
    half = {"dtype": "bfloat16", "gpu_memory_utilization": 0.4}
    single = fidelity(table, "moe-small bf16", small, WORK, half, BF16_BOUND)

    big = build_checkpoint(FULL, WORK / "moe-3g")
    dense = probe({"model": str(big), "prompts": PROMPTS[:1], "throughput": [64, 128],
                   "gpu_memory_utilization": 0.8}, WORK / "moe-3g-dense.log")
    pruned = probe({"model": str(big), "prompts": PROMPTS[:1], "throughput": [64, 128],
                    "gpu_memory_utilization": 0.8,
                    "extra": {"prune_ratio": 0.5, "plan_cache": False}},
                   WORK / "moe-3g-pruned.log")
    saved = dense["load_memory"][0] - pruned["load_memory"][0]
    want = FULL.expert_bytes // 2 // 2  # half the experts, in bf16 (2 of float32's 4 bytes)
    table.add("moe-3g: device memory for loading, dense - pruned (bf16)",
              f"{human_bytes(saved, 'GiB', 3)} (dense "
              f"{human_bytes(dense['load_memory'][0], 'GiB')})",
              f"pruned experts {human_bytes(want, 'GiB', 3)} +-{MEMORY_BOUND:.0%}",
              abs(saved - want) <= MEMORY_BOUND * want)
    table.add("moe-3g: time to ready, pruned / dense (first start, scoring included)",
              f"{pruned['ready_seconds'] / dense['ready_seconds']:.2f} "
              f"({pruned['ready_seconds']:.1f} s / {dense['ready_seconds']:.1f} s)", "-", None)
    table.add("moe-3g: generation throughput, pruned / dense (64 x 128 tokens)",
              f"{pruned['tokens_per_s'] / dense['tokens_per_s']:.2f} "
              f"({pruned['tokens_per_s']:.0f} / {dense['tokens_per_s']:.0f} tok/s)", "-", None)

    if capability >= (8, 9):
        fp8 = WORK / "moe-small-fp8"
        if not (fp8 / "config.json").is_file():
            subprocess.run(["cp", "-r", str(small), str(fp8)], check=True)
            quantize_experts_fp8(fp8, (128, 128), also=r"\.self_attn\.[qkvo]_proj\.weight$",
                                 ignored_layers=[f"model.layers.{i}.mlp.gate"
                                                 for i in range(QUICK.layers)])
        fidelity(table, "moe-small block-FP8", fp8, WORK, half, FP8_BOUND)
    else:
        table.add("block FP8", f"skipped: compute capability {capability} < 8.9", "-", None)

    if gpus >= 2:
        for name, engine in (("TP=2", {"tensor_parallel_size": 2}),
                             ("EP=2", {"tensor_parallel_size": 2,
                                       "enable_expert_parallel": True})):
            got = probe({**half, "model": str(small), "prompts": PROMPTS, "engine": engine,
                         "extra": {"prune_ratio": 0.5, "plan_cache": False}},
                        WORK / f"moe-small-{name}.log")
            d = worst(got["logprobs"], single["logprobs"])
            table.add(f"moe-small bf16 {name}: max |d logprob| vs one GPU", f"{d:.2e}",
                      f"<= {BF16_BOUND}", d <= BF16_BOUND)
    else:
        table.add("TP=2 / EP=2", "skipped: one GPU", "-", None)
    return _finish(table, args.out, started, context)


def _finish(table: Table, out: Path, started: float, context: dict[str, Any]) -> int:
    seconds = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**context, "seconds": round(seconds, 1), "rows": table.rows},
                              indent=1) + "\n")
    failed = [r["check"] for r in table.rows if r["ok"] is False]
    print(f"\n{len(table.rows)} checks in {seconds:.0f} s -> {out}"
          + (f"; FAILED: {'; '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
