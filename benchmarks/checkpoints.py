"""Generated benchmark checkpoints and page-cache control.

Needs only torch and safetensors (plus transformers' tokenizers for a tokenizer), so
that benchmarks/device_scoring.py can build checkpoints where vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vllm_aimer.units import GIB  # no dependencies: fine without vLLM

_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class ModelSpec:
    """A random Qwen3-MoE checkpoint, every layer MoE, stored in `dtype`."""
    name: str
    layers: int
    hidden: int
    moe_intermediate: int
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    head_dim: int = 64
    vocab: int = 256
    shard_bytes: int = GIB
    seed: int = 0
    dtype: str = "float32"
    """float32 (the dtype vLLM serves on CPU) or bfloat16 (how real checkpoints ship)."""

    def without_experts(self) -> "ModelSpec":
        """The same model with the smallest experts vLLM's CPU MoE kernel accepts
        (intermediate 32): the runtime's fixed overhead, measured, not guessed."""
        return replace(self, name=f"{self.name}-tiny-experts", moe_intermediate=32)

    @property
    def bytes_per_weight(self) -> int:
        return _BYTES[self.dtype]

    def config(self) -> dict[str, Any]:
        # Field names of the public Qwen3-30B-A3B config.json (`num_experts`).
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": 4 * self.hidden, "moe_intermediate_size": self.moe_intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "num_experts": self.experts, "num_experts_per_tok": self.top_k,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
            "output_router_logits": False, "router_aux_loss_coef": 0.001,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
            "max_position_embeddings": 4096, "max_window_layers": self.layers,
            "sliding_window": None, "use_sliding_window": False, "use_cache": True,
            "initializer_range": 0.02, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "torch_dtype": self.dtype,
        }

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order real checkpoints store them."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (h,)
            yield f"{p}.post_attention_layernorm.weight", (h,)
            yield f"{p}.self_attn.q_proj.weight", (q, h)
            yield f"{p}.self_attn.k_proj.weight", (kv, h)
            yield f"{p}.self_attn.v_proj.weight", (kv, h)
            yield f"{p}.self_attn.o_proj.weight", (h, q)
            yield f"{p}.self_attn.q_norm.weight", (self.head_dim,)
            yield f"{p}.self_attn.k_norm.weight", (self.head_dim,)
            yield f"{p}.mlp.gate.weight", (self.experts, h)
            for j in range(self.experts):
                e = f"{p}.mlp.experts.{j}"
                yield f"{e}.gate_proj.weight", (self.moe_intermediate, h)
                yield f"{e}.up_proj.weight", (self.moe_intermediate, h)
                yield f"{e}.down_proj.weight", (h, self.moe_intermediate)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    @property
    def expert_bytes(self) -> int:
        """Bytes of all routed experts' weights."""
        per_expert = 3 * self.hidden * self.moe_intermediate * self.bytes_per_weight
        return per_expert * self.experts * self.layers

    @property
    def total_bytes(self) -> int:
        return sum(_numel(s) for _, s in self.tensors()) * self.bytes_per_weight


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# Full: 3.1 GiB of float32 weights, 96 % of it in 512 experts of 6 MiB (OLMoE-like
# 64 experts, top-8); fits vLLM CPU in float32 with room to spare in 24 GiB.
FULL = ModelSpec("moe-3g", layers=8, hidden=1024, moe_intermediate=512, experts=64, top_k=8,
                 heads=16, kv_heads=4)
# The scoring benchmark's bf16 model: the same layers, 20 of them, 3.8 GiB (4.1 GB) of
# bf16 weights, 1280 experts of 3 MiB.
BF16 = replace(FULL, name="moe-4g-bf16", layers=20, dtype="bfloat16")
# Quick: the same shape of model, 0.2 GiB, for a smoke run of every code path.
QUICK = ModelSpec("moe-small", layers=4, hidden=512, moe_intermediate=256, experts=32, top_k=4,
                  heads=8, kv_heads=2, shard_bytes=64 << 20)
QUICK_BF16 = replace(QUICK, name="moe-small-bf16", dtype="bfloat16")


def build_checkpoint(spec: ModelSpec, directory: Path, tokenizer: bool = True) -> Path:
    """Write `spec` as a sharded safetensors checkpoint (with a tokenizer unless
    `tokenizer` is False); reuse an existing one written from the same spec. Weights
    are N(0, 0.02), norms 1."""
    import torch
    from safetensors.torch import save_file

    marker = directory / ".bench-spec.json"
    wanted = json.dumps({**asdict(spec), "tokenizer": tokenizer}, sort_keys=True)
    if marker.is_file() and marker.read_text() == wanted:
        return directory
    if directory.exists():
        subprocess.run(["rm", "-rf", str(directory)], check=True)
    directory.mkdir(parents=True)

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in spec.tensors():
        nbytes = _numel(shape) * spec.bytes_per_weight
        if shards[-1] and size + nbytes > spec.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    dtype = getattr(torch, spec.dtype)
    g = torch.Generator().manual_seed(spec.seed)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.ones(shape) if name.endswith("norm.weight")
                          else torch.empty(shape).normal_(0.0, 0.02, generator=g)).to(dtype)
                   for name, shape in shard}
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    index = {"metadata": {"total_size": spec.total_bytes}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (directory / "config.json").write_text(json.dumps(spec.config(), indent=1))
    if tokenizer:
        from vllm_aimer.testing.tiny import build_tokenizer

        build_tokenizer(directory, spec.vocab)
    marker.write_text(wanted)
    return directory


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


# --------------------------------------------------------------------------- page cache

def evict_page_cache(files: Sequence[Path]) -> None:
    """Drop the files' clean pages from the page cache (no root needed), so the
    next read comes from disk: a cold read."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(files: Sequence[Path]) -> None:
    """Read the files once so that later reads are served from memory."""
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def resident_fraction(files: Sequence[Path]) -> float | None:
    """Share of the files' pages in the page cache (mincore on a memory map), or None
    where it cannot be told: shows whether an eviction took effect."""
    import ctypes
    import mmap

    import numpy as np

    try:
        mincore = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    resident = total = 0
    for path in files:
        size = path.stat().st_size
        if not size:
            continue
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = np.frombuffer(m, np.uint8)
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = np.zeros(pages, np.uint8)
            if mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size),
                       ctypes.c_void_p(vec.ctypes.data)) != 0:
                return None
            resident += int((vec & 1).sum())
            total += pages
        finally:
            del view
            m.close()
    return resident / total if total else None
