"""Shared fixtures and independent reference computations for the pure tests.

Everything here that computes an expected value (headers, AIMER scores, slicing)
is written from the definitions and deliberately does not use `vllm_aimer`, so a
test comparing the package against it can fail.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

INDEX_NAME = "model.safetensors.index.json"

# A routed expert's projection weight in the per-expert layout (all supported families).
EXPERT_WEIGHT_RE = re.compile(
    r"layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# Any tensor of one routed expert (weights, and scales or biases if a checkpoint had them).
EXPERT_ANY_RE = re.compile(
    r"layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.")
# A fused all-experts tensor (dim 0 = expert).
FUSED_RE = re.compile(
    r"layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<proj>gate_up_proj|down_proj)$")
ROUTER_RE = re.compile(r"layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$")
# The order the AIMER definition concatenates one expert's projections in.
ROLE_ORDER = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


# --------------------------------------------------------------------------- checkpoints

def _key(family: str, kwargs: dict) -> tuple:
    return (family, tuple(sorted((k, str(v)) for k, v in kwargs.items())))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(family, **build_tiny_moe kwargs) -> Path`, built once per session.

    The returned directory is shared: tests that modify a checkpoint must copy it
    first (see `copy_checkpoint`).
    """
    from vllm_aimer.tiny import build_tiny_moe

    cache: dict[tuple, Path] = {}

    def build(family: str = "qwen3_moe", **kwargs) -> Path:
        key = _key(family, kwargs)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = build_tiny_moe(root / "model", family, **kwargs)
        return cache[key]

    return build


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- headers

def shard_names(directory: Path) -> list[str]:
    """Shard file names of a checkpoint, from the index if there is one."""
    index = directory / INDEX_NAME
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors header, parsed by hand: name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def header_bytes(directory: Path) -> dict[str, int]:
    """Every tensor's byte size, from the shard headers' data offsets."""
    out: dict[str, int] = {}
    for shard in shard_names(directory):
        for name, entry in read_header(directory / shard).items():
            start, stop = entry["data_offsets"]
            out[name] = stop - start
    return out


def expert_weight_bytes(directory: Path) -> int:
    """Bytes of all routed experts' gate/up/down weights (per-expert or fused)."""
    return sum(b for name, b in header_bytes(directory).items()
               if EXPERT_WEIGHT_RE.search(name) or FUSED_RE.search(name))


# --------------------------------------------------------------------------- tensors

def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in shard_names(directory):
        tensors.update(load_file(directory / shard))
    return tensors


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def aimer_numpy(w: np.ndarray) -> float:
    """mean(|w|) / sqrt(mean(w^2)) in float64, straight from the definition."""
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    return float(np.mean(np.abs(w)) / np.sqrt(np.mean(w * w)))


def expert_vectors(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, int], np.ndarray]:
    """(layer, expert) -> the expert's gate, up and down weights concatenated (float64)."""
    parts: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for name, t in tensors.items():
        m = EXPERT_WEIGHT_RE.search(name)
        if m:
            parts.setdefault((int(m["layer"]), int(m["expert"])), []).append(
                (ROLE_ORDER[m["proj"]], as_f64(t).reshape(-1)))
            continue
        m = FUSED_RE.search(name)
        if m:
            order = 0 if m["proj"] == "gate_up_proj" else 2
            for e in range(t.shape[0]):
                parts.setdefault((int(m["layer"]), e), []).append((order, as_f64(t[e]).reshape(-1)))
    return {key: np.concatenate([w for _, w in sorted(ps, key=lambda p: p[0])])
            for key, ps in parts.items()}


def reference_scores(directory: Path) -> dict[int, list[float]]:
    """Per MoE layer, the AIMER score of each expert (index = expert id), in float64."""
    vectors = expert_vectors(load_tensors(directory))
    layers = sorted({layer for layer, _ in vectors})
    experts = sorted({e for _, e in vectors})
    assert experts == list(range(len(experts)))
    return {layer: [aimer_numpy(vectors[(layer, e)]) for e in experts] for layer in layers}


def reference_k(num_layers: int, num_experts: int, ratio: float) -> int:
    """Uniform pruned count: the k whose k * layers is closest to round(ratio * total),
    ties to the smaller k (brute force over every possible k)."""
    target = round(ratio * num_layers * num_experts)
    return min(range(num_experts + 1), key=lambda k: (abs(k * num_layers - target), k))


def reference_pruned(scores: dict[int, list[float]], k: int) -> dict[int, list[int]]:
    """Per layer the k highest-scored ids (ties: lower id first), sorted."""
    out = {}
    for layer, s in scores.items():
        arr = np.asarray(s)
        # lexsort: last key is primary -> sort by -score, then by id.
        order = np.lexsort((np.arange(len(arr)), -arr))
        out[layer] = sorted(int(e) for e in order[:k])
    return out


# --------------------------------------------------------------------------- real servers

SERVED_NAME = "tiny-moe"


def server_args(extra: dict, *more: str) -> list[str]:
    return ["--load-format", "aimer", "--model-loader-extra-config", json.dumps(extra),
            "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
            "--served-model-name", SERVED_NAME, "--max-logprobs", "20", *more]


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory):
    """Keep the default plan cache (and any other XDG cache) out of the real home."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def pruned_server(tiny_checkpoint, tmp_path_factory):
    """One real `vllm serve` of the tiny Qwen3-MoE pruned at ratio 0.5, for the session."""
    from vllm_aimer.server import ServerProcess

    model = tiny_checkpoint("qwen3_moe")
    work = tmp_path_factory.mktemp("pruned-server")
    plan_out, plan_cache = work / "plan", work / "plan-cache"
    server = ServerProcess(model, server_args({"prune_ratio": 0.5, "plan_out": str(plan_out),
                                               "plan_cache": str(plan_cache)}), work)
    server.model, server.plan_out, server.plan_cache = model, plan_out, plan_cache
    with server:
        server.wait_ready()
        yield server
