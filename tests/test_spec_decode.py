"""Speculative decoding next to a pruned target, in real (in-process) vLLM engines.

vLLM loads the draft with the target's load config, so the `aimer` loader sees it too.
A draft with its own checkpoint (a dense draft model, an EAGLE head, another MoE) must
load exactly as stock vLLM loads it; an MTP draft, which vLLM builds from the target's
own checkpoint and config, must prune what the target pruned. With greedy sampling,
speculative decoding must not change a single token of the target's output.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.reference import (dense_llama, hf_greedy, reference_pruned, reference_scores,
                                     run_probe, slice_checkpoint)

pytestmark = pytest.mark.engine

PROMPTS = [[5, 17, 42, 9, 100, 33], [200, 150, 77, 12]]
TOKENS = 8


def _rows(shapes: dict[str, list[int]]) -> list[int]:
    return [s[0] for n, s in sorted(shapes.items()) if n.endswith("experts.w13_weight")]


def _spec_probe(model, draft: dict, tmp_path, **more) -> dict:
    return run_probe({"model": str(model), "prompts": PROMPTS, "generate": TOKENS,
                      "in_process": True, "drafter": True,
                      "extra": {"prune_ratio": 0.5, "plan_cache": False},
                      "engine": {"speculative_config": draft}, **more},
                     env=_env(tmp_path))


def _env(tmp_path) -> dict[str, str]:
    import os
    return dict(os.environ, AIMER_STATE_DIR=str(tmp_path / "state"))


@pytest.mark.parametrize("draft_kind", ["dense", "moe"])
def test_a_draft_with_its_own_checkpoint_loads_as_stock_vllm_loads_it(
        tiny_checkpoint, tmp_path, draft_kind):
    target = tiny_checkpoint("qwen3_moe")
    draft = (dense_llama(tmp_path / "draft", target) if draft_kind == "dense"
             else tiny_checkpoint("qwen3_moe", seed=3))
    result = _spec_probe(target, {"method": "draft_model", "model": str(draft),
                                  "num_speculative_tokens": 2}, tmp_path)
    sliced = slice_checkpoint(target, tmp_path / "sliced",
                              reference_pruned(reference_scores(target), 0.5))
    assert result["tokens"] == hf_greedy(sliced, PROMPTS, TOKENS)
    assert _rows(result["shapes"]) == [8] * 4          # the target is pruned
    drafter = _rows(result["drafter_shapes"][0])
    assert drafter == ([] if draft_kind == "dense" else [16] * 4)  # the draft is not
    report = json.loads((tmp_path / "state" / "report-rank0.json").read_text())
    assert report["experts_after"] == 8 and report["layers"] == [0, 1, 2, 3]


def test_mtp_draft_prunes_what_the_target_pruned(tiny_checkpoint, tmp_path):
    """DeepSeek-V3 with one MTP layer (layer 4 after trunk layers 0-3, layer 0 dense):
    vLLM builds the MTP layer from the target's config, so it gets the same kept count;
    its experts are chosen by AIMER on its own weights."""
    # kv_lora_rank 512 as released: vLLM's CPU MLA decode kernel supports no other.
    model = tiny_checkpoint("deepseek_v3", mtp_layers=1, kv_lora_rank=512)
    result = _spec_probe(model, {"method": "mtp", "num_speculative_tokens": 2}, tmp_path,
                         native_rope=True)
    sliced = slice_checkpoint(model, tmp_path / "sliced",
                              reference_pruned(reference_scores(model), 0.5, n_group=4,
                                               mtp_from=4))
    assert result["tokens"] == hf_greedy(sliced, PROMPTS, TOKENS)
    assert _rows(result["shapes"]) == [8] * 3
    assert _rows(result["drafter_shapes"][0]) == [8]
    report = json.loads((tmp_path / "state" / "report-rank0.json").read_text())
    # The MTP layer is not a trunk layer: not in the ratio, the layer list or the metrics.
    assert report["layers"] == [1, 2, 3] and report["experts_pruned"] == 24
