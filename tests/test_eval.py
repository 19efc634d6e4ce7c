"""`vllm-aimer eval` measures what transformers measures, on the engine that serves.

One real sweep (the console script, ratios 0 and 0.5, criterion aimer: two vLLM engines)
over the tiny Qwen3-MoE. Expected values come from transformers in float32 on the same
checkpoint (ratio 0) and on a reference pruned checkpoint that this test makes itself
(tests/helpers/reference.py: its own numpy AIMER scores, plan and slicing; ratio 0.5).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess

import pytest
import torch

from tests.helpers.reference import (EXPERT_ANY_RE, header_bytes, reference_pruned,
                                     reference_scores, slice_checkpoint)
from tests.test_cli import console_script
from tests.test_plots import valid_png

pytestmark = pytest.mark.engine

MAX_LEN = 48
BOUND = 1e-3
DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "mixture of experts models route each token to a few experts",
    # Longer than MAX_LEN tokens: truncated to its first MAX_LEN - 1 tokens.
    "pruning removes the least useful experts before serving, " * 6,
    "user: what is the capital of france? assistant: paris.",
    "x",  # one token: nothing to predict, and no harm done
]
FIELDS = ["criterion", "ratio", "experts_per_layer", "tokens", "nll_mean", "perplexity",
          "top1_agreement_vs_dense", "weight_bytes", "tokens_per_s"]


def transformers_tokens(model_dir, texts: list[str]) -> list[dict]:
    """Per document: NLL sum and top-1 token of every predicted position, float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text)["input_ids"][: MAX_LEN - 1]
            logits = model(torch.tensor([ids])).logits[0].double()
            lp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(ids[1:])
            nll = -float(lp[:-1].gather(1, target[:, None]).sum()) if len(ids) > 1 else 0.0
            out.append({"tokens": len(ids) - 1, "nll": nll,
                        "top1": lp[:-1].argmax(-1).tolist()})
    return out


def perplexity(docs: list[dict]) -> float:
    return math.exp(sum(d["nll"] for d in docs) / sum(d["tokens"] for d in docs))


@pytest.fixture(scope="module")
def sweep(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("qwen3_moe")
    root = tmp_path_factory.mktemp("eval")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    out = root / "out"
    cmd = [*console_script(), "eval", str(model), "--data", str(data), "--ratios", "0,0.5",
           "--criteria", "aimer", "--max-model-len", str(MAX_LEN), "--output", str(out)]
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pruned = reference_pruned(reference_scores(model), 0.5)
    sliced = slice_checkpoint(model, root / "sliced", pruned)
    return {"model": model, "out": out, "cmd": cmd, "env": env, "stdout": proc.stdout,
            "report": json.loads((out / "eval.json").read_text()), "pruned": pruned,
            "dense_ref": transformers_tokens(model, DOCS),
            "pruned_ref": transformers_tokens(sliced, DOCS)}


def runs(sweep) -> dict[str, dict]:
    return {r["criterion"]: r for r in sweep["report"]["runs"]}


def test_report_schema(sweep):
    report = sweep["report"]
    assert report["model"] == str(sweep["model"].resolve())
    assert report["data"].endswith("docs.jsonl")
    assert [(r["criterion"], r["ratio"]) for r in report["runs"]] == [("dense", 0.0),
                                                                      ("aimer", 0.5)]
    for r in report["runs"]:
        assert list(r) == FIELDS
    assert runs(sweep)["dense"]["experts_per_layer"] == [16, 16]
    assert runs(sweep)["aimer"]["experts_per_layer"] == [16, 8]
    assert runs(sweep)["dense"]["top1_agreement_vs_dense"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in report["runs"])


@pytest.mark.parametrize("criterion, ref", [("dense", "dense_ref"), ("aimer", "pruned_ref")])
def test_perplexity_matches_transformers(sweep, criterion, ref, record_property):
    got = runs(sweep)[criterion]
    want = sweep[ref]
    assert got["tokens"] == sum(d["tokens"] for d in want)
    rel = abs(got["perplexity"] / perplexity(want) - 1)
    record_property(f"perplexity_rel_diff_{criterion}", rel)
    assert rel <= BOUND, (got["perplexity"], perplexity(want))
    assert math.isclose(got["nll_mean"], math.log(got["perplexity"]), rel_tol=1e-12)
    # Per document too (the worker's raw numbers), so errors cannot cancel out.
    raw = json.loads((sweep["out"] / "runs" / f"{criterion if criterion == 'dense' else 'aimer-0.5'}.json").read_text())
    for mine, theirs in zip(raw["docs"], want):
        assert mine["tokens"] == theirs["tokens"]
        assert abs(mine["nll"] - theirs["nll"]) <= BOUND * max(1.0, abs(theirs["nll"]))


def test_the_comparison_is_sharp(sweep):
    """Pruning moves the per-document NLL far outside the bound, so matching the pruned
    reference is not matching the dense model."""
    moved = max(abs(a["nll"] - b["nll"]) / max(1.0, abs(b["nll"]))
                for a, b in zip(sweep["pruned_ref"], sweep["dense_ref"]))
    assert moved > 10 * BOUND


def test_top1_agreement_matches_transformers(sweep):
    dense, pruned = sweep["dense_ref"], sweep["pruned_ref"]
    tokens = sum(d["tokens"] for d in dense)
    same = sum(a == b for d, p in zip(dense, pruned) for a, b in zip(d["top1"], p["top1"]))
    got = runs(sweep)["aimer"]["top1_agreement_vs_dense"]
    # A near-tie may flip one argmax between implementations: allow one position.
    assert abs(got - same / tokens) <= 1 / tokens + 1e-12, (got, same / tokens)
    assert got < 0.9  # pruning half the experts of a random model changes predictions


def test_plan_weights_and_files(sweep):
    out = sweep["out"]
    plan = json.loads((out / "plans" / "aimer-0.5" / "pruned_experts.json").read_text())
    assert {int(k): v for k, v in plan.items()} == sweep["pruned"]
    sizes = header_bytes(sweep["model"])
    pruned_bytes = sum(b for name, b in sizes.items()
                       if (m := EXPERT_ANY_RE.search(name))
                       and int(m["expert"]) in sweep["pruned"][int(m["layer"])])
    assert runs(sweep)["dense"]["weight_bytes"] == sum(sizes.values())
    assert runs(sweep)["aimer"]["weight_bytes"] == sum(sizes.values()) - pruned_bytes
    rows = list(csv.DictReader(io.StringIO((out / "eval.csv").read_text())))
    assert [(r["criterion"], float(r["ratio"]), int(r["kept_experts"])) for r in rows] == \
        [("dense", 0.0, 16), ("aimer", 0.5, 8)]
    assert float(rows[1]["perplexity"]) == pytest.approx(runs(sweep)["aimer"]["perplexity"])
    valid_png(out / "eval.png")
    assert "| aimer | 0.5 | 16 → 8 |" in sweep["stdout"]


def test_resume_skips_finished_runs(sweep):
    out = sweep["out"]
    logs = {p: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    again = subprocess.run(sweep["cmd"], capture_output=True, text=True, env=sweep["env"],
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "eval.json").read_text())["runs"] == sweep["report"]["runs"]
    assert {p: p.stat().st_mtime_ns for p in (out / "logs").iterdir()} == logs  # no engine
    other = subprocess.run([*sweep["cmd"], "--seed", "5"], capture_output=True, text=True,
                           env=sweep["env"], timeout=300)
    assert other.returncode == 2
    assert "different seed" in other.stderr and "Fix: pass a new --output" in other.stderr
