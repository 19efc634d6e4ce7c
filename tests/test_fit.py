"""`vllm-aimer fit`: sizes from configs and headers, the fit search, and the CLI.

The public configs in tests/fixtures/configs must reproduce the AIMER paper's weights
before and after 50% pruning (its "GB" are GiB) within 1%, and the exact parameter
counts the checkpoints publish. CLI runs start together in one fixture so their
interpreter start-ups overlap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_aimer.architectures import (
    FIT_FAMILIES, SUPPORTED_FAMILIES, architecture_for)
from vllm_aimer.errors import AimerError
from vllm_aimer.fit import (
    FitOptions, facts_from_checkpoint, facts_from_config, fit_json, fit_on, fit_options,
    kv_cache_bytes_per_token, kv_heads_per_gpu, load_model_facts, plan_fit, render_fit)
from vllm_aimer.units import GIB
from vllm_aimer.constraints import Router
from vllm_aimer.constraints import prune_count as _prune_count

CONFIGS = Path(__file__).parent / "fixtures" / "configs"

# (config, weights before and after 50% pruning in GiB, from the paper)
PAPER = {
    "olmoe-1b-7b": (12.89, 6.89),
    "ernie-4.5-21b-a3b": (40.66, 21.67),
    "qwen3-30b-a3b": (56.92, 29.93),
}


def prune_count(layers: int, experts: int, top_k: int, ratio: float) -> int:
    """The loader's k for a plain router (the rules live in vllm_aimer.constraints)."""
    return _prune_count(layers, Router(experts, top_k), ratio)


def load(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def facts(name: str):
    return facts_from_config(load(name))


# --------------------------------------------------------------------------- paper figures

@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_weights_before_and_after_half_pruning(name):
    dense_gib, pruned_gib = PAPER[name]
    f = facts(name)
    k = prune_count(len(f.moe_layers), f.num_experts, f.top_k, 0.5)
    assert k == f.num_experts // 2
    assert f.total_bytes / GIB == pytest.approx(dense_gib, rel=0.01)
    assert f.weight_bytes(k) / GIB == pytest.approx(pruned_gib, rel=0.01)


# Parameter counts the checkpoints publish: OLMoE-1B-7B-0924 and Qwen3-30B-A3B from their
# safetensors headers (all BF16); ERNIE-4.5-21B-A3B (same architecture in -PT and
# -Thinking) from the Hub's safetensors summary: 21,821,012,480 BF16 + 4,425,408 F32
# (the float32 router rows and score-correction biases).
@pytest.mark.parametrize("name, bf16, f32", [
    ("olmoe-1b-7b", 6_919_161_856, 0),
    ("qwen3-30b-a3b", 30_532_122_624, 0),
    ("ernie-4.5-21b-a3b", 21_821_012_480, 4_425_408),
])
def test_dense_bytes_equal_published_parameter_counts(name, bf16, f32):
    f = facts(name)
    assert f.total_bytes == 2 * bf16 + 4 * f32
    assert f.router_bytes == (4 * f32 if f32 else f.router_bytes)


def test_moe_layer_rules():
    ernie = facts("ernie-4.5-21b-a3b")
    assert ernie.moe_layers == tuple(range(1, 28))  # layer 0 is a dense MLP
    assert ernie.num_experts == 64 and ernie.top_k == 6
    assert facts("qwen3-30b-a3b").moe_layers == tuple(range(48))
    sparse = dict(load("qwen3-30b-a3b"), decoder_sparse_step=2, mlp_only_layers=[5])
    assert facts_from_config(sparse).moe_layers == tuple(i for i in range(1, 48, 2) if i != 5)


def test_kv_cache_bytes_per_token():
    q = facts("qwen3-30b-a3b")
    assert kv_cache_bytes_per_token(q) == 2 * 48 * 4 * 128 * 2
    assert kv_cache_bytes_per_token(q, "fp8") == 2 * 48 * 4 * 128
    assert kv_cache_bytes_per_token(facts("ernie-4.5-21b-a3b")) == 2 * 28 * 4 * 128 * 2
    # 4 KV heads over 8 GPUs: each GPU holds one replicated head, not half of one.
    assert [kv_heads_per_gpu(4, n) for n in (1, 2, 4, 8)] == [4, 2, 1, 1]


# --------------------------------------------------------------------------- headers vs config

def _tiny_ernie(directory: Path) -> Path:
    """A tiny ERNIE-4.5 MoE saved by transformers: a dense layer 0, shared experts,
    tied embeddings, float32 router and score-correction bias."""
    import torch
    import transformers

    cfg = transformers.Ernie4_5_MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, moe_num_experts=8,
        moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral", "ernie4_5_moe"])
def test_header_sizes_equal_config_sizes(family, tiny_checkpoint, tmp_path):
    directory = (_tiny_ernie(tmp_path / "ernie") if family == "ernie4_5_moe"
                 else tiny_checkpoint(family))
    from_headers = facts_from_checkpoint(directory)
    from_config = facts_from_config(json.loads((directory / "config.json").read_text()))
    assert from_headers.source == "safetensors headers"
    assert from_config.source == "config.json"
    assert (dataclasses.replace(from_headers, source="-")
            == dataclasses.replace(from_config, source="-"))
    assert from_headers.routed_expert_bytes > 0 and from_headers.router_bytes > 0


# Every routed-expert-indexed tensor of the families sized from headers only, and the
# KV cache each stores per token per layer (MLA: one kv_lora_rank + rope latent).
HEADER_ONLY = {
    "qwen2_moe": r"\.mlp\.experts\.\d+\.",
    "deepseek_v3": r"\.mlp\.experts\.\d+\.",
    "glm4_moe": r"\.mlp\.experts\.\d+\.",
    "llama4": r"\.feed_forward\.experts\.",
    "gpt_oss": r"\.mlp\.experts\.",
}


@pytest.mark.parametrize("family", sorted(HEADER_ONLY))
def test_header_only_families_are_sized_from_headers(family, tiny_checkpoint):
    import re

    from tests.helpers.reference import ROUTER_RE, header_bytes

    directory = tiny_checkpoint(family)
    config = json.loads((directory / "config.json").read_text())
    sizes = header_bytes(directory)
    f, _ = load_model_facts(directory)
    assert f.source == "safetensors headers"
    assert f.total_bytes == sum(sizes.values())
    experts = sum(b for n, b in sizes.items() if re.search(HEADER_ONLY[family], n))
    routers = sum(b for n, b in sizes.items() if ROUTER_RE.search(n))
    assert f.routed_expert_bytes == experts and f.router_bytes == routers > 0
    assert f.num_experts == 16
    # Half the experts pruned removes half the routed-expert and router bytes, nothing else.
    k = prune_count(len(f.moe_layers), 16, f.top_k, 0.5)
    assert k == 8 and f.weight_bytes(k) == f.total_bytes - (experts + routers) // 2
    per_layer = (config["kv_lora_rank"] + config["qk_rope_head_dim"] if family == "deepseek_v3"
                 else 2 * config["num_key_value_heads"] * config["head_dim"])
    assert kv_cache_bytes_per_token(f) == config["num_hidden_layers"] * per_layer * 4  # float32
    report = fit_json(plan_fit(f, fit_options(gpus=1, gpu_memory_gib=1, overhead_gib=0), directory))
    # [E, K]: experts per layer before and after pruning at --ratio (0.5 by default).
    assert report["experts_per_layer"] == [16, 16 - k]
    assert report["top_k"] == config["num_experts_per_tok"]
    assert report["pruned_weight_bytes"] == f.weight_bytes(8) and report["min_ratio"] == 0.0
    if config.get("n_group"):
        # Group-limited (4 groups of 4, tokens in 2 groups, top_k 2): fit only proposes
        # counts the loader accepts, multiples of 4 up to 12.
        assert (f.n_group, f.topk_group) == (4, 2) and f.prune_counts() == [0, 4, 8, 12]
        tight = fit_options(gpus=1, gpu_memory_gib=f.weight_bytes(5) / GIB, overhead_gib=0,
                            gpu_memory_utilization=1.0, max_model_len=16, max_num_seqs=1)
        assert fit_on(f, tight, 1, 16).pruned_per_layer == 8  # 5 without the groups


def test_directory_without_weights_uses_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(load("qwen3-30b-a3b")))
    f, model_dir = load_model_facts(tmp_path)
    assert f.source == "config.json" and model_dir == tmp_path
    f2, model_dir2 = load_model_facts(tmp_path / "config.json")
    assert f2 == f and model_dir2 == tmp_path


# --------------------------------------------------------------------------- the fit

@pytest.mark.parametrize("gpu_gib", [8, 16, 24, 48, 80])
@pytest.mark.parametrize("name", sorted(PAPER))
def test_min_ratio_is_monotone_in_gpu_count(name, gpu_gib):
    f = facts(name)
    opts = fit_options(gpu_memory_gib=gpu_gib, max_model_len=8192, max_num_seqs=4)
    rows = [fit_on(f, opts, n, 8192) for n in (1, 2, 4, 8, 16)]
    # Counts vLLM can shard over (ERNIE's 20 heads rule out 8 and 16).
    valid = [r for r in rows if not (r.reason or "").startswith("vLLM cannot")]
    assert len(valid) >= 3
    ks = [r.pruned_per_layer if r.fits else math.inf for r in valid]
    assert ks == sorted(ks, reverse=True)
    for r in valid:
        if r.fits:
            assert r.total_bytes <= r.budget_bytes
            # Pruning one expert fewer would not have fitted.
            if r.pruned_per_layer:
                heavier = math.ceil(f.weight_bytes(r.pruned_per_layer - 1) / r.gpus)
                assert heavier + r.kv_cache_bytes + r.overhead_bytes > r.budget_bytes
            # The ratio given to the loader prunes exactly that many experts.
            assert prune_count(len(f.moe_layers), f.num_experts, f.top_k,
                               float(r.ratio)) == r.pruned_per_layer


def test_tensor_parallel_sizes_vllm_rejects():
    ernie = facts("ernie-4.5-21b-a3b")
    row = fit_on(ernie, FitOptions(), 8, 4096)
    assert not row.fits and "20 attention heads" in row.reason
    assert fit_on(ernie, FitOptions(), 3, 4096).reason.startswith("vLLM cannot")


def test_fits_unpruned_and_command_without_aimer_flags():
    report = plan_fit(facts("olmoe-1b-7b"), fit_options(gpus=1), CONFIGS)
    assert report.requested.pruned_per_layer == 0
    assert report.command.startswith("vllm serve ")
    assert "--load-format" not in report.command
    assert report.exit_code == 0


def test_pruned_fit_command():
    opts = fit_options(gpus=2, gpu_memory_gib=24, max_model_len=8192, max_num_seqs=4,
                       kv_cache_dtype="fp8")
    report = plan_fit(facts("qwen3-30b-a3b"), opts, Path("/models/Qwen3 30B"))
    k = report.requested.pruned_per_layer
    assert 0 < k <= 120
    assert report.command == (
        "vllm serve '/models/Qwen3 30B' --tensor-parallel-size 2 --load-format aimer "
        f"--model-loader-extra-config '{{\"prune_ratio\": {k / 128!r}}}' --max-model-len 8192 "
        "--gpu-memory-utilization 0.9 --max-num-seqs 4 --kv-cache-dtype fp8")
    assert fit_json(report)["min_ratio"] == k / 128


@pytest.mark.parametrize("opts, why", [
    # Non-expert weights (2.85 GiB) cannot shrink; 3 GiB x 0.9 minus 1 GiB overhead is less.
    (dict(gpu_memory_gib=3, overhead_gib=1, max_model_len=16), "non-expert weights alone"),
    (dict(max_model_len=40960, max_num_seqs=1024), "KV cache alone (40960 tokens x 1024"),
    (dict(gpu_memory_gib=8), "non-expert weights and KV cache together"),
    (dict(gpu_memory_gib=6, max_model_len=1024), "top_k experts every layer must keep"),
])
def test_nothing_fits_says_why_with_numbers(opts, why):
    f = facts("qwen3-30b-a3b")
    report = plan_fit(f, fit_options(gpus=1, **opts), CONFIGS)
    row = report.requested
    assert not row.fits and report.exit_code == 1 and report.command is None
    assert why in row.reason
    assert "even at the max ratio 0.9375 (8 of 128 experts kept per layer)" in row.reason
    assert f"non-expert weights {f.non_expert_bytes / GIB:.2f} GiB" in row.reason
    assert f"> {row.budget_bytes / GIB:.2f} GiB" in row.reason
    text = render_fit(report)
    assert "No prune ratio fits" in text and why in text


# --------------------------------------------------------------------------- architecture lookup

def test_serving_and_fit_lookups_accept_ernie():
    config = load("ernie-4.5-21b-a3b")
    assert architecture_for(config).family == "ernie4_5_moe"
    assert architecture_for(config, purpose="fit").family == "ernie4_5_moe"
    assert SUPPORTED_FAMILIES == ("qwen3_moe", "qwen3_vl_moe", "olmoe", "mixtral", "qwen2_moe",
                                  "qwen3_next", "qwen3_5_moe", "minimax_m2",
                                  "deepseek", "glm4_moe", "deepseek_v32", "glm_moe_dsa",
                                  "glm4_moe_lite", "kimi_k2", "ernie4_5_moe", "llama4", "gpt_oss")
    # fit sizes from config only the families whose ShapeModel it can size; the others
    # from a checkpoint's headers.
    assert FIT_FAMILIES == ("qwen3_moe", "olmoe", "mixtral", "ernie4_5_moe")
    with pytest.raises(AimerError, match=r"not a Mixture-of-Experts family .* \(supported: qwen3_moe"):
        architecture_for({"model_type": "llama"}, purpose="fit")
    with pytest.raises(AimerError, match="from config.json alone .* checkpoint directory"):
        architecture_for({"model_type": "gpt_oss"}, purpose="fit")
    # Sized from a checkpoint's headers, every family is (the loader's lookup).
    assert architecture_for({"model_type": "gpt_oss"}).family == "gpt_oss"


def test_loader_path_finds_ernie_experts(tmp_path):
    """The loader finds experts through expert_layout: ERNIE's MoE layers start at 1."""
    from vllm_aimer.checkpoint import open_checkpoint
    from vllm_aimer.layout import expert_layout

    layout = expert_layout(open_checkpoint(_tiny_ernie(tmp_path / "ernie")))
    assert layout.arch.family == "ernie4_5_moe"
    assert layout.layers == (1, 2) and layout.num_experts == 8 and layout.top_k == 2


def test_option_checks():
    assert fit_options() == FitOptions()
    for kwargs, flag in [({"gpus": 0}, "--gpus"), ({"gpus": "2.5"}, "--gpus"),
                         ({"gpu_memory_utilization": 0}, "--gpu-memory-utilization"),
                         ({"gpu_memory_utilization": "90"}, "--gpu-memory-utilization"),
                         ({"gpu_memory_gib": "-1"}, "--gpu-memory-gib"),
                         ({"overhead_gib": "nan"}, "--overhead-gib"),
                         ({"max_num_seqs": "0"}, "--max-num-seqs"),
                         ({"kv_cache_dtype": "int4"}, "--kv-cache-dtype")]:
        with pytest.raises(AimerError, match=flag):
            fit_options(**kwargs)


# --------------------------------------------------------------------------- the console script

def _broken_configs(root: Path) -> dict[str, Path]:
    missing = load("qwen3-30b-a3b")
    del missing["hidden_size"]
    quantized = dict(load("qwen3-30b-a3b"), quantization_config={"quant_method": "gptq"})
    paths = {"missing_key": missing, "llama": {"model_type": "llama", "torch_dtype": "bfloat16"},
             "quantized": quantized}
    out = {}
    for name, config in paths.items():
        out[name] = root / f"{name}.json"
        out[name].write_text(json.dumps(config))
    (root / "not-json.json").write_text("{")
    out["not_json"] = root / "not-json.json"
    return out


BAD = {
    "gpus_zero": (["--gpus", "0"], "--gpus must be a positive integer"),
    "gpus_word": (["--gpus", "two"], "--gpus must be a number"),
    "util_high": (["--gpu-memory-utilization", "1.5"], "must be in (0, 1]"),
    "util_zero": (["--gpu-memory-utilization", "0"], "must be in (0, 1]"),
    "memory": (["--gpu-memory-gib", "0"], "--gpu-memory-gib must be positive"),
    "len": (["--max-model-len", "-5"], "--max-model-len must be a positive integer"),
    "kv_dtype": (["--kv-cache-dtype", "int3"], "not a vLLM KV cache dtype"),
    "ratio_below_top_k": (["--ratio", "0.99"], "fewer than top_k=8"),
    "ratio_one": (["--ratio", "1"], "prune_ratio must be in [0, 1)"),
}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint):
    """The console script as users run it, for the outputs; bad inputs run in-process."""
    qwen = CONFIGS / "qwen3-30b-a3b.json"
    specs: dict[str, list] = {
        "json": [qwen, "--json"],
        "json_gpus": [qwen, "--json", "--gpus", "2", "--gpu-memory-gib", "24",
                      "--max-model-len", "8192"],
        "text_gpus": [qwen, "--gpus", "2", "--gpu-memory-gib", "24", "--max-model-len", "8192"],
        "no_fit": [qwen, "--gpus", "1", "--gpu-memory-gib", "8"],
        "no_fit_json": [qwen, "--gpus", "1", "--gpu-memory-gib", "8", "--json"],
        "checkpoint": [tiny_checkpoint("qwen3_moe"), "--json", "--gpus", "1"],
        "gpus_zero": [qwen, "--gpus", "0"],
        "ep_blackwell": [qwen, "--json", "--gpus", "8", "--gpu-memory-gib", "6",
                         "--max-model-len", "4096", "--expert-parallel", "--gpu", "blackwell"],
        "gpu_unknown": [qwen, "--gpu", "hopper"],
    }
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "vllm_aimer.cli", "fit", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in specs.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return results


def test_cli_json_keys(runs):
    rc, out, err = runs["json"]
    assert rc == 0, err
    data = json.loads(out)
    for key in ("dense_weight_bytes", "pruned_weight_bytes", "experts_per_layer",
                "kv_cache_bytes_per_token", "min_ratio", "table"):
        assert key in data
    f = facts("qwen3-30b-a3b")
    assert data["experts_per_layer"] == [128, 64] and data["top_k"] == 8
    assert data["dense_weight_bytes"] == f.total_bytes
    assert data["pruned_weight_bytes"] == f.weight_bytes(64)
    assert data["kv_cache_bytes_per_token"] == 98304
    assert data["min_ratio"] is None and data["gpus"] is None
    assert [row["gpus"] for row in data["table"]] == [1, 2, 4, 8]


def test_cli_json_with_gpus(runs):
    rc, out, err = runs["json_gpus"]
    assert rc == 0, err
    data = json.loads(out)
    row = next(r for r in data["table"] if r["gpus"] == 2)
    assert data["fits"] is True and data["min_ratio"] == row["min_ratio"] > 0
    assert data["serve_command"].startswith("vllm serve ")
    assert "--tensor-parallel-size 2 --load-format aimer" in data["serve_command"]
    assert f'{{"prune_ratio": {data["min_ratio"]!r}}}' in data["serve_command"]


def test_cli_text(runs):
    rc, out, err = runs["text_gpus"]
    assert rc == 0 and err == ""
    assert "On 2 GPUs: prune ratio" in out
    assert out.count("vllm serve ") == 1
    for n in (1, 2, 4, 8):
        assert any(line.split()[:1] == [str(n)] for line in out.splitlines())


def test_cli_offers_only_ratios_safe_for_the_ep_size_and_gpu(runs):
    """128 experts, top-8: with EP over the GPUs and Blackwell's kernels, a ratio must
    keep a multiple of lcm(GPUs, 4) experts; the row's minimum is the smallest such
    count that fits, and the serve command enables expert parallelism."""
    rc, out, err = runs["ep_blackwell"]
    assert rc == 0, err
    data = json.loads(out)
    assert data["expert_parallel"] is True and data["gpu"] == "blackwell"
    for row in data["table"]:
        if row["fits"] and row["pruned_experts_per_layer"]:
            kept = 128 - row["pruned_experts_per_layer"]
            assert kept % row["gpus"] == 0 and kept % 4 == 0 and kept > 8, row
    row8 = next(r for r in data["table"] if r["gpus"] == 8)
    assert row8["fits"] and row8["pruned_experts_per_layer"] % 8 == 0
    assert "--tensor-parallel-size 8 --enable-expert-parallel --load-format aimer" in \
        data["serve_command"]
    # Unconstrained, the same budget would have taken a count that is not a multiple of 8.
    f = facts("qwen3-30b-a3b")
    plain = plan_fit(f, fit_options(gpus=8, gpu_memory_gib=6, max_model_len=4096), Path("."))
    assert plain.requested.pruned_per_layer % 8 != 0
    rc, _, err = runs["gpu_unknown"]
    assert rc == 2 and "--gpu 'hopper' is not a GPU kind" in err and "blackwell" in err


def test_cli_nothing_fits(runs):
    rc, out, err = runs["no_fit"]
    assert rc == 1 and err == ""
    assert "No prune ratio fits: does not fit on 1 GPU even at the max ratio" in out
    assert not any(line.startswith("vllm serve") for line in out.splitlines())
    rc, out, _ = runs["no_fit_json"]
    data = json.loads(out)
    assert rc == 1 and data["fits"] is False and data["min_ratio"] is None
    assert data["serve_command"] is None and "KV cache" in data["reason"]


def test_cli_checkpoint_uses_headers(runs, tiny_checkpoint):
    rc, out, err = runs["checkpoint"]
    assert rc == 0, err
    data = json.loads(out)
    assert data["size_source"] == "safetensors headers"
    assert data["model"] == str(tiny_checkpoint("qwen3_moe"))
    assert data["min_ratio"] == 0.0 and "--load-format" not in data["serve_command"]


def test_cli_bad_input_exits_2_with_one_line(runs):
    rc, out, err = runs["gpus_zero"]
    assert rc == 2 and out == ""
    assert err.splitlines() == [
        "vllm-aimer: error: --gpus must be a positive integer, got '0'. Fix: pass how many "
        "GPUs to shard the model over with tensor parallelism, e.g. --gpus 2 (at least 1)."]


@pytest.mark.parametrize("name, message", [
    *[(name, message) for name, (_, message) in BAD.items()],
    ("missing_model", "does not exist"),
    ("missing_key", "config.json has no hidden_size"),
    ("llama", "not a Mixture-of-Experts family"),
    ("quantized", "quantized checkpoint"),
    ("not_json", "not a readable JSON config"),
])
def test_bad_input_one_line_on_stderr(name, message, tmp_path, capsys):
    from vllm_aimer.cli import main

    broken = _broken_configs(tmp_path)
    qwen = CONFIGS / "qwen3-30b-a3b.json"
    if name in BAD:
        argv = [qwen, *BAD[name][0]]
    else:
        argv = [broken.get(name, tmp_path / "no-such-model")]
    assert main(["fit", *map(str, argv)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vllm-aimer: error: ") and message in lines[0]
    assert "Fix: " in lines[0]


# --------------------------------------------------------------------------- quantized releases

# Published figures (no model hub here, so quoted from the releases' own pages):
# - FP8: deepseek-ai/DeepSeek-V3's model card: "The total size of DeepSeek-V3 models on
#   Hugging Face is 685B, which includes 671B of the Main Model weights and 14B of the
#   Multi-Token Prediction (MTP) Module weights" (Hugging Face counts safetensors
#   elements: float8 weights, float32 block scales, BF16 rest).
# - INT4: moonshotai/Kimi-K2-Thinking, native INT4 (compressed-tensors pack-quantized,
#   groups of 32, experts only): 594 GB of safetensors on Hugging Face.
# The headers are rebuilt from each release's config.json and tensor naming
# (tests/helpers/release_headers.py); fit then sizes them as it sizes any checkpoint.

def test_fp8_release_deepseek_v3_is_sized_from_headers():
    from tests.helpers.release_headers import fp8_block, release
    from vllm_aimer.fit import facts_for_checkpoint

    ckpt = release("deepseek-v3", linear=fp8_block, expert=fp8_block)
    elements = sum(t.numel for t in ckpt.tensors.values())
    main = sum(t.numel for n, t in ckpt.tensors.items() if not n.startswith("model.layers.61."))
    assert elements / 1e9 == pytest.approx(685, rel=0.01)
    assert main / 1e9 == pytest.approx(671, rel=0.01)
    f = facts_for_checkpoint(ckpt)
    assert (f.quantization, f.scorable, f.family) == ("fp8", True, "deepseek")
    # Trunk MoE layers 3..60; layer 61 is the MTP layer, pruned alike but not a trunk layer.
    assert f.moe_layers == tuple(range(3, 61)) and (f.num_experts, f.n_group) == (256, 8)
    assert f.total_bytes == sum(t.nbytes for t in ckpt.tensors.values())
    # Every routed expert: three float8 [2048, 7168]-sized matrices + their block scales.
    assert f.routed_expert_bytes == 59 * 256 * 3 * (2048 * 7168 + 16 * 56 * 4)
    assert f.total_bytes / 1e9 == pytest.approx(688.47, abs=0.01)


def test_int4_release_kimi_k2_thinking_is_sized_from_headers():
    from tests.helpers.release_headers import bf16, int4_g32, release
    from vllm_aimer.fit import facts_for_checkpoint

    ckpt = release("kimi-k2-thinking", linear=bf16, expert=int4_g32)
    f = facts_for_checkpoint(ckpt)
    assert f.total_bytes / 1e9 == pytest.approx(594, rel=0.01)
    assert f.family == "kimi_k2" and f.scorable
    assert f.quantization == "compressed-tensors (pack-quantized)"
    # Packed codes (8 per int32), BF16 scales per 32, the int64 shape: per projection.
    per_projection = 2048 * 7168 // 2 + 2048 * 7168 // 32 * 2 + 16
    assert f.routed_expert_bytes == 60 * 384 * 3 * per_projection
    report = plan_fit(f, fit_options(gpus=8), Path("/models/kimi-k2-thinking"))
    row = report.requested
    assert row is not None and row.fits and row.pruned_per_layer > 0
    assert "stored compressed-tensors (pack-quantized)" in render_fit(report)
    assert fit_json(report)["quantization"] == "compressed-tensors (pack-quantized)"


def test_quantized_tiny_checkpoint_sized_from_its_headers(tmp_path):
    """A GPTQ checkpoint: every expert tensor (codes, scales, zeros, g_idx) counts, and
    pruning k of E experts removes k/E of them."""
    from tests.helpers.reference import header_bytes
    from tests.quant_checkpoints import FORMATS, build

    model = build(tmp_path / "gptq", FORMATS["gptq-4b-g32-asym-v1"])
    f = facts_from_checkpoint(model)
    sizes = header_bytes(model)
    assert f.total_bytes == sum(sizes.values())
    experts = sum(b for n, b in sizes.items() if ".experts." in n)
    assert f.routed_expert_bytes == experts and f.quantization == "gptq (4-bit, group 32)"
    assert f.weight_bytes(4) == f.total_bytes - (experts + f.router_bytes) // 2
