"""Plans from neighbouring tools load as they are: each file is built the way its
producer writes it (tests/helpers/plan_files.py) from a decision the test makes, and
must come back as exactly that decision, or be refused with the reason. `plan convert`
round-trips a plan through every writable format.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from tests.helpers import plan_files
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.cli import main
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import expert_layout
from vllm_aimer.plan_formats import detect_format, read_plan_file

E = 16


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe")
    ckpt = open_checkpoint(model)
    return model, ckpt, expert_layout(ckpt)


@pytest.fixture(scope="module")
def deepseek(tiny_checkpoint):
    """Dense layer 0, MoE layers 1..3, 4 expert groups."""
    model = tiny_checkpoint("deepseek_v3")
    ckpt = open_checkpoint(model)
    return model, ckpt, expert_layout(ckpt)


def decision_of(plan) -> dict[int, list[int]]:
    return {int(k): v for k, v in plan.pruned_experts().items()}


def read(path: Path, checkpoint, ratio=None):
    _, ckpt, layout = checkpoint
    return read_plan_file(path, layout, ckpt, ratio)


def refused(path: Path, checkpoint, *needles: str, ratio=None) -> str:
    with pytest.raises(AimerError) as info:
        read(path, checkpoint, ratio)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert "Fix:" in message
    return message


# --------------------------------------------------------------------------- the AIMER authors

def test_authors_pruned_experts_json(qwen, tmp_path):
    decision = plan_files.random_decision([0, 1, 2, 3], E, 6, seed=1)
    path = plan_files.authors_pruned_experts(tmp_path, decision)
    plan = read(path, qwen)
    assert decision_of(plan) == decision and plan.kept_per_layer == 10
    assert plan.ratio == 6 / 16


def test_authors_empty_pruned_experts_prunes_nothing(qwen, tmp_path):
    """Their script writes {} when k rounds to 0 (it lists only layers that prune)."""
    path = plan_files.authors_pruned_experts(tmp_path, {0: [], 1: [], 2: [], 3: []})
    assert path.read_text() == "{}"
    plan = read(path, qwen)
    assert plan.total_pruned == 0 and plan.kept_per_layer == E


def test_authors_pruning_plan_json_takes_ids_from_its_sibling(qwen, tmp_path):
    decision = plan_files.random_decision([0, 1, 2, 3], E, 4, seed=2)
    path = plan_files.authors_pruning_plan(tmp_path, decision, E)
    assert detect_format(json.loads(path.read_text())) == "pruning-plan"
    assert decision_of(read(path, qwen)) == decision
    # Counts that disagree with the ids are refused ...
    data = json.loads(path.read_text())
    data["plan"][1]["pruned_experts"] = 5
    path.write_text(json.dumps(data, indent=2))
    refused(path, qwen, "disagree", "pruned_experts.json")
    # ... and so is a pruning_plan.json without its ids.
    (tmp_path / "pruned_experts.json").unlink()
    refused(path, qwen, "counts only", "pruned_experts.json")


# --------------------------------------------------------------------------- vLLM profiles

def test_vllm_riy_profile_version_1(qwen, tmp_path):
    decision = plan_files.random_decision([0, 1, 2, 3], E, 8, seed=3)
    path = plan_files.vllm_profile(tmp_path, decision)
    assert decision_of(read(path, qwen)) == decision


def test_vllm_42613_and_shape_profiles(qwen, tmp_path):
    decision = plan_files.random_decision([0, 1, 2, 3], E, 4, seed=4)
    pairs = [[layer, e] for layer, ids in decision.items() for e in ids]
    # #42613: version and pairs only (its tests write exactly this); SHAPE adds _metadata.
    bare = tmp_path / "pruned_experts_profile.json"
    bare.write_text(json.dumps({"version": 1, "pruned_experts": pairs}))
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"version": 1, "pruned_experts": pairs[::-1],
                                 "_metadata": {"source": "SHAPE", "kept": "..."}}))
    assert decision_of(read(bare, qwen)) == decision == decision_of(read(shape, qwen))


def test_vllm_riy_version_2(qwen, tmp_path):
    decision = plan_files.random_decision([0, 1, 2, 3], E, 8, seed=5)
    ok = plan_files.vllm_profile(tmp_path, decision, version=2, routing_mode="pre_topk_mask")
    assert decision_of(read(ok, qwen)) == decision
    drop = plan_files.vllm_profile(tmp_path, decision, version=2, routing_mode="post_topk_drop",
                                   name="drop.json")
    refused(drop, qwen, "post_topk_drop", "different model", "pre_topk_mask")
    odd = plan_files.vllm_profile(tmp_path, decision, version=1, routing_mode="pre_topk_mask",
                                  name="odd.json")
    refused(odd, qwen, "version-1 profile has no routing_mode")


def test_vllm_profile_mistakes(qwen, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": 1, "pruned_experts": [[0, 1], [0, 1]]}))
    refused(path, qwen, "twice")
    path.write_text(json.dumps({"version": 1, "pruned_experts": [[0, -1]]}))
    refused(path, qwen, "non-negative")
    # RIY's activation statistics are not a plan.
    path.write_text(json.dumps({"num_layers": 4, "num_experts": 16,
                                "layers": [{"layer": 0, "freq": [1] * 16, "weight_sum": [0.5] * 16}]}))
    refused(path, qwen, "statistics, not a plan")


# --------------------------------------------------------------------------- vllm-ascend

def test_vllm_ascend_lines_prune_the_tail_by_their_own_count(qwen, tmp_path):
    """vllm-ascend keeps int(E x (1 - ratio)) per layer: 0.35 of 16 keeps 10 (prunes 6),
    where our global rounding of 0.35 would prune 5; the file's producer decides."""
    decision = plan_files.random_decision([0, 1, 2, 3], E, 6, seed=6)
    path = plan_files.ascend_lines(tmp_path, decision, E, drop_tail=2)
    assert len(path.read_text().splitlines()) == 4
    plan = read(path, qwen, ratio=0.35)
    assert decision_of(plan) == decision and plan.kept_per_layer == 10


def test_vllm_ascend_needs_its_ratio_and_only_it_takes_one(qwen, tmp_path):
    decision = plan_files.random_decision([0, 1, 2, 3], E, 8, seed=7)
    path = plan_files.ascend_lines(tmp_path, decision, E)
    refused(path, qwen, "vllm-ascend", "prune_ratio")
    # A list shorter than the count the ratio keeps.
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({str(x): [0, 1, 2]}) for x in range(4)))
    refused(short, qwen, "orders 3 experts", "keeps int(16 x (1 - 0.5)) = 8", ratio=0.5)
    # A ratio next to any other format: both given.
    other = plan_files.vllm_profile(tmp_path, decision)
    refused(other, qwen, "both given", "only one", ratio=0.5)


def test_vllm_ascend_single_line_file(tiny_checkpoint, tmp_path):
    """One MoE layer: a one-line JSONL file parses as plain JSON; the ratio tells it apart
    from the authors' pruned_experts.json."""
    model = tiny_checkpoint("qwen3_moe", num_layers=1)
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    decision = {0: [1, 3, 5, 7]}
    path = plan_files.ascend_lines(tmp_path, decision, E)
    plan = read_plan_file(path, layout, ckpt, 0.25)
    assert decision_of(plan) == decision


# --------------------------------------------------------------------------- llm-compressor

def test_llm_compressor_reap_report(qwen, tmp_path):
    decision = plan_files.random_decision([0, 1, 2, 3], E, 4, seed=8)
    path = plan_files.llm_compressor_report(tmp_path, decision, E)
    assert path.read_text().startswith('{"model.layers.0.mlp": [')
    assert decision_of(read(path, qwen)) == decision


def test_llm_compressor_names_transformers_modules(tiny_checkpoint, tmp_path):
    """Mixtral's checkpoint says block_sparse_moe; transformers 5 (whose module names
    llm-compressor writes) says mlp: only the layer index counts."""
    model = tiny_checkpoint("mixtral")
    ckpt = open_checkpoint(model)
    assert any(".block_sparse_moe." in n for n in ckpt.tensors)
    decision = plan_files.random_decision([0, 1, 2, 3], E, 8, seed=9)
    path = plan_files.llm_compressor_report(tmp_path, decision, E, block="mlp")
    assert decision_of(read_plan_file(path, expert_layout(ckpt), ckpt)) == decision


def test_llm_compressor_group_limited_router(deepseek, tmp_path):
    decision = plan_files.random_decision([1, 2, 3], E, 8, n_group=4, seed=10)
    path = plan_files.llm_compressor_report(tmp_path, decision, E)
    assert decision_of(read(path, deepseek)) == decision
    unbalanced = {layer: list(range(8)) for layer in (1, 2, 3)}  # groups 0 and 1 only
    path = plan_files.llm_compressor_report(tmp_path, unbalanced, E)
    refused(path, deepseek, "expert groups")


# --------------------------------------------------------------------------- layer indices

def test_moe_ordinals_are_refused_with_the_diagnosis(deepseek, tmp_path):
    decision = plan_files.random_decision([0, 1, 2], E, 4, n_group=4, seed=11)
    path = plan_files.vllm_profile(tmp_path, decision)
    refused(path, deepseek, "MoE ordinals", "decoder layers", "[1, 2, 3]")


def test_a_layer_without_experts_is_refused(deepseek, tmp_path):
    decision = plan_files.random_decision([0, 1, 2, 3], E, 4, n_group=4, seed=12)
    path = plan_files.llm_compressor_report(tmp_path, decision, E)
    refused(path, deepseek, "different checkpoint", "layer(s) [0] have no routed experts")


def test_non_uniform_plans_are_refused_with_the_reason(qwen, deepseek, tmp_path):
    decision = plan_files.random_decision([1, 2], E, 4, n_group=4, seed=13)
    # Layer 3 left out of a profile: it would keep all 16 experts.
    path = plan_files.vllm_profile(tmp_path, decision)
    refused(path, deepseek, "none in layers [3]", "one expert count")
    uneven = plan_files.random_decision([0, 1, 2, 3], E, 4, seed=14)
    uneven[2] = uneven[2] + [e for e in range(E) if e not in uneven[2]][:2]
    for writer in (plan_files.authors_pruned_experts, plan_files.vllm_profile):
        refused(writer(tmp_path, uneven), qwen, "one expert count")
    refused(plan_files.ascend_lines(tmp_path, {0: [1], 1: [2], 2: [3]}, E), qwen,
            "no expert list for MoE layer(s) [3]", ratio=0.5)


def test_unknown_content_is_refused(qwen, tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"experts": {"a": 1}}))
    refused(path, qwen, "no plan format", "vLLM #37824/#42613")
    path.write_text("{not json\nat all")
    refused(path, qwen, "neither valid JSON nor JSON Lines")


# --------------------------------------------------------------------------- CLI

def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_plan_command_reads_every_format(qwen, tmp_path):
    model = str(qwen[0])
    decision = plan_files.random_decision([0, 1, 2, 3], E, 8, seed=15)
    path = plan_files.ascend_lines(tmp_path, decision, E)
    code, out, err = cli("plan", model, str(path), "--ratio", "0.5", "--output",
                         str(tmp_path / "ours"))
    assert code == 0, err
    assert "vllm-ascend ordered expert lists" in out and "16 -> 8" in out
    written = json.loads((tmp_path / "ours" / "pruned_experts.json").read_text())
    assert written == {str(k): v for k, v in decision.items()}
    code, _, err = cli("plan", model, str(path))
    assert code == 2 and "prune_ratio" in err


def test_plan_convert_round_trip(qwen, tmp_path):
    """Ours -> vLLM profile -> vllm-ascend (with its ratio) -> llm-compressor ->
    authors' pruned_experts.json -> ours: the same decision, and each file in its
    producer's shape."""
    model = str(qwen[0])
    code, _, err = cli("score", model, "--ratio", "0.5", "--output", str(tmp_path / "scored"),
                       "--quiet")
    assert code == 0, err
    start = tmp_path / "scored" / "plan.json"
    want = {int(k): v for k, v in json.loads(
        (tmp_path / "scored" / "pruned_experts.json").read_text()).items()}
    ratio: list[str] = []
    chain = [("vllm-profile", "profile.json"), ("vllm-ascend", "lists.jsonl"),
             ("llm-compressor", "reap.json"), ("pruned-experts", "authors.json"),
             ("vllm-aimer", "plan.json")]
    current = start
    for fmt, name in chain:
        out = tmp_path / "convert" / name
        extra = ["--ratio", ratio[-1]] if current.suffix == ".jsonl" else []
        code, _, err = cli("plan", "convert", str(current), "--to", fmt, "--checkpoint", model,
                           "--output", str(out), *extra)
        assert code == 0, err
        if fmt == "vllm-ascend":
            ratio.append(err.split("expert_prune_ratio ")[1].split()[0])
        current = out
    files = tmp_path / "convert"
    profile = json.loads((files / "profile.json").read_text())
    assert profile["version"] == 1
    assert profile["pruned_experts"] == [[k, e] for k, v in sorted(want.items()) for e in v]
    lines = [json.loads(line) for line in (files / "lists.jsonl").read_text().splitlines()]
    assert [list(d) for d in lines] == [["0"], ["1"], ["2"], ["3"]]
    keep = int(E * (1.0 - float(ratio[0])))  # vllm-ascend's own count
    assert keep == 8
    for d in lines:
        (layer, ordered), = d.items()
        assert sorted(ordered) == list(range(E))
        assert sorted(ordered[keep:]) == want[int(layer)]
    reap = json.loads((files / "reap.json").read_text())
    assert reap == {f"model.layers.{k}.mlp": [e for e in range(E) if e not in v]
                    for k, v in sorted(want.items())}
    assert json.loads((files / "authors.json").read_text()) == {str(k): v for k, v in want.items()}
    back = json.loads((files / "plan.json").read_text())
    assert {int(k): lp["pruned"] for k, lp in back["layers"].items()} == want
    assert back["checkpoint"] == json.loads(start.read_text())["checkpoint"]


def test_plan_convert_to_stdout_and_bad_format(qwen, tmp_path):
    decision = plan_files.random_decision([0, 1, 2, 3], E, 8, seed=16)
    path = plan_files.authors_pruned_experts(tmp_path, decision)
    code, out, _ = cli("plan", "convert", str(path), "--to", "vllm-profile", "--checkpoint",
                       str(qwen[0]))
    assert code == 0 and json.loads(out)["pruned_experts"][0] == [0, decision[0][0]]
    with pytest.raises(SystemExit):
        cli("plan", "convert", str(path), "--to", "gguf", "--checkpoint", str(qwen[0]))
