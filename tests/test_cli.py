"""The `vllm-aimer` console script, run as users run it (a subprocess).

All runs of this module start together in one fixture, so their interpreter start-ups
overlap; each test then checks one run's exit code, streams and files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.reference import EXPERT_ANY_RE, header_bytes, reference_k, reference_pruned, reference_scores


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "vllm-aimer"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vllm_aimer.cli"]


def tree(directory: Path) -> list[str]:
    """Every path under a directory, hidden files included."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("qwen3_moe")
    root = tmp_path_factory.mktemp("cli")
    a_file = root / "regular-file"
    a_file.write_text("not a directory\n")
    authors = root / "authors" / "pruned_experts.json"
    authors.parent.mkdir()
    authors_ids = {"0": [9, 1, 4, 0], "1": [2, 3, 5, 7], "2": [15, 14, 13, 12], "3": [6, 8, 10, 11]}
    authors.write_text(json.dumps(authors_ids))
    uneven = root / "uneven.json"
    uneven.write_text(json.dumps({"0": [1, 2], "1": [1], "2": [1, 2], "3": [1, 2]}))
    no_plan_dir = root / "no-plan"
    no_plan_dir.mkdir()
    empty_out = root / "empty-out"
    empty_out.mkdir()
    specs = {
        "score": ["score", model, "--ratio", "0.5", "--output", root / "score", "--quiet"],
        "inspect": ["inspect", model, "--json"],
        "inspect_ep": ["inspect", model, "--json", "--ep-size", "4"],
        "inspect_text": ["inspect", model, "--ep-size", "3"],
        "inspect_bad_ep": ["inspect", model, "--ep-size", "0"],
        "plan": ["plan", model, authors, "--output", root / "plan-out"],
        "plan_uneven": ["plan", model, uneven, "--output", root / "uneven-out"],
        "plan_no_file": ["plan", model, no_plan_dir],
        "ratio_one": ["score", model, "--ratio", "1.0", "--output", empty_out],
        "ratio_below_top_k": ["score", model, "--ratio", "0.95", "--output", root / "below"],
        "missing_model": ["score", root / "no-such-model", "--ratio", "0.5", "--output",
                          root / "missing"],
        "unwritable_output": ["score", model, "--ratio", "0.5", "--output", a_file / "out"],
    }
    env = dict(os.environ, TQDM_DISABLE="1")
    procs = {name: subprocess.Popen([*console_script(), *map(str, args)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=root)
             for name, args in specs.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=180)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return {"model": model, "root": root, "results": results, "authors_ids": authors_ids,
            "a_file": a_file, "empty_out": empty_out}


# --------------------------------------------------------------------------- score

def test_score_succeeds(runs):
    r = runs["results"]["score"]
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = runs["root"] / "score"
    assert tree(out) == ["plan.json", "pruned_experts.json", "scores.csv", "vllm_profile.json"]
    for name in tree(out):
        assert str(out / name) in r.stdout


def test_score_writes_the_authors_pruned_experts_format(runs):
    model = runs["model"]
    text = (runs["root"] / "score" / "pruned_experts.json").read_text()
    data = json.loads(text)
    assert list(data) == ["0", "1", "2", "3"]
    want = reference_pruned(reference_scores(model), k=reference_k(4, 16, 0.5))
    assert data == {str(k): v for k, v in want.items()}
    for ids in data.values():
        assert ids == sorted(ids) and len(ids) == 8


def test_score_writes_plan_json(runs):
    plan = json.loads((runs["root"] / "score" / "plan.json").read_text())
    pruned = json.loads((runs["root"] / "score" / "pruned_experts.json").read_text())
    assert plan["format"] == "vllm-aimer.plan/v1"
    assert plan["family"] == "qwen3_moe"
    assert plan["num_experts"] == 16 and plan["top_k"] == 2
    inspect = json.loads(runs["results"]["inspect"].stdout)
    assert plan["checkpoint"] == inspect["checkpoint"]
    assert list(plan["layers"]) == ["0", "1", "2", "3"]
    for layer, lp in plan["layers"].items():
        assert lp["pruned"] == pruned[layer]
        assert lp["kept"] == [e for e in range(16) if e not in pruned[layer]]
        assert len(lp["scores"]) == 16


def test_score_writes_scores_csv(runs):
    text = (runs["root"] / "score" / "scores.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == "layer,expert_id,aimer_score,rank_in_layer,is_pruned"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 * 16
    pruned = json.loads((runs["root"] / "score" / "pruned_experts.json").read_text())
    ref = reference_scores(runs["model"])
    for layer in range(4):
        mine = [r for r in rows if int(r["layer"]) == layer]
        assert [int(r["expert_id"]) for r in mine] == list(range(16))
        scores = np.array([float(r["aimer_score"]) for r in mine])
        np.testing.assert_allclose(scores, ref[layer], rtol=1e-5)
        ranks = [int(r["rank_in_layer"]) for r in mine]
        assert sorted(ranks) == list(range(16))
        # rank 0 is the highest reference score, rank 15 the lowest.
        order = np.argsort(-np.asarray(ref[layer]), kind="stable")
        assert [ranks[e] for e in order] == list(range(16))
        flags = [r["is_pruned"] for r in mine]
        assert set(flags) <= {"True", "False"}
        assert [e for e, f in enumerate(flags) if f == "True"] == pruned[str(layer)]
        # The pruned ones are exactly the 8 best ranks.
        assert sorted(ranks[e] for e in pruned[str(layer)]) == list(range(8))


def test_written_files_have_ordinary_permissions(runs):
    """Plan files are read by other processes (a vLLM server, another user): they must get
    the usual permissions for the umask, not the 0600 of a private temporary file."""
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    for directory in (runs["root"] / "score", runs["root"] / "plan-out"):
        for name in tree(directory):
            mode = stat.S_IMODE((directory / name).stat().st_mode)
            assert mode == want, f"{name}: {oct(mode)} != {oct(want)}"


# --------------------------------------------------------------------------- inspect

def test_inspect_json(runs):
    r = runs["results"]["inspect"]
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    sizes = header_bytes(runs["model"])
    assert facts["family"] == "qwen3_moe"
    assert facts["moe_layers"] == [0, 1, 2, 3]
    assert facts["experts_per_layer"] == 16
    assert facts["top_k"] == 2
    assert facts["max_prune_ratio"] == pytest.approx(14 / 16)
    assert facts["routed_expert_bytes"] == sum(b for n, b in sizes.items() if EXPERT_ANY_RE.search(n))
    assert facts["routed_expert_bytes"] == 4 * 16 * 3 * 64 * 64 * 4
    assert facts["total_bytes"] == sum(sizes.values())
    assert len(facts["checkpoint"]) == 64 and int(facts["checkpoint"], 16) >= 0
    # Without expert parallelism: every count that keeps top_k (2) experts; on
    # Blackwell, kept counts that are multiples of 4 and more than top_k.
    assert facts["safe_prune_ratios"]["any"] == [k / 16 for k in range(15)]
    assert facts["safe_prune_ratios"]["blackwell"] == [0.0, 0.25, 0.5, 0.75]


def test_inspect_offers_only_ratios_that_split_over_the_ep_size(runs):
    facts = json.loads(runs["results"]["inspect_ep"].stdout)
    assert facts["expert_parallel_size"] == 4
    # Kept 16, 12, 8, 4: multiples of 4 EP ranks.
    assert facts["safe_prune_ratios"]["any"] == [0.0, 0.25, 0.5, 0.75]
    text = runs["results"]["inspect_text"].stdout
    # EP 3: kept 15, 12, 9, 6, 3 (pruned 1, 4, 7, 10, 13); Blackwell also wants 4 | kept.
    assert "3 expert-parallel ranks" in text
    assert "any GPU or CPU: 0, 0.0625, 0.25, 0.4375, 0.625, 0.8125" in text
    assert "NVIDIA Blackwell (SM100, TRT-LLM MoE kernels): 0, 0.25" in text


# --------------------------------------------------------------------------- plan

def test_plan_checks_and_rewrites_an_authors_file(runs):
    r = runs["results"]["plan"]
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "4 MoE layers" in r.stdout and "16 -> 12" in r.stdout
    assert "AIMER authors' pruned_experts.json" in r.stdout  # the detected format
    out = runs["root"] / "plan-out"
    # No scores in an authors' file, so no scores.csv.
    assert tree(out) == ["plan.json", "pruned_experts.json", "vllm_profile.json"]
    data = json.loads((out / "pruned_experts.json").read_text())
    assert data == {k: sorted(v) for k, v in runs["authors_ids"].items()}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["checkpoint"] == json.loads(runs["results"]["inspect"].stdout)["checkpoint"]
    assert {k: lp["pruned"] for k, lp in plan["layers"].items()} == data


def test_plan_rejects_a_non_uniform_file(runs):
    r = runs["results"]["plan_uneven"]
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n")
    assert "one expert count" in r.stderr
    assert not (runs["root"] / "uneven-out").exists()


# --------------------------------------------------------------------------- bad input

BAD = {
    "ratio_one": "[0, 1)",
    "ratio_below_top_k": "top_k=2",
    "missing_model": "not a local directory",
    "unwritable_output": "not writable",
    "plan_no_file": "no-plan",
    "inspect_bad_ep": "--ep-size must be a positive integer",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_fails_with_one_line(runs, name):
    r = runs["results"][name]
    assert r.returncode != 0
    assert r.stderr.endswith("\n")
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vllm-aimer: error: ")
    assert BAD[name] in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_input_writes_nothing(runs):
    root = runs["root"]
    assert tree(runs["empty_out"]) == []
    assert not (root / "below").exists()
    assert not (root / "missing").exists()
    assert runs["a_file"].read_text() == "not a directory\n"
    # No stray temporary or probe files next to the outputs.
    leftovers = [p for p in tree(root) if p.rsplit("/", 1)[-1].startswith(".")
                 or p.endswith(".tmp")]
    assert leftovers == []


# --------------------------------------------------------------------------- start-up

_IMPORT_PROBE = """
import sys
from vllm_aimer.cli import main
rc = main(sys.argv[1:])
print("LOADED", sorted(m for m in ("torch", "vllm", "transformers") if m in sys.modules))
sys.exit(rc)
"""


def test_offline_commands_import_neither_vllm_nor_torch(tiny_checkpoint, tmp_path):
    """`score` (plain float experts), `inspect`, `plan` and `fit` in a fresh interpreter:
    vLLM is never imported and neither is torch (seconds of start-up each; the whole
    `vllm-aimer score` process is benchmarked against a plain read in `make bench`)."""
    model = tiny_checkpoint("qwen3_moe", dtype=torch.bfloat16, max_shard_size="1MB")
    out = tmp_path / "plan"
    commands = [["score", str(model), "--ratio", "0.5", "--output", str(out), "--quiet"],
                ["inspect", str(model)], ["plan", str(model), str(out)],
                ["fit", str(model), "--gpus", "1"]]
    for argv in commands:
        proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *argv], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "LOADED []", (argv[0], proc.stdout[-500:])


@pytest.mark.parametrize("args, needle", [
    (["plan", "{model}", "{plan}", "--ratio", "1.5"], "prune_ratio must be in [0, 1), got 1.5."),
    (["plan", "{model}", "{plan}", "--ratio", "half"], "--ratio must be a number, got 'half'."),
    (["plan", "{model}", "{plan}", "--ratio", "nan"], "--ratio must be a finite number"),
    (["score", "{model}", "--ratio", "0.5", "--output", "{out}", "--threads", "0"],
     "--threads must be a positive integer, got '0'."),
], ids=["ratio_out_of_range", "ratio_word", "ratio_nan", "threads_zero"])
def test_bad_numbers_name_what_is_wrong(runs, args, needle, capsys, tmp_path):
    """A number out of range is not called "not a number" (AimerError is a ValueError,
    so the parse and the range check must not share one except clause)."""
    fill = {"model": runs["model"], "plan": runs["root"] / "authors" / "pruned_experts.json",
            "out": tmp_path / "out"}
    from vllm_aimer.cli import main

    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "out").exists()
