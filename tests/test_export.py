"""`vllm-aimer export`: the written checkpoint is the test's own slice of the source, byte
for byte, for every layout (per-expert, fused, shared experts with groups and an MTP
layer, block-FP8, MXFP4); its config, shards, index and side files are right;
transformers loads it and computes what it computes on the test's slice; and a failed
or refused export leaves no file behind.

Expected tensors come from tests/helpers/reference.py (its own slicing and AIMER), plan
files from tests/helpers/plan_files.py (written as their producers write them).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import plan_files
from tests.helpers.reference import (EXPERT_COUNT_KEYS, expert_count, hf_logprobs, load_tensors,
                                     read_header, reference_pruned, reference_scores,
                                     slice_checkpoint, sliced_tensors)
from vllm_aimer.cli import main

SHARD = 300_000
"""--max-shard-size in bytes: several shards even for the tiny checkpoints."""
PROMPTS = [[5, 17, 42, 9, 100, 33], [1, 2, 3, 4], [7]]

# case: (family, build_tiny_moe kwargs, plan source, experts pruned per layer)
CASES = {
    "qwen3_moe": ("qwen3_moe", {}, "ratio", 8),
    "qwen3_moe_fused": ("qwen3_moe", {"fused": True}, "pruned-experts", 6),
    "qwen2_moe_shared": ("qwen2_moe", {}, "pruning-plan", 8),
    "deepseek_v3_mtp": ("deepseek_v3", {"mtp_layers": 1}, "vllm-profile", 8),
    "qwen3_moe_fp8": ("qwen3_moe", {"fp8_block": (32, 32)}, "llm-compressor", 4),
    "gpt_oss_mxfp4": ("gpt_oss", {"mxfp4": True}, "vllm-ascend", 8),
}


def run_cli(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def moe_layers(model: Path) -> tuple[list[int], list[int]]:
    """(trunk, MTP) layers with routed experts, from the checkpoint's own tensors."""
    config = json.loads((model / "config.json").read_text())
    layers = sorted(reference_scores(model))
    trunk = [x for x in layers if x < config["num_hidden_layers"]]
    return trunk, [x for x in layers if x >= config["num_hidden_layers"]]


def write_plan(source: str, directory: Path, decision: dict[int, list[int]],
               experts: int) -> list[str]:
    """CLI arguments passing `decision` as a plan file of format `source`."""
    directory.mkdir(parents=True, exist_ok=True)
    if source == "pruned-experts":
        return ["--plan", str(plan_files.authors_pruned_experts(directory, decision))]
    if source == "pruning-plan":
        return ["--plan", str(plan_files.authors_pruning_plan(directory, decision, experts))]
    if source == "vllm-profile":
        return ["--plan", str(plan_files.vllm_profile(directory, decision))]
    if source == "llm-compressor":
        return ["--plan", str(plan_files.llm_compressor_report(directory, decision, experts))]
    if source == "vllm-ascend":
        k = len(next(iter(decision.values())))
        return ["--plan", str(plan_files.ascend_lines(directory, decision, experts)),
                "--ratio", str(k / experts)]
    raise ValueError(source)


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    """case -> (source dir, export dir, expected pruned ids per layer incl. MTP, CLI stdout)."""
    out = {}
    for case, (family, kwargs, source, k) in CASES.items():
        model = tiny_checkpoint(family, **kwargs)
        root = tmp_path_factory.mktemp(f"export-{case}")
        config = json.loads((model / "config.json").read_text())
        experts, n_group = expert_count(config), config.get("n_group") or 1
        trunk, mtp = moe_layers(model)
        if source == "ratio":
            args = ["--ratio", str(k / experts)]
            expected = reference_pruned({x: reference_scores(model)[x] for x in trunk},
                                        k / experts, n_group)
        else:
            expected = plan_files.random_decision(trunk, experts, k, n_group, seed=len(case))
            args = write_plan(source, root / "plan", expected, experts)
        for layer in mtp:
            # Foreign plans have no MTP layers: the export scores them with AIMER.
            expected |= reference_pruned({layer: reference_scores(model)[layer]},
                                         k / experts, n_group)
        dest = root / "out"
        code, stdout, stderr = run_cli("export", str(model), *args, "--output", str(dest),
                                       "--max-shard-size", str(SHARD), "--quiet")
        assert code == 0, stderr
        out[case] = (model, dest, expected, stdout)
    return out


@pytest.fixture(params=list(CASES))
def case(request, exports):
    return (request.param, *exports[request.param])


def test_tensors_are_the_reference_slice_byte_for_byte(case):
    name, model, dest, expected, _ = case
    got, want = load_tensors(dest), sliced_tensors(model, expected)
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, key
        assert torch.equal(got[key].reshape(-1).view(torch.uint8),
                           t.reshape(-1).view(torch.uint8)), key
    # Sharp: the export is smaller than the source.
    size = sum(t.numel() * t.element_size() for t in got.values())
    assert size < sum(t.numel() * t.element_size() for t in load_tensors(model).values())


def test_config_has_the_kept_count_and_nothing_else_changes(case):
    name, model, dest, expected, _ = case
    source = json.loads((model / "config.json").read_text())
    written = json.loads((dest / "config.json").read_text())
    kept = expert_count(source) - len(next(iter(expected.values())))
    for key, value in written.items():
        if key in EXPERT_COUNT_KEYS:
            assert value == kept, key
        else:
            assert value == source[key], key
    assert set(source) <= set(written)
    assert set(written) - set(source) <= set(EXPERT_COUNT_KEYS)
    if "quantization_config" in source:  # packed bytes unchanged, so the same config
        assert written["quantization_config"] == source["quantization_config"]


def test_shards_and_index(case):
    name, model, dest, _, _ = case
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in dest.glob("*.safetensors"))
    assert len(files) > 1
    total = 0
    for file in files:
        header = read_header(dest / file)
        with open(dest / file, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
        size = (dest / file).stat().st_size
        spans = sorted(tuple(h["data_offsets"]) for h in header.values())
        # Contiguous, no holes, the file ends with the last tensor.
        assert spans[0][0] == 0 and spans[-1][1] == size - start
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        per_tensor = {n: h["data_offsets"][1] - h["data_offsets"][0] for n, h in header.items()}
        assert sum(per_tensor.values()) <= SHARD or len(per_tensor) == 1
        for n, h in header.items():
            assert index["weight_map"][n] == file
            width = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "F64": 8}.get(h["dtype"], 1)
            assert (start + h["data_offsets"][0]) % width == 0, n  # aligned
        total += sum(per_tensor.values())
    assert index["metadata"]["total_size"] == total
    assert len(index["weight_map"]) == len(load_tensors(dest))


def test_side_files_are_copied_and_provenance_is_recorded(case):
    name, model, dest, expected, stdout = case
    for f in model.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json",
                                                         "model.safetensors.index.json"):
            assert (dest / f.name).read_bytes() == f.read_bytes(), f.name
    assert (dest / "tokenizer.json").is_file() and (dest / "chat_template.jinja").is_file()
    side = dest / "vllm-aimer"
    prov = json.loads((side / "provenance.json").read_text())
    import vllm_aimer

    assert prov["vllm_aimer_version"] == vllm_aimer.__version__
    assert prov["source"]["path"] == str(model.resolve())
    assert len(prov["source"]["fingerprint"]) == 64
    kept_experts = expert_count(json.loads((model / "config.json").read_text()))
    k = len(next(iter(expected.values())))
    assert prov["ratio"] == pytest.approx(k / kept_experts)
    assert prov["experts_per_layer"] == kept_experts - k
    assert ("mean(|w|) / rms(w)" in prov["criterion"]) == (CASES[name][2] == "ratio"
                                              or name == "deepseek_v3_mtp")
    # The plan files say what was pruned, in the source's numbering.
    pruned = json.loads((side / "pruned_experts.json").read_text())
    trunk = {x: v for x, v in expected.items() if str(x) in pruned}
    assert pruned == {str(x): v for x, v in trunk.items()}
    profile = json.loads((side / "vllm_profile.json").read_text())
    assert profile["pruned_experts"] == [[x, e] for x, v in sorted(trunk.items()) for e in v]
    code, text, _ = run_cli("inspect", str(dest))
    assert code == 0
    assert "exported by       vllm-aimer" in text and str(model.resolve()) in text
    assert prov["source"]["fingerprint"][:16] in text


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe_shared", "deepseek_v3_mtp"])
def test_transformers_loads_the_export(exports, name, tmp_path):
    model, dest, expected, _ = exports[name]
    sliced = slice_checkpoint(model, tmp_path / "sliced", expected)
    got, want = hf_logprobs(dest, PROMPTS), hf_logprobs(sliced, PROMPTS)
    # The same weights (byte for byte, see above); transformers' CPU kernels may still
    # order float32 sums differently from one call to the next.
    assert max(abs(a[t] - b[t]) for a, b in zip(got, want) for t in a) <= 1e-5
    dense = hf_logprobs(model, PROMPTS)
    assert max(abs(a[t] - b[t]) for a, b in zip(got, dense) for t in a) > 1e-2


# --------------------------------------------------------------------------- failures

def no_leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_non_empty_output_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    code, _, err = run_cli("export", str(model), "--ratio", "0.5", "--output", str(dest))
    assert code == 2 and "is not empty" in err and "--force" in err
    assert no_leftovers(tmp_path, set()) == ["out"]
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]


def test_output_inside_the_source_is_refused(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    before = sorted(p.name for p in model.iterdir())
    for target in (model, model / "pruned"):
        code, _, err = run_cli("export", str(model), "--ratio", "0.5", "--output", str(target),
                               "--force")
        assert code == 2 and "source" in err, err
    assert sorted(p.name for p in model.iterdir()) == before


def test_a_plan_that_does_not_fit_leaves_nothing(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    decision = plan_files.random_decision([0, 1, 2, 3], 16, 4)
    decision[2] = decision[2][:3]  # non-uniform
    plan = plan_files.vllm_profile(tmp_path, decision)
    code, _, err = run_cli("export", str(model), "--plan", str(plan), "--output",
                           str(tmp_path / "out"))
    assert code == 2 and "one expert count" in err, err
    assert no_leftovers(tmp_path, {plan.name}) == []


def _export_with_file_size_limit(model: Path, dest: Path, limit: int, *more: str):
    """The CLI in a child whose files may not grow past `limit` bytes (as on a full disk:
    writes fail with EFBIG instead of the default SIGXFSZ)."""
    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "vllm_aimer.cli", "export", str(model),
                           "--ratio", "0.5", "--output", str(dest), "--quiet", *more],
                          capture_output=True, text=True, preexec_fn=limit_files, timeout=300)


def test_a_failure_while_writing_leaves_nothing(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    # Shards of 1 MB, but no file may exceed 400 kB: the first shard fails half-written.
    proc = _export_with_file_size_limit(model, tmp_path / "out", 400_000,
                                        "--max-shard-size", "1MB")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "writing the export failed (File too large)" in proc.stderr
    assert "nothing was left" in proc.stderr and "Fix:" in proc.stderr
    assert no_leftovers(tmp_path, set()) == []


def test_force_replaces_only_once_the_new_export_is_complete(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("previous export")
    proc = _export_with_file_size_limit(model, dest, 400_000, "--max-shard-size", "1MB",
                                        "--force")
    assert proc.returncode == 2 and "previous contents are untouched" in proc.stderr
    assert no_leftovers(tmp_path, set()) == ["out"]
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    code, _, err = run_cli("export", str(model), "--ratio", "0.5", "--output", str(dest),
                           "--force", "--quiet")
    assert code == 0, err
    assert not (dest / "old.txt").exists() and (dest / "config.json").is_file()
    assert no_leftovers(tmp_path, set()) == ["out"]
    assert oct((dest).stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- config.json

def _plan_and_map(family: str, tiny_checkpoint):
    """A real layout and a plan pruning experts 0..7 of every layer (for config tests)."""
    from vllm_aimer.checkpoint import open_checkpoint
    from vllm_aimer.layout import expert_layout
    from vllm_aimer.plan import plan_from_pruned_experts
    from vllm_aimer.weights import PlanMap

    ckpt = open_checkpoint(tiny_checkpoint(family))
    layout = expert_layout(ckpt)
    plan = plan_from_pruned_experts(layout, {str(x): list(range(8)) for x in layout.layers},
                                    ckpt.fingerprint, "test")
    return layout, plan, PlanMap(layout, plan)


def test_multimodal_config_gets_the_count_in_text_config(tiny_checkpoint):
    from vllm_aimer.export import pruned_config

    layout, plan, pmap = _plan_and_map("llama4", tiny_checkpoint)
    config = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
              "text_config": {"model_type": "llama4_text", "num_local_experts": 16,
                              "num_experts_per_tok": 1},
              "vision_config": {"num_hidden_layers": 2}}
    out = pruned_config(config, layout, plan, pmap)
    assert out["text_config"] == {"model_type": "llama4_text", "num_local_experts": 8,
                                  "num_experts_per_tok": 1}
    assert out["vision_config"] == config["vision_config"] and "num_local_experts" not in out
    assert config["text_config"]["num_local_experts"] == 16  # the source dict is untouched


def test_per_expert_quantization_entries_follow_the_plan(tiny_checkpoint):
    """Experts 8..15 are kept and become 0..7; entries of experts 0..7 go."""
    from vllm_aimer.errors import AimerError
    from vllm_aimer.export import pruned_config

    layout, plan, pmap = _plan_and_map("qwen3_moe", tiny_checkpoint)
    config = {"model_type": "qwen3_moe", "num_experts": 16, "quantization_config": {
        "quant_method": "fp8",
        "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate",
                                   "model.layers.0.mlp.experts.3.down_proj",
                                   "model.layers.1.mlp.experts.12.gate_proj",
                                   "model.layers.*.mlp.experts.*.up_proj"],
        "dynamic": {"model.layers.2.mlp.experts.9": {"bits": 8},
                    "model.layers.2.mlp.experts.1": {"bits": 8}}}}
    out = pruned_config(config, layout, plan, pmap)
    assert out["num_experts"] == 8 and out["num_local_experts"] == 8
    q = out["quantization_config"]
    assert q["modules_to_not_convert"] == ["lm_head", "model.layers.0.mlp.gate",
                                           "model.layers.1.mlp.experts.4.gate_proj",
                                           "model.layers.*.mlp.experts.*.up_proj"]
    assert q["dynamic"] == {"model.layers.2.mlp.experts.1": {"bits": 8}}
    config["quantization_config"]["ignore"] = [r"re:.*layers\.0\.mlp\.experts\.5\..*"]
    with pytest.raises(AimerError, match="names routed experts by id"):
        pruned_config(config, layout, plan, pmap)
