"""`vllm-aimer eval` refuses bad inputs at once, naming the fix, before any engine starts."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.test_cli import console_script
from vllm_aimer.errors import AimerError
from vllm_aimer.eval_data import load_documents
from vllm_aimer.evaluate import parse_ratios, run_specs


@pytest.fixture(scope="module")
def bad_runs(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("qwen3_moe")
    root = tmp_path_factory.mktemp("eval-inputs")
    good = root / "good.txt"
    good.write_text("one document\nanother one\n")
    empty = root / "empty.txt"
    empty.write_text("\n   \n\n")
    broken = root / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    no_text = root / "no-text.jsonl"
    no_text.write_text('{"text": "fine"}\n{"title": "no text here"}\n')
    csv_file = root / "data.csv"
    csv_file.write_text("a,b\n")
    base = ["eval", str(model), "--output"]
    specs = {
        "missing_data": [*base, "OUT", "--data", str(root / "nope.txt")],
        "empty_data": [*base, "OUT", "--data", str(empty)],
        "bad_jsonl": [*base, "OUT", "--data", str(broken)],
        "no_text_jsonl": [*base, "OUT", "--data", str(no_text)],
        "wrong_suffix": [*base, "OUT", "--data", str(csv_file)],
        "ratio_one": [*base, "OUT", "--data", str(good), "--ratios", "0,1"],
        "ratio_negative": [*base, "OUT", "--data", str(good), "--ratios", "-0.1"],
        "ratio_text": [*base, "OUT", "--data", str(good), "--ratios", "0,half"],
        "ratio_below_top_k": [*base, "OUT", "--data", str(good), "--ratios", "0.95"],
        "unknown_criterion": [*base, "OUT", "--data", str(good), "--criteria",
                              "aimer,mystery"],
        "bad_limit": [*base, "OUT", "--data", str(good), "--limit", "0"],
    }
    env = dict(os.environ, TQDM_DISABLE="1")
    specs = {k: [str(root / k) if a == "OUT" else a for a in v] for k, v in specs.items()}
    procs = {k: subprocess.Popen([*console_script(), *v], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=root)
             for k, v in specs.items()}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[k] = (p.returncode, out, err)
    return root, results


FIXES = {
    "missing_data": ("does not exist", "Fix: pass a .txt file (one document per line)"),
    "empty_data": ("holds no documents", "with at least one non-empty document"),
    "bad_jsonl": ("broken.jsonl line 2 is not valid JSON", "Fix: write one JSON object per line"),
    "no_text_jsonl": ("line 2 has no \"text\" string", 'Fix: write e.g. {"text": "..."}'),
    "wrong_suffix": ("has suffix '.csv'", "Fix: pass a .txt file"),
    "ratio_one": ("ratio 1 is out of range", "Fix: pass ratios in [0, 1)"),
    "ratio_negative": ("ratio -0.1 is out of range", "Fix: pass ratios in [0, 1)"),
    "ratio_text": ("ratio 'half' is not a number", "Fix: pass ratios in [0, 1)"),
    "ratio_below_top_k": ("fewer than top_k=2", "Fix: use a prune_ratio of at most 0.875"),
    "unknown_criterion": ("unknown criterion 'mystery'", "Fix: use one or more of aimer, "
                                                          "magnitude, random"),
    "bad_limit": ("--limit must be a positive number", "Fix: pass e.g. --limit 100"),
}


@pytest.mark.parametrize("case", sorted(FIXES))
def test_bad_input_fails_at_once_with_the_fix(bad_runs, case):
    root, results = bad_runs
    rc, out, err = results[case]
    problem, fix = FIXES[case]
    assert rc == 2, (out, err)
    assert err.startswith("vllm-aimer: error: "), err
    assert problem in err and fix in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    # Nothing was started or written: the output directory was never even created.
    assert not (root / case).exists()


def test_documents_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("first line\n\n  \nsecond line\n")
    assert load_documents(txt) == ["first line", "second line"]
    assert load_documents(txt, limit=1) == ["first line"]
    jl = tmp_path / "d.jsonl"
    rows = [{"text": "plain"},
            {"model": "m", "prompt": "a completion prompt", "max_tokens": 5},
            {"prompt": ["batch one", "batch two"]},
            {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": [
                                            {"type": "text", "text": "hello"}]}]}]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_documents(jl) == ["plain", "a completion prompt", "batch one", "batch two",
                                  "be brief\nhello"]


def test_ratios_and_runs():
    assert parse_ratios("0.5, 0,0.25,0.5") == [0.0, 0.25, 0.5]
    specs = run_specs([0.0, 0.25, 0.5], ["aimer", "random"])
    assert [s.name for s in specs] == ["dense", "aimer-0.25", "random-0.25", "aimer-0.5",
                                       "random-0.5"]
    # The dense run is always made: it is the reference for top-1 agreement.
    assert [s.name for s in run_specs([0.5], ["aimer"])] == ["dense", "aimer-0.5"]
    with pytest.raises(AimerError, match="no ratio"):
        parse_ratios(",")
