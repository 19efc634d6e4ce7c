"""Pruning under vLLM's parallelism on the CPU backend (2 ranks on this 2-core machine).

Every rank prunes the same experts, the engine scores once (the plan cache serves the
other rank), and with expert parallelism the kept experts are placed by vLLM's rules
in the new id space. vLLM's CPU fused-MoE kernel crashes on a request under expert
parallelism even without pruning, so that case checks placement, not generation.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.reference import (
    hf_logprobs, reference_pruned, reference_scores, run_probe, slice_checkpoint)

pytestmark = pytest.mark.engine

PROMPTS = [[5, 17, 42, 9, 100, 33], [200, 150, 77, 12]]


def _env(tmp_path):
    # vLLM's CPU backend binds each rank's threads to cores; there is one NUMA node here.
    return dict(os.environ, AIMER_STATE_DIR=str(tmp_path / "state"), TMPDIR=str(tmp_path),
                VLLM_CPU_OMP_THREADS_BIND="0|1")


def _reports(tmp_path):
    return [json.loads((tmp_path / "state" / f"report-rank{r}.json").read_text()) for r in (0, 1)]


def test_tensor_parallel_ranks_prune_the_same_experts_and_score_once(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    result = run_probe({"model": str(model), "prompts": PROMPTS,
                        "extra": {"prune_ratio": 0.5, "plan_cache": str(tmp_path / "cache")},
                        "engine": {"tensor_parallel_size": 2}}, env=_env(tmp_path))
    r0, r1 = _reports(tmp_path)
    assert r0["plan_hash"] == r1["plan_hash"]
    assert sorted([r0["source"], r1["source"]]) == ["cache", "score"]
    assert r0["expert_rows"] == r1["expert_rows"] == [8, 8, 8, 8]
    pruned = reference_pruned(reference_scores(model), 0.5)
    ref = hf_logprobs(slice_checkpoint(model, tmp_path / "sliced", pruned), PROMPTS)
    worst = max(abs(lp - want[int(tok)]) for got, want in zip(result["logprobs"], ref)
                for tok, lp in got.items())
    assert worst <= 1e-3


def test_expert_parallel_places_kept_experts_in_the_new_id_space(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    result = run_probe({"model": str(model), "prompts": [],
                        "extra": {"prune_ratio": 0.5, "plan_cache": str(tmp_path / "cache")},
                        "engine": {"tensor_parallel_size": 2, "enable_expert_parallel": True}},
                       env=_env(tmp_path))
    r0, r1 = _reports(tmp_path)
    assert r0["plan_hash"] == r1["plan_hash"]
    # 8 kept experts over 2 ranks: 4 each, vLLM's linear placement over ids 0..7.
    assert r0["expert_rows"] == r1["expert_rows"] == [4, 4, 4, 4]
    maps = result["expert_maps"]
    assert len(maps) == 2 and len(maps[0]) == 4
    for layer in maps[0]:
        assert maps[0][layer] == [0, 1, 2, 3, -1, -1, -1, -1]
        assert maps[1][layer] == [-1, -1, -1, -1, 0, 1, 2, 3]


def test_ranks_that_disagree_on_the_plan_refuse_to_serve(tiny_checkpoint, tmp_path):
    """Two TP ranks without a shared plan cache score on their own; rank 1's scores are
    perturbed (tests/helpers/perturb_rank: a stand-in for float rounding on another
    CPU ordering a near-tie differently). The ranks compare plan hashes during load
    and fail, naming the fix, instead of serving a mix of two expert sets."""
    from pathlib import Path

    model = tiny_checkpoint("qwen3_moe")
    here = Path(__file__).parent / "helpers" / "perturb_rank"
    env = _env(tmp_path) | {"AIMER_TEST_PERTURB_RANK": "1",
                            "PYTHONPATH": f"{here}:{os.environ.get('PYTHONPATH', '')}"}
    with pytest.raises(AssertionError, match="engine probe failed"):
        run_probe({"model": str(model), "prompts": PROMPTS,
                   "extra": {"prune_ratio": 0.5, "plan_cache": False},
                   "engine": {"tensor_parallel_size": 2}}, env=env)
    # The loader's error, as `vllm serve` repeats it as its last line (report.write_error).
    error = (tmp_path / "state" / "error.txt").read_text()
    assert "ranks chose different experts to prune" in error
    assert "rank 0:" in error and "rank 1:" in error and "plan_cache" in error
    assert not (tmp_path / "state" / "report-rank0.json").exists()
