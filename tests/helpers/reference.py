"""Independent reference computations for the tests: headers parsed by hand, AIMER
scores from the definition in float64 numpy, the uniform plan and the checkpoint's
slicing, all written from the definitions and deliberately not using vllm_aimer, so
that a test comparing the package against them can fail."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

INDEX_NAME = "model.safetensors.index.json"
_BLOCK = r"(?:mlp|block_sparse_moe|feed_forward)"
# A routed expert's projection weight in the per-expert layout (all supported families).
EXPERT_WEIGHT_RE = re.compile(
    rf"layers\.(?P<layer>\d+)\.{_BLOCK}\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# Any tensor of one routed expert: weights, FP8 block scales (`*.weight_scale_inv`),
# quantization parameters, biases.
EXPERT_ANY_RE = re.compile(rf"layers\.(?P<layer>\d+)\.{_BLOCK}\.experts\.(?P<expert>\d+)\.")
# Fused all-experts tensors (dim 0 = expert): weights (no suffix), biases, MXFP4 blocks
# and scales, FP8 block scales.
FUSED_RE = re.compile(rf"layers\.(?P<layer>\d+)\.{_BLOCK}\.experts\.(?P<proj>gate_up_proj|down_proj)"
                      r"(?P<suffix>_bias|_blocks|_scales|_scale_inv)?$")
# Router tensors indexed by expert: gates, router biases, score-correction biases.
ROUTER_RE = re.compile(rf"layers\.(?P<layer>\d+)\.{_BLOCK}\."
                       r"(?:gate\.weight|gate\.e_score_correction_bias"
                       r"|moe_statics\.e_score_correction_bias|e_score_correction_bias"
                       r"|router\.weight|router\.bias)$")
PROJS = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}
# Config keys that hold the routed-expert count, over the families tested.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def expert_count(config: dict) -> int:
    return next(config[k] for k in EXPERT_COUNT_KEYS if k in config)


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
               if EXPERT_WEIGHT_RE.search(name)
               or ((m := FUSED_RE.search(name)) and m["suffix"] is None))


# --------------------------------------------------------------------------- tensors

def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (all shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in shard_names(Path(directory)):
        tensors.update(load_file(Path(directory) / shard))
    return tensors


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def aimer_numpy(w: np.ndarray) -> float:
    """mean(|w|) / sqrt(mean(w^2)) in float64, straight from the definition."""
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    return float(np.mean(np.abs(w)) / np.sqrt(np.mean(w * w)))


def router_expert_dim(name: str, t: torch.Tensor) -> int:
    """Routers are [E, H] or [E]; ERNIE's moe_statics bias is [1, E] (experts on dim 1)."""
    return 1 if "moe_statics" in name else 0


FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """MXFP4 [..., G, 16] bytes (low nibble first) x 2^(scale - 127) -> [..., G * 32]."""
    b = blocks.numpy().astype(np.int64)
    values = np.stack([FP4_VALUES[b & 0xF], FP4_VALUES[b >> 4]], axis=-1)  # [..., G, 16, 2]
    values = values.reshape(*b.shape[:-1], 32)
    values = values * np.exp2(scales.numpy().astype(np.float64) - 127.0)[..., None]
    return values.reshape(*b.shape[:-2], -1)


# The order the AIMER definition concatenates one expert's projections in.
ROLE_ORDER = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2,
              "gate_up_proj": 0}


def expert_vectors(tensors: Mapping[str, torch.Tensor]) -> dict[tuple[int, int], np.ndarray]:
    """(layer, expert) -> the expert's gate, up and down weights concatenated (float64;
    fused tensors split on dim 0, MXFP4 blocks dequantized first)."""
    parts: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for name, t in tensors.items():
        m = EXPERT_WEIGHT_RE.search(name)
        if m:
            parts.setdefault((int(m["layer"]), int(m["expert"])), []).append(
                (ROLE_ORDER[m["proj"]], as_f64(t).reshape(-1)))
            continue
        f = FUSED_RE.search(name)
        if f and f["suffix"] in (None, "_blocks"):
            w = (dequant_mxfp4(t, tensors[name.replace("_blocks", "_scales")]) if f["suffix"]
                 else as_f64(t))
            for e in range(w.shape[0]):
                parts.setdefault((int(f["layer"]), e), []).append(
                    (ROLE_ORDER.get(f["proj"], 2), w[e].reshape(-1)))
    return {key: np.concatenate([w for _, w in sorted(ps, key=lambda p: p[0])])
            for key, ps in parts.items()}


def reference_scores(model_dir: Path) -> dict[int, list[float]]:
    """Per MoE layer, the AIMER score of each expert (index = expert id), in float64."""
    vectors = expert_vectors(load_tensors(model_dir))
    layers = sorted({layer for layer, _ in vectors})
    experts = sorted({e for _, e in vectors})
    assert experts == list(range(len(experts)))
    return {layer: [aimer_numpy(vectors[(layer, e)]) for e in experts] for layer in layers}


def reference_k(num_layers: int, num_experts: int, ratio: float) -> int:
    """Uniform pruned count: the k whose k * layers is closest to round(ratio * total),
    ties to the smaller k (brute force over every possible k)."""
    target = round(ratio * num_layers * num_experts)
    return min(range(num_experts + 1), key=lambda k: (abs(k * num_layers - target), k))


def reference_pruned(scores: Mapping[int, Sequence[float]], ratio: float | None = None,
                     n_group: int = 1, mtp_from: int | None = None, *,
                     k: int | None = None) -> dict[int, list[int]]:
    """Uniform AIMER plan: per layer the k highest-scored ids (ties: lower id first),
    sorted; k from `ratio` over the trunk layers (`reference_k`), or given. With
    n_group > 1 each of the n_group contiguous expert groups loses the same number of
    its highest-scored experts (group-limited routers). Layers at index >= mtp_from are
    MTP layers: they lose k too, but k is set by the others."""
    layers = sorted(scores)
    trunk = [l for l in layers if mtp_from is None or l < mtp_from]
    experts = len(scores[layers[0]])
    if k is None:
        assert ratio is not None, "pass ratio or k"
        k = reference_k(len(trunk), experts, ratio)
    assert k % n_group == 0, "the test's ratio must split evenly over the groups"
    size = experts // n_group
    out = {}
    for l in layers:
        pruned: list[int] = []
        for g in range(n_group):
            ids = range(g * size, (g + 1) * size)
            pruned += sorted(ids, key=lambda e: (-scores[l][e], e))[:k // n_group]
        out[l] = sorted(pruned)
    return out


def sliced_tensors(src: Path, pruned: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """Every tensor of `src` with `pruned` applied: pruned experts' tensors (weights and
    scales) dropped, kept ones renumbered 0..K-1 in id order, fused [E, ...] tensors and
    router tensors sliced. `pruned` must name every MoE layer (MTP layers included)."""
    config = json.loads((src / "config.json").read_text())
    experts = expert_count(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in load_tensors(src).items():
        m = EXPERT_ANY_RE.search(name)
        if m:
            layer, old = int(m[1]), int(m[2])
            if old in pruned[layer]:
                continue
            new = [e for e in range(experts) if e not in pruned[layer]].index(old)
            name = name.replace(f".experts.{old}.", f".experts.{new}.")
        f = FUSED_RE.search(name)
        if f:
            keep = [e for e in range(t.shape[0]) if e not in pruned[int(f[1])]]
            t = _select(t, 0, keep)
        r = ROUTER_RE.search(name)
        if r:
            layer, dim = int(r[1]), router_expert_dim(name, t)
            keep = [e for e in range(t.shape[dim]) if e not in pruned[layer]]
            t = _select(t, dim, keep)
        out[name] = t.contiguous()
    return out


def _select(t: torch.Tensor, dim: int, keep: list[int]) -> torch.Tensor:
    """t's entries `keep` along `dim`; float8 tensors through their bytes (torch's CPU
    indexing does not take them)."""
    index = torch.tensor(keep, dtype=torch.long)
    if t.dtype.is_floating_point and t.element_size() == 1:
        return t.view(torch.uint8).index_select(dim, index).view(t.dtype)
    return t.index_select(dim, index)


def slice_checkpoint(src: Path, dst: Path, pruned: dict[int, list[int]]) -> Path:
    """A checkpoint holding only the kept experts, renumbered, with routers sliced."""
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    keys = [k for k in EXPERT_COUNT_KEYS if k in config]
    experts = config[keys[0]]
    out = sliced_tensors(src, pruned)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    counts = {len(ids) for ids in pruned.values()}
    assert len(counts) == 1, "reference slicing expects a uniform plan"
    pruned_per_layer = counts.pop()
    for key in keys:
        config[key] = experts - pruned_per_layer
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    return dst


def hf_logprobs(model_dir: Path, prompts: list[list[int]]) -> list[dict[int, float]]:
    """Next-token log-probabilities (all of the vocabulary) from transformers, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0, -1]
            lp = torch.log_softmax(logits.double(), dim=-1)
            out.append({i: float(v) for i, v in enumerate(lp)})
    return out


def run_probe(spec: dict, env: dict | None = None, timeout: float = 1200) -> dict:
    """Run helpers/engine_probe.py in a fresh process; return its JSON result."""
    probe = Path(__file__).with_name("engine_probe.py")
    proc = subprocess.run([sys.executable, str(probe), json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE-RESULT "):
            return json.loads(line[len("PROBE-RESULT "):]) | {"log": proc.stderr}
    raise AssertionError(f"engine probe failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations from transformers, float32 (what vLLM's greedy output must
    be with or without speculative decoding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = list(ids)
            for _ in range(max_tokens):
                logits = model(torch.tensor([seq])).logits[0, -1]
                seq.append(int(torch.argmax(logits)))
            out.append(seq[len(ids):])
    return out


def dense_llama(dst: Path, tokenizer_from: Path) -> Path:
    """A tiny dense Llama sharing a tiny MoE's tokenizer (a draft model, an EAGLE-less
    stand-in for the dense drafts people pair with MoE targets)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=512)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(dst)
    for f in Path(tokenizer_from).glob("tokenizer*"):
        shutil.copy(f, dst / f.name)
    return dst
