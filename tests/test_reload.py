"""Weights loaded into a pruned model after start-up go through the same plan.

vLLM's `reload_weights` (also what sleep level 2 needs on wake-up) makes a fresh loader
that streams the whole checkpoint, and RL weight sync hands the model the trainer's
tensors, both in the checkpoint's own expert numbering. Without the plan, experts
0..K-1 of the checkpoint would overwrite the renumbered kept experts and the router
would not fit.

vLLM's CPU backend (0.32) does not reload MoE weights faithfully even without pruning:
after `reload_weights` of an unchanged checkpoint its repacked expert weights differ
from a fresh load (found here; logprobs move by ~0.5). So these tests are differential:
the pruned engine must end up bit-identical, weight for weight, to a stock engine that
serves the test's own sliced checkpoint and goes through the same reloads. Real
in-process engines; sleep mode itself is a no-op on vLLM's CPU backend.
"""

from __future__ import annotations

import pytest

from tests.helpers.reference import (hf_logprobs, reference_pruned, reference_scores,
                                     run_probe, slice_checkpoint)

pytestmark = pytest.mark.engine

PROMPTS = [[5, 17, 42, 9, 100, 33], [200, 150, 77, 12]]


def _worst(got: list[dict[str, float]], want: list[dict[int, float]]) -> float:
    return max(abs(lp - w[int(tok)]) for g, w in zip(got, want) for tok, lp in g.items())


def test_reload_and_weight_sync_keep_the_plan(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    other = tiny_checkpoint("qwen3_moe", seed=5)  # same shapes, other weights ("trained")
    pruned = reference_pruned(reference_scores(model), 0.5)
    sliced = slice_checkpoint(model, tmp_path / "sliced", pruned)
    # The experts the first checkpoint's scores chose, cut from the other checkpoint:
    # a sync keeps the plan the model was built with, it does not re-score.
    other_sliced = slice_checkpoint(other, tmp_path / "other-sliced", pruned)
    spec = {"prompts": PROMPTS, "in_process": True, "digests": True, "reload": True}
    ours = run_probe(spec | {"model": str(model), "reload_weights_from": str(other),
                             "reload_cut_router": True,
                             "extra": {"prune_ratio": 0.5, "plan_cache": False}})
    stock = run_probe(spec | {"model": str(sliced), "reload_weights_from": str(other_sliced)})

    assert _worst(ours["logprobs"], hf_logprobs(sliced, PROMPTS)) <= 1e-3
    for step in ("digests", "digests_after_reload", "digests_after_sync"):
        assert ours[step] == stock[step], step
    assert ours["logprobs_after_reload"] == stock["logprobs_after_reload"]
    assert ours["logprobs_after_sync"] == stock["logprobs_after_sync"]
    assert ours["digests_after_sync"] != ours["digests_after_reload"]  # the sync changed weights
    # A router already cut to another count cannot be matched to the plan: refused.
    error = ours["cut_router_error"]
    assert error is not None and "does not have the checkpoint's 16 experts" in error
    w13 = [s for n, s in ours["shapes"].items() if n.endswith("experts.w13_weight")]
    assert len(w13) == 4 and all(s[0] == 8 for s in w13)
