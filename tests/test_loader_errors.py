"""Bad input to --load-format aimer fails in vLLM's own loader path, before the model
is built (so before any weight is allocated), with a message naming the problem and
the fix, and leaves nothing in plan_out.

These run the real loader with a real VllmConfig in this process. The only stand-in
is a spy around vLLM's `initialize_model` that records whether the model was built.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# A state directory of our own: the loader records its errors there for `vllm serve`
# to repeat at exit, which a pytest process need not do.
os.environ.setdefault("AIMER_STATE_DIR", tempfile.mkdtemp(prefix="aimer-loader-tests-"))

from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.model_loader import base_loader, get_model_loader  # noqa: E402

from vllm_aimer.errors import AimerError  # noqa: E402
from vllm_aimer.plugin import register  # noqa: E402

register()


@pytest.fixture
def built(monkeypatch):
    calls = []
    real = base_loader.initialize_model

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(base_loader, "initialize_model", spy)
    return calls


def load(model: Path, extra, tweak=None, **engine) -> None:
    """Load through vLLM's own loader lookup; `tweak(cfg)` edits the engine config first
    (for settings vLLM's CPU build refuses to create, see the tests that use it)."""
    cfg = EngineArgs(model=str(model), load_format="aimer", dtype="float32", max_model_len=256,
                     model_loader_extra_config=extra, **engine).create_engine_config()
    if tweak is not None:
        tweak(cfg)
    get_model_loader(cfg.load_config).load_model(cfg, cfg.model_config)


def expect_error(model: Path, extra, *needles: str, built=None, tweak=None, **engine) -> str:
    with pytest.raises(AimerError) as info:
        load(model, extra, tweak, **engine)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert "Fix:" in message, message
    if built is not None:
        assert not built, "the model was built before the error"
    return message


@pytest.fixture(scope="module")
def olmoe(tiny_checkpoint):
    return tiny_checkpoint("olmoe")


@pytest.mark.parametrize("ratio, needle", [(1.0, "[0, 1)"), (-0.1, "[0, 1)"),
                                           ("0.5", "must be a number"), (float("nan"), "[0, 1)")])
def test_bad_ratio(olmoe, built, tmp_path, ratio, needle):
    out = tmp_path / "plan"
    expect_error(olmoe, {"prune_ratio": ratio, "plan_out": str(out)}, needle, built=built)
    assert not out.exists() or not any(out.iterdir())


def test_ratio_leaving_fewer_than_top_k(olmoe, built, tmp_path):
    out = tmp_path / "plan"
    msg = expect_error(olmoe, {"prune_ratio": 0.95, "plan_out": str(out)},
                       "fewer than top_k=2", "at most 0.875", built=built)
    assert "keep 1 of 16" in msg
    assert not any(out.iterdir())


def test_ratio_and_plan_together(olmoe, built, tmp_path):
    """A ratio goes with a plan only for vllm-ascend's ordered lists (their tail is pruned);
    any other plan already fixes the experts."""
    plan = tmp_path / "pruned_experts.json"
    plan.write_text(json.dumps({str(layer): [0, 1, 2, 3] for layer in range(4)}))
    expect_error(olmoe, {"prune_ratio": 0.5, "plan": str(plan)}, "both given", "only one",
                 "vllm-ascend", built=built)


def test_vllm_ascend_lists_need_their_ratio(olmoe, built, tmp_path):
    lists = tmp_path / "experts.jsonl"
    lists.write_text("\n".join(json.dumps({str(layer): list(range(16))}) for layer in range(4)))
    expect_error(olmoe, {"plan": str(lists)}, "vllm-ascend", "prune_ratio", built=built)
    # With it, the loader gets as far as the count rules: 0.95 keeps int(16 x 0.05) = 0.
    expect_error(olmoe, {"plan": str(lists), "prune_ratio": 0.95}, "keeps no expert",
                 built=built)


def test_unknown_key_lists_valid_keys(olmoe, built):
    msg = expect_error(olmoe, {"prune_ration": 0.5}, "'prune_ration'", built=built)
    for key in ("prune_ratio", "plan", "plan_out", "num_threads"):
        assert key in msg


def test_neither_ratio_nor_plan(olmoe, built):
    expect_error(olmoe, {"plan_out": "/tmp/x"}, "needs prune_ratio or plan", built=built)


def _plan_file(tmp_path: Path, data) -> str:
    p = tmp_path / "pruned_experts.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


def test_plan_file_missing(olmoe, built, tmp_path):
    expect_error(olmoe, {"plan": str(tmp_path / "nope.json")}, "does not exist", built=built)


def test_plan_file_not_json(olmoe, built, tmp_path):
    expect_error(olmoe, {"plan": _plan_file(tmp_path, "{not json")}, "not valid JSON",
                 built=built)


def test_plan_with_wrong_layer_count(olmoe, built, tmp_path):
    plan = {str(layer): [0, 1] for layer in range(6)}
    expect_error(olmoe, {"plan": _plan_file(tmp_path, plan)}, "different checkpoint",
                 "6 MoE layers", built=built)


def test_plan_with_expert_ids_out_of_range(olmoe, built, tmp_path):
    plan = {str(layer): [3, 16] for layer in range(4)}
    expect_error(olmoe, {"plan": _plan_file(tmp_path, plan)}, "different checkpoint", "16",
                 built=built)


def test_plan_with_duplicate_ids(olmoe, built, tmp_path):
    plan = {str(layer): [3, 3] for layer in range(4)}
    expect_error(olmoe, {"plan": _plan_file(tmp_path, plan)}, "more than once", built=built)


def test_non_uniform_plan(olmoe, built, tmp_path):
    plan = {"0": [1], "1": [1, 2], "2": [1], "3": [1]}
    expect_error(olmoe, {"plan": _plan_file(tmp_path, plan)},
                 "vLLM builds every MoE layer with one expert count", built=built)


def test_plan_json_of_another_checkpoint(olmoe, tiny_checkpoint, built, tmp_path):
    from vllm_aimer.cli import main

    other = tiny_checkpoint("olmoe", seed=7)
    assert main(["score", str(other), "--ratio", "0.5", "--output", str(tmp_path / "o"),
                 "--quiet"]) == 0
    expect_error(olmoe, {"plan": str(tmp_path / "o" / "plan.json")},
                 "made for a different checkpoint", "fingerprint", built=built)


def test_dense_model_lists_supported_families(tmp_path, built):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(tmp_path / "dense")
    expect_error(tmp_path / "dense", {"prune_ratio": 0.5}, "'llama'", "qwen3_moe", "olmoe",
                 "mixtral", "without --load-format aimer", built=built)


def test_missing_shard(tiny_checkpoint, built, tmp_path):
    import shutil

    model = shutil.copytree(tiny_checkpoint("olmoe", max_shard_size="1MB"), tmp_path / "m")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    expect_error(model, {"prune_ratio": 0.5}, "missing shard", shards[-1].name, built=built)


def test_truncated_shard(tiny_checkpoint, built, tmp_path):
    import shutil

    model = shutil.copytree(tiny_checkpoint("olmoe", max_shard_size="1MB"), tmp_path / "m")
    shard = sorted(model.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    expect_error(model, {"prune_ratio": 0.5}, "truncated", shard.name, built=built)


def test_unwritable_plan_out(olmoe, built, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect_error(olmoe, {"prune_ratio": 0.5, "plan_out": str(blocker / "plan")},
                 "plan_out", "not writable", built=built)


# --------------------------------------------------------------------------- deployments
# GPU-only settings cannot be created by vLLM's CPU build, so these tests set them on a
# real engine config after it is built (`tweak`), or stub the platform's answers; each
# says so. The loader's decision is what they check, before any weight is read.


def test_eplb_is_refused_with_pruning(olmoe, built, tmp_path):
    def eplb(cfg):  # stand-in: --enable-eplb needs CUDA
        cfg.parallel_config.enable_eplb = True

    out = tmp_path / "plan"
    expect_error(olmoe, {"prune_ratio": 0.5, "plan_out": str(out)}, "--enable-eplb",
                 "without --enable-eplb", built=built, tweak=eplb)
    assert not out.exists()


@pytest.mark.parametrize("backend, refused", [("sparse_nccl", True), ("nccl_m2n", True),
                                              ("nccl", False)])
def test_weight_transfer_backends_that_bypass_load_weights_are_refused(olmoe, built, backend,
                                                                      refused):
    from vllm.config.weight_transfer import WeightTransferConfig

    def transfer(cfg):  # stand-in: RL weight transfer needs NCCL and GPUs
        cfg.weight_transfer_config = WeightTransferConfig(backend=backend)

    if refused:
        expect_error(olmoe, {"prune_ratio": 0.5}, f"backend {backend!r}", "'nccl' or 'ipc'",
                     built=built, tweak=transfer)
    else:  # accepted: the load goes on and fails later for a reason of our making
        expect_error(olmoe, {"prune_ratio": 0.95}, "fewer than top_k", built=built,
                     tweak=transfer)


def test_an_mtp_draft_with_another_load_format_is_refused(tiny_checkpoint, built):
    from vllm.config.load import LoadConfig

    model = tiny_checkpoint("deepseek_v3", mtp_layers=1)

    def draft_load(cfg):
        cfg.speculative_config.draft_load_config = LoadConfig(load_format="safetensors")

    expect_error(model, {"prune_ratio": 0.5}, "MTP draft", "'safetensors'", built=built,
                 tweak=draft_load,
                 speculative_config={"method": "mtp", "num_speculative_tokens": 1})


@pytest.fixture
def blackwell(monkeypatch):
    """Stub: vLLM's platform answers as on a B200 (compute capability 10.0). Only the
    two questions the loader asks are stubbed, after the engine config is built."""
    from vllm.platforms import current_platform

    def on(cfg):
        monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
        monkeypatch.setattr(current_platform, "is_device_capability_family",
                            lambda capability, device_id=0: capability == 100)
    return on


def test_blackwell_kernel_limits_refuse_before_scoring(olmoe, built, blackwell, tmp_path):
    """16 experts, top_k 2: ratio 0.375 keeps 10, which FlashInfer's TRT-LLM MoE kernels
    on Blackwell reject (a multiple of 4 is needed); 0.5 keeps 8 and passes the check."""
    msg = expect_error(olmoe, {"prune_ratio": 0.375, "plan_cache": False}, "multiple of 4",
                       "Blackwell", built=built, tweak=blackwell)
    assert "nearest: 0, 0.25, 0.5." in msg
    # 14 pruned keeps 2 = top_k: fine on the CPU, but those kernels need more than top_k.
    expect_error(olmoe, {"prune_ratio": 0.875}, "more than top_k=2", built=built, tweak=blackwell)


def test_blackwell_limits_apply_to_plan_files_too(olmoe, built, blackwell, tmp_path):
    plan = {str(layer): list(range(6)) for layer in range(4)}
    expect_error(olmoe, {"plan": _plan_file(tmp_path, plan)}, "keep 10 experts per layer",
                 "multiple of 4", built=built, tweak=blackwell)


def test_the_start_up_estimate_warns_near_the_engine_timeout(olmoe, monkeypatch, caplog):
    """Scoring runs inside engine start-up, which vLLM's API server waits
    VLLM_ENGINE_READY_TIMEOUT_S for: the loader says what it expects before scoring."""
    import logging

    from vllm_aimer.checkpoint import open_checkpoint
    from vllm_aimer.layout import expert_layout
    from vllm_aimer.loader import _log_estimate, logger

    ckpt = open_checkpoint(olmoe)
    layout = expert_layout(ckpt)
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger=logger.name):
        _log_estimate(layout, layout.all_layers, ckpt)
    assert "VLLM_ENGINE_READY_TIMEOUT_S=600" in caplog.text and "start-up estimate" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    monkeypatch.setenv("VLLM_ENGINE_READY_TIMEOUT_S", "0")
    with caplog.at_level(logging.INFO, logger=logger.name):
        _log_estimate(layout, layout.all_layers, ckpt)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and "Raise VLLM_ENGINE_READY_TIMEOUT_S" in warnings[0]


def test_a_cached_plan_is_checked_against_the_deployment(olmoe, built, blackwell, tmp_path):
    """A plan cache entry may come from another version or machine: on a hit its kept
    count must pass this deployment's rules too. The entry for ratio 0.5 here prunes 6
    (keeps 10), which FlashInfer's TRT-LLM kernels on Blackwell reject."""
    from vllm_aimer.checkpoint import open_checkpoint
    from vllm_aimer.layout import expert_layout
    from vllm_aimer.plan import make_plan
    from vllm_aimer.plan_cache import cached_plan
    from vllm_aimer.scoring import score_checkpoint

    ckpt = open_checkpoint(olmoe)
    layout = expert_layout(ckpt)
    scores = score_checkpoint(ckpt, layout).scores
    cache = tmp_path / "cache"
    cached_plan(cache, ckpt.fingerprint, 0.5, lambda: make_plan(layout, scores, 6 / 16,
                                                                ckpt.fingerprint))
    expect_error(olmoe, {"prune_ratio": 0.5, "plan_cache": str(cache)}, "cached plan in",
                 "multiple of 4", "Blackwell", built=built, tweak=blackwell)
