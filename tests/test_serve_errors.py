"""Bad input at `vllm serve` time: non-zero exit, one line in the server's output that
names the problem and the fix, before weights are allocated, and no plan file written.

The servers are real `vllm serve` processes; they are started a few at a time so the
whole set costs about as much as three cold starts.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_aimer.testing.server import ServerProcess

pytestmark = pytest.mark.engine

CASES: dict[str, tuple[dict | str | None, tuple[str, ...]]] = {
    # name: (extra config (None: use the case's own args), expected fragments)
    "bad_json": ('{"prune_ratio": 0.5', ("model-loader-extra-config",)),
    "ratio_string": ({"prune_ratio": "0.5"}, ("prune_ratio must be a number", "Fix:")),
    "ratio_negative": ({"prune_ratio": -0.25}, ("prune_ratio must be in [0, 1), got -0.25", "Fix:")),
    "ratio_one": ({"prune_ratio": 1.0}, ("prune_ratio must be in [0, 1), got 1.0", "Fix:")),
    "ratio_below_top_k": ({"prune_ratio": 0.95}, ("fewer than top_k=2", "at most 0.875")),
    "plan_and_ratio": ({"prune_ratio": 0.5, "plan": "PLAN"}, ("both given", "only one")),
    "plan_missing": ({"plan": "MISSING"}, ("does not exist", "Fix:")),
    "plan_not_json": ({"plan": "NOTJSON"}, ("is not valid JSON", "Fix:")),
    "plan_other_checkpoint": ({"plan": "OTHER"}, ("different checkpoint", "vllm-aimer score")),
    "unknown_key": ({"prune_ratio": 0.5, "ratio": 0.5}, ("unknown", "'ratio'", "valid keys are")),
    "plan_out_unwritable": ({"prune_ratio": 0.5, "plan_out": "BLOCKED"}, ("not writable", "Fix:")),
    "dense_model": ({"prune_ratio": 0.5}, ("'llama' is not a supported", "qwen3_moe",
                                           "olmoe, mixtral")),
    # 16 experts, ratio 7/16: 9 kept do not split over 2 EP ranks (vLLM would put 5 and 4,
    # which its GPU kernels would read as two windows of 4: wrong experts).
    "ep_uneven": ({"prune_ratio": 0.4375}, ("keep 9 experts per layer, which do not split "
                                            "evenly over 2 expert-parallel ranks",
                                            "nearest: 0.25, 0.375, 0.5")),
}
# Cases that need more than the extra config: vLLM arguments and environment.
MORE_ARGS = {"ep_uneven": ["--tensor-parallel-size", "2", "--enable-expert-parallel"]}
MORE_ENV = {"ep_uneven": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}


def _materialise(extra, root: Path, other_plan: Path):
    if isinstance(extra, str):
        return extra
    paths = {"PLAN": str(other_plan), "MISSING": str(root / "missing.json"),
             "NOTJSON": str(root / "not.json"), "OTHER": str(other_plan),
             "BLOCKED": str(root / "blocker" / "plan")}
    return json.dumps({k: paths.get(v, v) if isinstance(v, str) else v for k, v in extra.items()})


@pytest.fixture(scope="module")
def outcomes(tiny_checkpoint, tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_aimer.cli import main

    root = tmp_path_factory.mktemp("serve-errors")
    model = tiny_checkpoint("olmoe")
    assert main(["score", str(tiny_checkpoint("olmoe", seed=7)), "--ratio", "0.5",
                 "--output", str(root / "other"), "--quiet"]) == 0
    (root / "not.json").write_text("{oops")
    (root / "blocker").write_text("a file, not a directory")
    dense = root / "dense"
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(dense)
    for f in model.glob("tokenizer*"):
        (dense / f.name).write_bytes(f.read_bytes())

    def run(name: str):
        extra, _ = CASES[name]
        plan_out = root / name / "plan_out"
        value = _materialise(extra, root, root / "other" / "plan.json")
        if name not in ("plan_out_unwritable", "bad_json"):
            value = json.dumps({**json.loads(value), "plan_out": str(plan_out)})
        args = ["--load-format", "aimer", "--model-loader-extra-config", value,
                "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                *MORE_ARGS.get(name, [])]
        server = ServerProcess(dense if name == "dense_model" else model, args, root / name,
                               env=MORE_ENV.get(name))
        with server:
            rc = server.wait_exit(timeout=400)
            log = server.log()
        written = sorted(p.name for p in plan_out.iterdir()) if plan_out.exists() else []
        return name, rc, log, written

    with ThreadPoolExecutor(3) as pool:
        return {name: (rc, log, written) for name, rc, log, written in pool.map(run, CASES)}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_fast_and_clearly(outcomes, name):
    rc, log, written = outcomes[name]
    _, fragments = CASES[name]
    assert rc != 0, log[-3000:]
    lines = [l for l in log.splitlines() if all(f in l for f in fragments)]
    assert lines, f"no line with {fragments} in:\n{log[-4000:]}"
    # ... and it is the last thing the user sees, but for what Python's multiprocessing
    # resource tracker (a separate process that outlives the server) prints about the
    # shared memory vLLM's tensor-parallel workers leave behind on a failed start.
    last = [l for l in log.splitlines() if l.strip() and "resource_tracker" not in l][-1]
    assert all(f in last for f in fragments), last
    assert written == [], f"plan files written: {written}"
    if name != "bad_json":
        # Failed before the model was built: vLLM never got to loading weights.
        assert "Loading weights took" not in log and "Model loading took" not in log
