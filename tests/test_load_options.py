"""vLLM's own loader options with pruning, in a real engine: `enable_multithread_load`
and `num_threads` (DefaultModelLoader's) read the pruned stream with that many threads,
and the model loads exactly as it does without them (same parameters, same logprobs,
no pruned expert read); `num_threads` alone does not turn threading on, as in vLLM."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.helpers.reference import EXPERT_WEIGHT_RE, reference_pruned, reference_scores, run_probe

pytestmark = pytest.mark.engine

PROMPTS = [[5, 17, 42, 9, 100, 33], [1, 2, 3, 4]]
OPTIONS = {"on": {"enable_multithread_load": True, "num_threads": 3},
           "off": {"enable_multithread_load": False, "num_threads": 3}}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("qwen3_moe", max_shard_size="1MB")
    out = {}
    for name, extra in OPTIONS.items():
        root = tmp_path_factory.mktemp(f"load-{name}")
        env = dict(os.environ, AIMER_STATE_DIR=str(root / "state"), AIMER_TRACE_READS="1",
                   TMPDIR=str(root), VLLM_LOGGING_STREAM="ext://sys.stderr")
        result = run_probe({"model": str(model), "prompts": PROMPTS, "digests": True,
                            "in_process": True,
                            "extra": {"prune_ratio": 0.5, "plan_cache": False, **extra}}, env=env)
        result["report"] = json.loads((root / "state" / "report-rank0.json").read_text())
        out[name] = result
    out["pruned"] = reference_pruned(reference_scores(model), 0.5, 1)
    return out


def test_multithread_load_reads_the_pruned_stream_with_its_threads(runs):
    assert "reading the pruned checkpoint with 3 threads" in runs["on"]["log"]
    assert "reading the pruned checkpoint with" not in runs["off"]["log"]


def test_scoring_says_where_it_ran_and_how_fast(runs):
    """No GPU here: the loader says it scores on the CPU and why, then logs the
    throughput (bytes/s) and the thread count."""
    for r in (runs["on"], runs["off"]):
        assert "vllm-aimer: scoring on the CPU (GPU scoring skipped: no CUDA device)" in r["log"]
        assert re.search(r"vllm-aimer: scored [\d.]+ \w+ of expert weights in [\d.]+ s "
                         r"\([\d.]+ \w+/s, on the CPU, \d+ threads?\)", r["log"]), r["log"][-2000:]


def test_the_model_loads_the_same_with_and_without(runs):
    on, off = runs["on"], runs["off"]
    assert on["digests"] == off["digests"]
    assert on["logprobs"] == off["logprobs"]
    assert on["shapes"] == off["shapes"]
    pruned = {(layer, e) for layer, ids in runs["pruned"].items() for e in ids}
    assert len(pruned) == 4 * 8
    for r in (on, off):
        assert r["report"]["expert_rows"] == [8] * 4
        read = [m for n in r["report"]["tensors_read"] if (m := EXPERT_WEIGHT_RE.search(n))]
        assert len(read) == 4 * 8 * 3
        assert not {(int(m[1]), int(m[2])) for m in read} & pruned
    assert on["report"]["tensors_read"] == off["report"]["tensors_read"]
    assert on["report"]["expert_bytes_loaded"] == off["report"]["expert_bytes_loaded"]
