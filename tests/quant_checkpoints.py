"""Tiny quantized MoE checkpoints for the format tests: config.json, routers, a few
non-expert tensors and every routed expert's gate/up/down weights written by one
encoder of vllm_aimer.testing.encoders (which, for compressed-tensors formats, calls the
`compressed-tensors` package itself; GPTQ, AWQ, MXFP4-fused and block-FP8 packers are
written there and checked against vLLM's own packers in the tests).

Expert weights are sign(u) |u|^alpha with one alpha per expert from a shuffled ladder,
so their AIMER scores are far apart and the expected plan is unambiguous. Expected
values come from tests/helpers/quant_reference.py (numpy), never from the package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import quant_reference as qr
from vllm_aimer.testing.encoders import (awq, fp8_block, fp8_scaled, gptq, int8, mxfp4,
                                         nvfp4, pack_quantized)

EXPERT_TENSOR_RE = re.compile(
    r"layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.(?P<suffix>.+)$")

NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}


@dataclass(frozen=True)
class Format:
    """How a test writes one format and how numpy reads it back."""
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    config: Any
    dequant: Callable[[dict[str, torch.Tensor]], np.ndarray]
    encoding: str
    """The name vllm_aimer should give it."""
    hidden: int = 128
    inter: int = 128
    hf_quant_file: bool = False
    """Write the config to hf_quant_config.json (ModelOpt before 0.31) instead."""
    extra: dict[str, Any] = field(default_factory=dict)


def _act_order(n: int, group: int, seed: int = 7) -> torch.Tensor:
    """A random act-order assignment of n rows (or columns) to groups of `group`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return (perm // group).to(torch.int32)


def _fp8(strategy: str, block=None, group=None, scale_dtype=None) -> Format:
    return Format(lambda w: fp8_scaled.encode(w, strategy, block, group, scale_dtype),
                  fp8_scaled.quantization_config(strategy, block, group),
                  lambda t: qr.fp8_scaled(t, strategy, block, group), "fp8-scaled")


def _gptq(bits, group, sym, version, act_order=False) -> Format:
    def enc(w: torch.Tensor) -> dict[str, torch.Tensor]:
        gi = _act_order(w.shape[1], group) if act_order else None
        return gptq.encode(w, bits, group, sym, version, gi)

    return Format(enc, gptq.quantization_config(bits, group, sym, version, act_order),
                  lambda t: qr.gptq(t, bits, group if group != -1 else 10**9, sym, version),
                  "gptq")


def _pq(bits, group, sym, act_order=False) -> Format:
    def enc(w: torch.Tensor) -> dict[str, torch.Tensor]:
        gi = _act_order(w.shape[1], group) if act_order else None
        return pack_quantized.encode(w, bits, group, sym, gi)

    return Format(enc, pack_quantized.quantization_config(bits, group, sym,
                                                          "group" if act_order else None),
                  lambda t: qr.pack_quantized(t, bits, group), "pack-quantized")


FORMATS: dict[str, Format] = {
    "fp8-block-128": Format(lambda w: fp8_block.encode(w, (128, 128)),
                            fp8_block.quantization_config((128, 128)),
                            lambda t: qr.fp8_block(t, (128, 128)), "fp8-block"),
    "fp8-ct-tensor": _fp8("tensor"),
    "fp8-ct-channel": _fp8("channel", scale_dtype=torch.bfloat16),
    "fp8-ct-block-48x96": _fp8("block", block=(48, 96)),
    "fp8-ct-group-64": _fp8("group", group=64),
    "fp8-per-tensor": Format(lambda w: fp8_scaled.encode(w, "tensor"),
                             {"quant_method": "fp8", "activation_scheme": "dynamic"},
                             lambda t: qr.fp8_scaled(t, "tensor"), "fp8-scaled"),
    "fp8-modelopt": Format(lambda w: fp8_scaled.encode(w, "tensor"),
                           {"quant_method": "modelopt", "quant_algo": "FP8"},
                           lambda t: qr.fp8_scaled(t, "tensor"), "fp8-scaled"),
    "int8-channel": Format(lambda w: int8.encode(w, "channel", True, torch.bfloat16),
                           int8.quantization_config("channel", True),
                           lambda t: qr.int8(t, "channel"), "int8"),
    "int8-channel-asym": Format(lambda w: int8.encode(w, "channel", False),
                                int8.quantization_config("channel", False),
                                lambda t: qr.int8(t, "channel"), "int8"),
    "int8-tensor": Format(lambda w: int8.encode(w, "tensor", True),
                          int8.quantization_config("tensor", True),
                          lambda t: qr.int8(t, "tensor"), "int8"),
    "gptq-4b-g128-sym-v1": _gptq(4, 128, True, 1),
    "gptq-4b-g32-asym-v1": _gptq(4, 32, False, 1),
    "gptq-4b-g64-asym-v2": _gptq(4, 64, False, 2),
    "gptq-8b-g128-sym-v1": _gptq(8, 128, True, 1),
    "gptq-8b-g32-asym-v2": _gptq(8, 32, False, 2),
    "gptq-4b-g64-act-order": _gptq(4, 64, True, 1, act_order=True),
    "gptq-4b-channel-asym": _gptq(4, -1, False, 1),
    "awq-g128": Format(lambda w: awq.encode(w, 128), awq.quantization_config(128),
                       lambda t: qr.awq(t, 128), "awq"),
    "awq-g64": Format(lambda w: awq.encode(w, 64), awq.quantization_config(64),
                      lambda t: qr.awq(t, 64), "awq"),
    "awq-g32": Format(lambda w: awq.encode(w, 32), awq.quantization_config(32),
                      lambda t: qr.awq(t, 32), "awq"),
    "pq-4b-g32-sym": _pq(4, 32, True),
    "pq-4b-g128-asym": _pq(4, 128, False),
    "pq-4b-g64-asym": _pq(4, 64, False),
    "pq-8b-g64-sym": _pq(8, 64, True),
    "pq-4b-channel-sym": _pq(4, None, True),
    "pq-4b-g64-act-order": _pq(4, 64, True, act_order=True),
    "nvfp4-ct": Format(lambda w: nvfp4.encode(w), nvfp4.quantization_config(),
                       qr.nvfp4, "nvfp4"),
    "nvfp4-modelopt": Format(lambda w: nvfp4.encode(w, "modelopt"),
                             nvfp4.quantization_config("modelopt"), qr.nvfp4, "nvfp4"),
    "nvfp4-modelopt-hf-quant-file": Format(
        lambda w: nvfp4.encode(w, "modelopt"),
        {"producer": {"name": "modelopt", "version": "0.29.0"},
         "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                          "exclude_modules": ["lm_head"]}},
        qr.nvfp4, "nvfp4", hf_quant_file=True),
    "mxfp4-u8": Format(lambda w: mxfp4.encode(w), mxfp4.quantization_config(), qr.mxfp4,
                       "mxfp4"),
    "mxfp4-e8m0": Format(lambda w: mxfp4.encode(w, e8m0=True), mxfp4.quantization_config(),
                         qr.mxfp4, "mxfp4"),
}


def expert_weight(shape: tuple[int, int], alpha: float, g: torch.Generator) -> torch.Tensor:
    u = torch.randn(shape, generator=g)
    w = u.sign() * u.abs().pow(alpha)
    return 0.05 * w / w.std()


def build(directory: Path, fmt: Format, family: str = "qwen3_moe", layers: int = 2,
          experts: int = 8, top_k: int = 2, seed: int = 0) -> Path:
    """A tiny `family` checkpoint whose routed experts are stored in `fmt`."""
    directory.mkdir(parents=True, exist_ok=True)
    block, gate, up, down = NAMES[family]
    g = torch.Generator().manual_seed(seed)
    ladder = torch.linspace(0.5, 2.0, experts)
    h, i = fmt.hidden, fmt.inter
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(32, h, generator=g)}
    for layer in range(layers):
        alphas = ladder[torch.randperm(experts, generator=g)].tolist()
        prefix = f"model.layers.{layer}.{block}"
        for e in range(experts):
            for proj, shape in ((gate, (i, h)), (up, (i, h)), (down, (h, i))):
                for suffix, t in fmt.encode(expert_weight(shape, alphas[e], g)).items():
                    tensors[f"{prefix}.experts.{e}.{proj}.{suffix}"] = t
        tensors[f"{prefix}.gate.weight"] = torch.randn(experts, h, generator=g).to(torch.bfloat16)
        tensors[f"model.layers.{layer}.self_attn.o_proj.weight"] = torch.randn(
            8, 8, generator=g).to(torch.bfloat16)
    config: dict[str, Any] = {
        "model_type": family, "num_hidden_layers": layers, "hidden_size": h,
        "num_experts_per_tok": top_k, "torch_dtype": "bfloat16", "vocab_size": 32,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "max_position_embeddings": 512}
    if family == "mixtral":
        config |= {"architectures": ["MixtralForCausalLM"], "num_local_experts": experts,
                   "intermediate_size": i}
    else:
        config |= {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": experts,
                   "moe_intermediate_size": i}
    if fmt.hf_quant_file:
        (directory / "hf_quant_config.json").write_text(json.dumps(fmt.config))
    else:
        config["quantization_config"] = fmt.config
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def projections(directory: Path) -> dict[tuple[int, int, str], dict[str, torch.Tensor]]:
    """(layer, expert, projection) -> {suffix: tensor}, read with safetensors."""
    out: dict[tuple[int, int, str], dict[str, torch.Tensor]] = {}
    for name, t in load_file(directory / "model.safetensors").items():
        m = EXPERT_TENSOR_RE.search(name)
        if m:
            out.setdefault((int(m["layer"]), int(m["expert"]), m["proj"]), {})[m["suffix"]] = t
    return out


def reference_scores(directory: Path, fmt: Format) -> dict[int, list[float]]:
    """Dequantize every projection in numpy (the format's recipe), then AIMER per expert."""
    parts: dict[tuple[int, int], list[np.ndarray]] = {}
    for (layer, expert, _), tensors in sorted(projections(directory).items()):
        parts.setdefault((layer, expert), []).append(fmt.dequant(tensors))
    layers = sorted({l for l, _ in parts})
    experts = sorted({e for _, e in parts})
    return {l: [qr.aimer(parts[(l, e)]) for e in experts] for l in layers}
