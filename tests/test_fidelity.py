"""The served pruned model is exactly the paper's pruned model.

A real vLLM engine with --load-format aimer must give the same next-token
log-probabilities as a transformers model built from a checkpoint that this test
slices itself (its own AIMER computation, its own slicing), and must allocate K
experts per layer and never read a pruned expert's tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers.reference import (
    EXPERT_RE, hf_logprobs, reference_pruned, reference_scores, run_probe, slice_checkpoint)
from vllm_aimer.tiny import build_tiny_moe

pytestmark = pytest.mark.engine

PROMPTS = [[5, 17, 42, 9, 100, 33], [1, 2, 3, 4], [200, 150, 77, 12, 64, 8, 91, 250], [7]]
RATIO = 0.5
BOUND = 1e-3


@pytest.fixture(scope="module", params=["qwen3_moe", "olmoe", "mixtral"])
def pruned_run(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = build_tiny_moe(root / "model", family)
    plan_out = root / "plan"
    state = root / "state"
    env = dict(os.environ, AIMER_STATE_DIR=str(state), AIMER_TRACE_READS="1",
               TMPDIR=str(root))
    result = run_probe({"model": str(model), "extra": {"prune_ratio": RATIO,
                                                        "plan_out": str(plan_out)},
                        "prompts": PROMPTS}, env=env)
    return family, model, plan_out, state, result


def test_plan_is_the_aimer_selection(pruned_run):
    family, model, plan_out, _, _ = pruned_run
    expected = reference_pruned(reference_scores(model), RATIO)
    written = json.loads((plan_out / "pruned_experts.json").read_text())
    assert {int(k): v for k, v in written.items()} == expected


def test_logprobs_match_a_reference_pruned_model(pruned_run, tmp_path):
    family, model, _, _, result = pruned_run
    pruned = reference_pruned(reference_scores(model), RATIO)
    sliced = slice_checkpoint(model, tmp_path / "sliced", pruned)
    ref = hf_logprobs(sliced, PROMPTS)
    dense = hf_logprobs(model, PROMPTS)
    worst = worst_dense = 0.0
    for got, want, unpruned in zip(result["logprobs"], ref, dense):
        assert len(got) >= 20
        for tok, lp in got.items():
            worst = max(worst, abs(lp - want[int(tok)]))
            worst_dense = max(worst_dense, abs(lp - unpruned[int(tok)]))
    assert worst <= BOUND, f"{family}: max |d logprob| vs reference pruned model = {worst}"
    # The test is sharp: the unpruned model is far outside the bound.
    assert worst_dense > 20 * BOUND, f"{family}: dense model differs by only {worst_dense}"


def test_worker_allocates_only_kept_experts(pruned_run):
    family, model, _, _, result = pruned_run
    config = json.loads((model / "config.json").read_text())
    experts = config.get("num_experts") or config["num_local_experts"]
    kept = experts - round(RATIO * experts)
    w13 = {n: s for n, s in result["shapes"].items() if n.endswith("experts.w13_weight")}
    gates = {n: s for n, s in result["shapes"].items() if n.endswith(".gate.weight")}
    assert len(w13) == config["num_hidden_layers"]
    assert all(s[0] == kept for s in w13.values()), w13
    assert gates and all(s[0] == kept for s in gates.values()), gates


def test_pruned_tensors_are_never_read(pruned_run):
    family, model, plan_out, state, _ = pruned_run
    report = json.loads((state / "report-rank0.json").read_text())
    pruned = {int(k): set(v) for k, v in
              json.loads((plan_out / "pruned_experts.json").read_text()).items()}
    read = report["tensors_read"]
    expert_reads = [(int(m[1]), int(m[2])) for m in map(EXPERT_RE.search, read) if m]
    # Kept experts were read (so the trace works) and no pruned one was.
    assert len(expert_reads) == sum(16 - len(p) for p in pruned.values()) * 3
    assert not [r for r in expert_reads if r[1] in pruned[r[0]]]
    assert report["expert_bytes_skipped"] == report["expert_bytes_loaded"] > 0


def test_ratio_zero_is_stock_vllm(tiny_checkpoint, tmp_path):
    """prune_ratio 0 loads exactly what stock vLLM loads: identical log-probabilities."""
    model = tiny_checkpoint("olmoe")
    env = dict(os.environ, AIMER_STATE_DIR=str(tmp_path / "state"), TMPDIR=str(tmp_path))
    stock = run_probe({"model": str(model), "extra": None, "prompts": PROMPTS}, env=env)
    zero = run_probe({"model": str(model), "extra": {"prune_ratio": 0.0}, "prompts": PROMPTS},
                     env=env)
    assert zero["logprobs"] == stock["logprobs"]
    assert zero["shapes"] == stock["shapes"]
    report = json.loads((tmp_path / "state" / "report-rank0.json").read_text())
    assert report["experts_pruned"] == 0 and report["expert_bytes_skipped"] == 0
