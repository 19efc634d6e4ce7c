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
    from tests.helpers.inspect_model import (drafter_expert_shapes, expert_maps, expert_shapes,
                                             param_digests)

    kwargs = dict(model=spec["model"], dtype="float32", max_model_len=256, max_num_seqs=4,
                  enforce_eager=True, max_logprobs=20, seed=0)
    if spec.get("extra") is not None:
        kwargs.update(load_format="aimer", model_loader_extra_config=spec["extra"])
    kwargs.update(spec.get("engine", {}))
    llm = LLM(**kwargs)

    def next_token_logprobs() -> list[dict[str, float]]:
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params)
        return [{str(tok): lp.logprob for tok, lp in o.outputs[0].logprobs[0].items()}
                for o in outs]

    result: dict = {"logprobs": next_token_logprobs() if spec.get("prompts") else []}
    if spec.get("digests"):
        result["digests"] = llm.apply_model(param_digests)[0]
    if spec.get("generate"):
        params = SamplingParams(max_tokens=spec["generate"], temperature=0.0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    if spec.get("drafter"):
        result["drafter_shapes"] = llm.collective_rpc(drafter_expert_shapes)
    if spec.get("reload"):
        # vLLM's own reload path: a fresh loader of the same load format, from disk.
        llm.collective_rpc("reload_weights")
        result["logprobs_after_reload"] = next_token_logprobs()
        result["digests_after_reload"] = llm.apply_model(param_digests)[0]
    if spec.get("reload_weights_from"):
        # As an RL trainer syncs weights: tensors in the checkpoint's own numbering,
        # handed to the worker (in-process engines only: tensors are not serialised).
        from safetensors.torch import load_file
        weights = {}
        for f in sorted(Path(spec["reload_weights_from"]).glob("*.safetensors")):
            weights.update(load_file(f))
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        result["logprobs_after_sync"] = next_token_logprobs()
        result["digests_after_sync"] = llm.apply_model(param_digests)[0]
        if spec.get("reload_cut_router"):
            cut = [(n, t[:2] if n.endswith("mlp.gate.weight") else t) for n, t in weights.items()]
            try:
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": cut})
                result["cut_router_error"] = None
            except Exception as e:  # the message is what the test checks
                result["cut_router_error"] = str(e)
    # apply_model answers once per worker (rank).
    shapes = llm.apply_model(expert_shapes)
    result.update(shapes=shapes[0], rank_shapes=shapes, expert_maps=llm.apply_model(expert_maps))
    print("PROBE-RESULT " + json.dumps(result), flush=True)

if __name__ == "__main__":
    main()
