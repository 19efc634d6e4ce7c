"""Opening checkpoints: clear errors for broken ones, a stable fingerprint, supported families."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import copy_checkpoint
from tests.helpers.reference import INDEX_NAME, header_bytes, read_header, shard_names
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import expert_layout

SUPPORTED = ("qwen3_moe", "olmoe", "mixtral")


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe", max_shard_size="1MB")
    assert len(shard_names(model)) >= 2
    return model


def _error(path) -> str:
    with pytest.raises(AimerError) as e:
        open_checkpoint(path)
    return str(e.value)


# --------------------------------------------------------------------------- errors

def test_not_a_directory(tmp_path, tiny_checkpoint):
    missing = tmp_path / "no-such-model"
    assert "not a local directory" in _error(missing)
    assert str(missing) in _error(missing)
    a_file = tiny_checkpoint("qwen3_moe") / "config.json"
    assert "not a local directory" in _error(a_file)
    # A hub id is not a directory either.
    assert "not a local directory" in _error("Qwen/Qwen3-30B-A3B")


def test_missing_config(tmp_path, tiny_checkpoint):
    model = copy_checkpoint(tiny_checkpoint("qwen3_moe"), tmp_path / "m")
    (model / "config.json").unlink()
    msg = _error(model)
    assert "config.json" in msg and "does not exist" in msg


def test_config_not_json(tmp_path, tiny_checkpoint):
    model = copy_checkpoint(tiny_checkpoint("qwen3_moe"), tmp_path / "m")
    (model / "config.json").write_text("{not json")
    msg = _error(model)
    assert "config.json" in msg and "not valid JSON" in msg


def test_no_weights(tmp_path, tiny_checkpoint):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_bytes((tiny_checkpoint("qwen3_moe") / "config.json").read_bytes())
    assert "no safetensors weights" in _error(model)


def test_missing_shard_listed_in_index(tmp_path, sharded):
    model = copy_checkpoint(sharded, tmp_path / "m")
    victim = shard_names(model)[-1]
    (model / victim).unlink()
    msg = _error(model)
    assert "missing shard" in msg and victim in msg
    # The shards that are present are not named as missing.
    for other in shard_names(model)[:-1]:
        assert other not in msg


@pytest.mark.parametrize("cut", [1, 4096, 100_000])
def test_truncated_shard_is_named(tmp_path, sharded, cut):
    model = copy_checkpoint(sharded, tmp_path / "m")
    victim = shard_names(model)[0]
    path = model / victim
    os.truncate(path, path.stat().st_size - cut)
    msg = _error(model)
    assert victim in msg
    assert "truncated" in msg


def test_shard_truncated_inside_its_header_is_named(tmp_path, tiny_checkpoint):
    model = copy_checkpoint(tiny_checkpoint("qwen3_moe"), tmp_path / "m")
    path = model / "model.safetensors"
    os.truncate(path, 100)
    msg = _error(model)
    assert "model.safetensors" in msg and "truncated" in msg
    os.truncate(path, 3)
    assert "model.safetensors" in _error(model)


def test_open_reads_every_tensor_from_the_headers(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe", max_shard_size="1MB", dtype=torch.bfloat16)
    ckpt = open_checkpoint(model)
    want = header_bytes(model)
    assert set(ckpt.tensors) == set(want)
    for name, nbytes in want.items():
        assert ckpt.tensors[name].nbytes == nbytes, name
    assert ckpt.total_bytes == sum(want.values())
    assert list(ckpt.files) == shard_names(model)
    index = json.loads((model / INDEX_NAME).read_text())["weight_map"]
    assert {n: t.file for n, t in ckpt.tensors.items()} == index


# --------------------------------------------------------------------------- fingerprint

def test_fingerprint_is_stable(tmp_path, sharded):
    a = open_checkpoint(sharded).fingerprint
    assert a == open_checkpoint(sharded).fingerprint
    assert len(a) == 64 and int(a, 16) >= 0
    # It identifies the content, not the directory it sits in.
    moved = copy_checkpoint(sharded, tmp_path / "elsewhere")
    assert open_checkpoint(moved).fingerprint == a


def test_fingerprint_changes_with_a_header(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("qwen3_moe")
    model = copy_checkpoint(src, tmp_path / "m")
    before = open_checkpoint(model).fingerprint
    tensors = load_file(model / "model.safetensors")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt", "rev": "2"})
    assert read_header(model / "model.safetensors").keys() == read_header(src / "model.safetensors").keys()
    assert open_checkpoint(model).fingerprint != before


def test_fingerprint_changes_with_a_tensor_shape_in_the_header(tmp_path, tiny_checkpoint):
    model = copy_checkpoint(tiny_checkpoint("olmoe"), tmp_path / "m")
    before = open_checkpoint(model).fingerprint
    tensors = load_file(model / "model.safetensors")
    name = "model.norm.weight"
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert open_checkpoint(model).fingerprint != before


def test_fingerprint_changes_with_config(tmp_path, tiny_checkpoint):
    model = copy_checkpoint(tiny_checkpoint("qwen3_moe"), tmp_path / "m")
    before = open_checkpoint(model).fingerprint
    config = json.loads((model / "config.json").read_text())
    config["rope_theta"] = 12345.0
    (model / "config.json").write_text(json.dumps(config))
    assert open_checkpoint(model).fingerprint != before


def test_fingerprint_tells_same_architecture_checkpoints_apart(tiny_checkpoint):
    """Two checkpoints with identical config and headers but different weights
    (another seed) get different identities, so a plan cannot move between them."""
    a = tiny_checkpoint("qwen3_moe")
    b = tiny_checkpoint("qwen3_moe", seed=1)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert read_header(a / "model.safetensors") == read_header(b / "model.safetensors")
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    assert open_checkpoint(a).fingerprint != open_checkpoint(b).fingerprint


# --------------------------------------------------------------------------- families

@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config)
    directory = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(directory)
    return directory


def _layout_error(directory) -> str:
    ckpt = open_checkpoint(directory)
    with pytest.raises(AimerError) as e:
        expert_layout(ckpt)
    return str(e.value)


def test_dense_model_lists_supported_families(dense_llama):
    assert json.loads((dense_llama / "config.json").read_text())["model_type"] == "llama"
    msg = _layout_error(dense_llama)
    assert "'llama'" in msg
    for family in SUPPORTED:
        assert family in msg


def test_unknown_model_type_lists_supported_families(tmp_path, tiny_checkpoint):
    model = copy_checkpoint(tiny_checkpoint("qwen3_moe"), tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "dbrx"  # a MoE family without an entry
    (model / "config.json").write_text(json.dumps(config))
    msg = _layout_error(model)
    assert "'dbrx'" in msg
    for family in SUPPORTED:
        assert family in msg


@pytest.mark.parametrize("family", SUPPORTED)
def test_supported_families_have_a_layout(tiny_checkpoint, family):
    model = tiny_checkpoint(family)
    layout = expert_layout(open_checkpoint(model))
    assert layout.arch.family == family
    assert layout.layers == (0, 1, 2, 3)
    assert layout.num_experts == 16 and layout.top_k == 2
    # Per-expert bytes from the headers: 3 projections of 64 x 64 float32.
    assert all(b == [3 * 64 * 64 * 4] * 16 for b in layout.expert_bytes.values())
