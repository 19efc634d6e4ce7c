"""Independent reference computations for the tests (deliberately not using vllm_aimer)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

EXPERT_RE = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.experts\.(\d+)\."
                       r"(\w+)\.weight$")
# Fused all-experts tensors (dim 0 = expert): weights, biases, MXFP4 blocks and scales,
# FP8 block scales.
FUSED_RE = re.compile(r"layers\.(\d+)\.(?:mlp|feed_forward)\.experts\.(gate_up_proj|down_proj)"
                      r"(_bias|_blocks|_scales|_scale_inv)?$")
ROUTER_RE = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\."
                       r"(?:gate\.weight|gate\.e_score_correction_bias"
                       r"|moe_statics\.e_score_correction_bias|e_score_correction_bias"
                       r"|router\.weight|router\.bias)$")
# Any tensor of one routed expert: weights, FP8 block scales (`*.weight_scale_inv`),
# quantization parameters, biases.
EXPERT_ANY_RE = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.experts\.(\d+)\.")
PROJS = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}
# Config keys that hold the routed-expert count, over the families tested.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def expert_count(config: dict) -> int:
    return next(config[k] for k in EXPERT_COUNT_KEYS if k in config)


def router_expert_dim(name: str, t: torch.Tensor) -> int:
    """Routers are [E, H] or [E]; ERNIE's moe_statics bias is [1, E] (experts on dim 1)."""
    return 1 if "moe_statics" in name else 0


def load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """MXFP4 [..., G, 16] bytes (low nibble first) x 2^(scale - 127) -> [..., G * 32]."""
    b = blocks.numpy().astype(np.int64)
    values = np.stack([FP4_VALUES[b & 0xF], FP4_VALUES[b >> 4]], axis=-1)  # [..., G, 16, 2]
    values = values.reshape(*b.shape[:-1], 32)
    values = values * np.exp2(scales.numpy().astype(np.float64) - 127.0)[..., None]
    return values.reshape(*b.shape[:-2], -1)


def reference_scores(model_dir: Path) -> dict[int, dict[int, float]]:
    """AIMER straight from the definition, in float64 numpy (MXFP4 dequantized first)."""
    parts: dict[tuple[int, int], list[np.ndarray]] = {}
    tensors = load_all(model_dir)
    for name, t in sorted(tensors.items()):
        m = EXPERT_RE.search(name)
        if m and m[3] in PROJS:
            parts.setdefault((int(m[1]), int(m[2])), []).append(
                t.to(torch.float64).numpy().reshape(-1))
        f = FUSED_RE.search(name)
        if f and f[3] in (None, "_blocks"):
            w = (dequant_mxfp4(t, tensors[name.replace("_blocks", "_scales")]) if f[3]
                 else t.to(torch.float64).numpy())
            for e in range(w.shape[0]):
                parts.setdefault((int(f[1]), e), []).append(w[e].reshape(-1))
    scores: dict[int, dict[int, float]] = {}
    for (layer, expert), ws in parts.items():
        w = np.concatenate(ws)
        scores.setdefault(layer, {})[expert] = float(np.mean(np.abs(w)) / np.sqrt(np.mean(w * w)))
    return scores


def reference_pruned(scores: dict[int, dict[int, float]], ratio: float,
                     n_group: int = 1, mtp_from: int | None = None) -> dict[int, list[int]]:
    """Uniform AIMER plan; with n_group > 1 each of the n_group contiguous expert groups
    loses the same number of its highest-scored experts (group-limited routers). Layers
    at index >= mtp_from are MTP layers: they lose k too, but k is set by the others."""
    layers = sorted(scores)
    trunk = [l for l in layers if mtp_from is None or l < mtp_from]
    experts = len(scores[layers[0]])
    target = round(ratio * experts * len(trunk))
    k = min(range(experts + 1), key=lambda c: (abs(c * len(trunk) - target), c))
    assert k % n_group == 0, "the test's ratio must split evenly over the groups"
    size = experts // n_group
    out = {}
    for l in layers:
        pruned: list[int] = []
        for g in range(n_group):
            ids = [e for e in scores[l] if g * size <= e < (g + 1) * size]
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
    for name, t in load_all(src).items():
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
