"""Safetensors headers of published DeepSeek-V3-style releases, rebuilt from their
config.json (tests/fixtures/configs) and the release's tensor naming, without data:
a `Checkpoint` whose TensorInfo entries are what the real shards' headers list, so
`vllm-aimer fit` can size a 600 GB release in a test.

The tensor list follows the Hugging Face checkpoints (as vLLM's deepseek_v2.py loads
them): embeddings, lm_head and norms in BF16; MLA projections (q_a, q_b,
kv_a_proj_with_mqa, kv_b, o); dense MLPs in the first `first_k_dense_replace` layers;
then router (`mlp.gate.weight` BF16 + `e_score_correction_bias` F32), shared experts
and routed experts; DeepSeek's MTP layer (`layers.{num_hidden_layers}`) adds its own
embeddings, norms, `eh_proj` and head. How each linear weight is stored is the
`linear` / `expert` encoding passed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from vllm_aimer.checkpoint import Checkpoint, TensorInfo

CONFIGS = Path(__file__).parent.parent / "fixtures" / "configs"

Encoding = Callable[[int, int], list[tuple[str, str, tuple[int, ...]]]]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bf16(out: int, inp: int) -> list[tuple[str, str, tuple[int, ...]]]:
    return [("weight", "BF16", (out, inp))]


def fp8_block(out: int, inp: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """DeepSeek-V3 FP8: float8 weight + float32 scale_inv per 128 x 128 block."""
    return [("weight", "F8_E4M3", (out, inp)),
            ("weight_scale_inv", "F32", (cdiv(out, 128), cdiv(inp, 128)))]


def int4_g32(out: int, inp: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """Kimi-K2-Thinking experts: compressed-tensors pack-quantized, 4-bit symmetric,
    groups of 32 (int32 words of 8 codes, BF16 scales, the original shape)."""
    return [("weight_packed", "I32", (out, cdiv(inp, 8))),
            ("weight_scale", "BF16", (out, cdiv(inp, 32))),
            ("weight_shape", "I64", (2,))]


def release(config_name: str, linear: Encoding, expert: Encoding) -> Checkpoint:
    config = json.loads((CONFIGS / f"{config_name}.json").read_text())
    h, v = config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    ql, kvl = config["q_lora_rank"], config["kv_lora_rank"]
    rope, nope, vd = config["qk_rope_head_dim"], config["qk_nope_head_dim"], config["v_head_dim"]
    inter, moe_inter = config["intermediate_size"], config["moe_intermediate_size"]
    experts, shared = config["n_routed_experts"], config["n_shared_experts"]
    layers, mtp = config["num_hidden_layers"], config.get("num_nextn_predict_layers", 0)
    tensors: dict[str, TensorInfo] = {}

    def add(name: str, dtype: str, *shape: int) -> None:
        tensors[name] = TensorInfo(name, "model.safetensors", dtype, tuple(shape))

    def linear_of(encoding: Encoding, prefix: str, out: int, inp: int) -> None:
        for suffix, dtype, shape in encoding(out, inp):
            add(f"{prefix}.{suffix}", dtype, *shape)

    add("model.embed_tokens.weight", "BF16", v, h)
    add("lm_head.weight", "BF16", v, h)
    add("model.norm.weight", "BF16", h)
    for i in range(layers + mtp):
        p = f"model.layers.{i}"
        add(f"{p}.input_layernorm.weight", "BF16", h)
        add(f"{p}.post_attention_layernorm.weight", "BF16", h)
        a = f"{p}.self_attn"
        linear_of(linear, f"{a}.q_a_proj", ql, h)
        add(f"{a}.q_a_layernorm.weight", "BF16", ql)
        linear_of(linear, f"{a}.q_b_proj", heads * (nope + rope), ql)
        linear_of(linear, f"{a}.kv_a_proj_with_mqa", kvl + rope, h)
        add(f"{a}.kv_a_layernorm.weight", "BF16", kvl)
        linear_of(linear, f"{a}.kv_b_proj", heads * (nope + vd), kvl)
        linear_of(linear, f"{a}.o_proj", h, heads * vd)
        if i < config["first_k_dense_replace"]:
            for proj, out, inp in (("gate_proj", inter, h), ("up_proj", inter, h),
                                   ("down_proj", h, inter)):
                linear_of(linear, f"{p}.mlp.{proj}", out, inp)
            continue
        add(f"{p}.mlp.gate.weight", "BF16", experts, h)
        add(f"{p}.mlp.gate.e_score_correction_bias", "F32", experts)
        for proj, out, inp in (("gate_proj", moe_inter * shared, h),
                               ("up_proj", moe_inter * shared, h),
                               ("down_proj", h, moe_inter * shared)):
            linear_of(linear, f"{p}.mlp.shared_experts.{proj}", out, inp)
        for e in range(experts):
            for proj, out, inp in (("gate_proj", moe_inter, h), ("up_proj", moe_inter, h),
                                   ("down_proj", h, moe_inter)):
                linear_of(expert, f"{p}.mlp.experts.{e}.{proj}", out, inp)
        if i >= layers:  # DeepSeek's multi-token-prediction layer
            add(f"{p}.embed_tokens.weight", "BF16", v, h)
            add(f"{p}.enorm.weight", "BF16", h)
            add(f"{p}.hnorm.weight", "BF16", h)
            linear_of(linear, f"{p}.eh_proj", h, 2 * h)
            add(f"{p}.shared_head.norm.weight", "BF16", h)
            add(f"{p}.shared_head.head.weight", "BF16", v, h)
    return Checkpoint(Path(f"<{config_name} headers>"), config, ("model.safetensors",), tensors,
                      "reconstructed")
