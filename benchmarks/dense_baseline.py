"""What offline pruning tools do before scoring: load the dense model with transformers
(`from_pretrained`, in the checkpoint's dtype), then score its in-memory expert
parameters. Needs torch and transformers only (runs on the GPU machine too)."""

from __future__ import annotations

import gc
from pathlib import Path

from vllm_aimer.scoring import aimer_score_of

Scores = dict[int, list[float]]


def warm_up() -> None:
    """Import transformers and the model's code before timing (seconds that would
    otherwise land on the first, cold, run)."""
    import transformers
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: F401
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def dense_then_score(model: Path, layers: tuple[int, ...], num_experts: int) -> Scores:
    """AIMER scores of a generated Qwen3-MoE (fused experts in transformers 5)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    stored = json.loads((model / "config.json").read_text()).get("torch_dtype")
    dtype = torch.bfloat16 if stored == "bfloat16" else torch.float32
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    scores: Scores = {}
    with torch.no_grad():
        for layer in layers:
            experts = dense.model.layers[layer].mlp.experts  # fused [E, ...] in memory
            scores[layer] = [aimer_score_of([experts.gate_up_proj[e], experts.down_proj[e]])
                             for e in range(num_experts)]
    del dense
    gc.collect()
    return scores
