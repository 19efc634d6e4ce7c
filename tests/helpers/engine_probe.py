"""Runs one real vLLM engine (CPU, float32) and prints what the tests inspect, as JSON.

Run in its own process so each test gets a fresh engine:
    python engine_probe.py '{"model": DIR, "extra": {...}, "prompts": [[ids...]]}'

"in_process": true runs vLLM's engine core and its one worker in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) instead of two child processes: the same engine
code, about 20 s sooner on two cores. Tests about vLLM's process layout (serving,
tensor parallelism, metrics) do not use it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def use_native_rope() -> None:
    """Work around a bug of vLLM's CPU build (0.32): its rotary-embedding kernel
    (`torch.ops._C.rotary_embedding`, called by RotaryEmbedding.forward_cpu) assumes 2-D
    [tokens, heads x dim] query/key and misreads the 3-D strided views MLA attention
    (DeepSeek) passes, so it rotates the wrong rows, differently for each way the
    scheduler splits the prompts into steps (stock and pruned engines alike). vLLM's own
    PyTorch implementation (forward_native) is used instead. The engine then runs in
    this process (in_process) so that the patch reaches the model, and all prompts are
    scheduled in one step."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    def forward_cpu(self, positions, query, key=None):
        q, k = self.forward_native(positions, query, key)
        query.copy_(q.view_as(query))
        if key is not None:
            key.copy_(k.view_as(key))
        return query, key

    RotaryEmbedding.forward_cpu = forward_cpu


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # for apply_model below
    if spec.get("in_process") or spec.get("native_rope"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if spec.get("native_rope"):
        use_native_rope()
    from vllm import LLM, SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.helpers.inspect_model import expert_maps, expert_shapes, param_digests

    kwargs = dict(model=spec["model"], dtype="float32", max_model_len=256, max_num_seqs=4,
                  enforce_eager=True, max_logprobs=20, seed=0)
    if spec.get("extra") is not None:
        kwargs.update(load_format="aimer", model_loader_extra_config=spec["extra"])
    kwargs.update(spec.get("engine", {}))
    llm = LLM(**kwargs)
    logprobs = []
    if spec.get("prompts"):
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params)
        logprobs = [{str(tok): lp.logprob for tok, lp in o.outputs[0].logprobs[0].items()}
                    for o in outs]
    # apply_model answers once per worker (rank).
    shapes = llm.apply_model(expert_shapes)
    maps = llm.apply_model(expert_maps)
    digests = llm.apply_model(param_digests)[0] if spec.get("digests") else None
    print("PROBE-RESULT " + json.dumps({"logprobs": logprobs, "shapes": shapes[0],
                                        "rank_shapes": shapes, "expert_maps": maps,
                                        "digests": digests}), flush=True)

if __name__ == "__main__":
    main()
