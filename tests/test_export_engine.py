"""The export is the same model: stock vLLM (no plugin load format, plain safetensors
loading of the exported directory) gives the same next-token log-probabilities as
`--load-format aimer` on the source checkpoint with the same plan, and builds the kept
expert count from the exported config.json.

The plans are foreign files, so the loader's side of the two new plan paths runs in a
real engine too: vllm-ascend ordered lists with their prune_ratio (Qwen3-MoE,
per-expert tensors) and a vLLM #37824 profile (gpt-oss: fused experts with biases and a
router bias).
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from tests.helpers import plan_files
from tests.helpers.reference import run_probe
from vllm_aimer.cli import main

pytestmark = pytest.mark.engine

PROMPTS = [[5, 17, 42, 9, 100, 33], [1, 2, 3, 4], [200, 150, 77, 12, 64, 8, 91, 250], [7]]
BOUND = 1e-5
E, K = 16, 8


def probe(spec: dict, root) -> dict:
    env = dict(os.environ, TMPDIR=str(root), AIMER_STATE_DIR=str(root / "state"))
    return run_probe(spec | {"in_process": True}, env=env)


@pytest.mark.parametrize("family, fmt", [("qwen3_moe", "vllm-ascend"),
                                         ("gpt_oss", "vllm-profile")])
def test_stock_vllm_on_the_export_equals_the_aimer_load(tiny_checkpoint, tmp_path, family, fmt,
                                                         record_property):
    model = tiny_checkpoint(family)
    decision = plan_files.random_decision([0, 1, 2, 3], E, E - K, seed=21)
    if fmt == "vllm-ascend":
        plan = plan_files.ascend_lines(tmp_path, decision, E)
        extra = {"plan": str(plan), "prune_ratio": 0.5}
        args = ["--plan", str(plan), "--ratio", "0.5"]
    else:
        plan = plan_files.vllm_profile(tmp_path, decision)
        extra, args = {"plan": str(plan)}, ["--plan", str(plan)]
    out = tmp_path / "export"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["export", str(model), *args, "--output", str(out), "--quiet",
                     "--max-shard-size", "500KB"]) == 0, err.getvalue()

    aimer = probe({"model": str(model), "extra": extra, "prompts": PROMPTS}, tmp_path)
    stock = probe({"model": str(out), "extra": None, "prompts": PROMPTS}, tmp_path)

    w13 = {n: s for n, s in stock["shapes"].items() if n.endswith("experts.w13_weight")}
    assert len(w13) == 4 and all(s[0] == K for s in w13.values()), w13
    assert stock["shapes"] == aimer["shapes"]
    worst = 0.0
    for got, want in zip(stock["logprobs"], aimer["logprobs"]):
        assert got.keys() == want.keys()
        worst = max([worst] + [abs(got[t] - want[t]) for t in got])
    record_property("max_abs_dlogprob", worst)
    assert worst <= BOUND, f"{family}: stock vLLM on the export vs aimer load: {worst}"
    # The export names where it came from.
    prov = json.loads((out / "vllm-aimer" / "provenance.json").read_text())
    assert prov["source"]["path"] == str(model.resolve()) and prov["experts_per_layer"] == K
