"""One vLLM engine for `make gpu-check`, in its own process (vLLM does not free an
engine in-process); prints `GPU-PROBE {json}` with what gpu_check.py compares.

    python -m benchmarks.gpu_probe '{"model": DIR, "extra": {...} | null, ...}'
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def expert_rows(model) -> dict[str, Any]:
    """Leading dimension and device of every layer's fused expert weights."""
    return {name: [int(p.shape[0]), str(p.device)] for name, p in model.named_parameters()
            if name.endswith("experts.w13_weight")}


def weight_bytes(model) -> int:
    """Bytes of every parameter the worker holds (what pruning shrinks)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load_memory(worker) -> int:
    """Device memory vLLM measured around model loading (torch.cuda.memory_allocated
    delta, GPUModelRunner.model_memory_usage); 0 on the CPU backend."""
    return int(getattr(worker.model_runner, "model_memory_usage", 0) or 0)


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model / collective_rpc
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(model=spec["model"], dtype=spec.get("dtype", "bfloat16"),
                                  max_model_len=512, enforce_eager=True, max_logprobs=20, seed=0)
    if "gpu_memory_utilization" in spec:
        kwargs["gpu_memory_utilization"] = spec["gpu_memory_utilization"]
    if spec.get("extra") is not None:
        kwargs.update(load_format="aimer", model_loader_extra_config=spec["extra"])
    kwargs.update(spec.get("engine", {}))
    start = time.perf_counter()
    llm = LLM(**kwargs)
    ready = time.perf_counter() - start
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, logprobs=20))
    logprobs = [{str(t): lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outs]
    result: dict[str, Any] = {
        "ready_seconds": ready, "logprobs": logprobs,
        "rows": llm.apply_model(expert_rows), "weight_bytes": llm.apply_model(weight_bytes),
        "load_memory": llm.collective_rpc(load_memory)}
    if spec.get("throughput"):
        n, tokens = spec["throughput"]
        batch = [{"prompt_token_ids": [(7 * i + j) % 200 + 3 for j in range(16)]} for i in range(n)]
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        llm.generate(batch[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        done = llm.generate(batch, params)
        seconds = time.perf_counter() - start
        result["tokens_per_s"] = sum(len(o.outputs[0].token_ids) for o in done) / seconds
    print("GPU-PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
