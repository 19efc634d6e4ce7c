"""Tiny MoE checkpoints built locally: the tests' and benchmarks' fixtures.

Each routed expert's weights are drawn as sign(u) * |u|^alpha with u Gaussian and
an alpha per expert, so AIMER scores are well separated (alpha < 1 flattens the
weights and raises the score, alpha > 1 concentrates them and lowers it) and the
expected pruning is unambiguous. The order of alphas is shuffled per layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_aimer.testing.encoders import fp8_block, mxfp4

__all__ = ["FAMILIES", "CHAT_TEMPLATE", "EXPERT_BIASES", "build_tiny_moe", "build_tokenizer",
           "expert_alphas", "add_mtp_layers", "fuse_experts", "quantize_experts",
           "quantize_experts_fp8", "quantize_experts_mxfp4", "write_json"]

FAMILIES = ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3",
            "ernie4_5_moe", "glm4_moe", "llama4", "gpt_oss")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "mixture of experts models route each token to a few experts",
    "pruning removes the least useful experts before serving",
    "vllm serves large language models with paged attention",
    "hello world, how are you today? fine, thank you.",
    "one two three four five six seven eight nine ten",
    "user: what is the capital of france? assistant: paris.",
]


def _config(family: str, num_layers: int, num_experts: int, top_k: int, vocab: int,
            kv_lora_rank: int = 256) -> Any:
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts_per_tok=top_k,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=num_experts, moe_intermediate_size=64,
                                           decoder_sparse_step=1, norm_topk_prob=True, **common)
    if family == "qwen2_moe":
        # A shared expert (with its sigmoid gate) next to the routed ones.
        return transformers.Qwen2MoeConfig(num_experts=num_experts, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=64,
                                           decoder_sparse_step=1, **common)
    if family in ("deepseek_v2", "deepseek_v3"):
        # MLA attention (vLLM's MLA backends need kv_lora_rank + qk_rope_head_dim in
        # {320, 512, 576}), a dense first layer, one shared expert, and a group-limited
        # router: 4 groups of 4 experts, tokens routed within 2 groups.
        mla = dict(kv_lora_rank=kv_lora_rank, q_lora_rank=None, qk_rope_head_dim=64,
                   qk_nope_head_dim=32, v_head_dim=32)
        # MLA has no grouped KV heads (transformers needs kv heads == heads).
        kw = {k: v for k, v in common.items() if k != "head_dim"} | {"num_key_value_heads": 2}
        moe = dict(n_routed_experts=num_experts, moe_intermediate_size=64, n_shared_experts=1,
                   first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True)
        if family == "deepseek_v2":
            return transformers.DeepseekV2Config(topk_method="group_limited_greedy",
                                                 **mla, **moe, **kw)
        # As in DeepSeek-V3's config.json: sigmoid scores with a score-correction bias.
        return transformers.DeepseekV3Config(topk_method="noaux_tc", scoring_func="sigmoid",
                                             **mla, **moe, **kw)
    if family == "ernie4_5_moe":
        # A dense first layer, one shared expert, float32 router and [1, E]
        # score-correction bias (`mlp.moe_statics.e_score_correction_bias`).
        kw = {k: v for k, v in common.items() if k != "num_experts_per_tok"}
        return transformers.Ernie4_5_MoeConfig(moe_num_experts=num_experts, moe_k=top_k,
                                               moe_intermediate_size=64, moe_num_shared_experts=1,
                                               moe_layer_start_index=1, moe_layer_interval=1,
                                               **kw)
    if family == "glm4_moe":
        # GLM-4.5 style: a dense first layer, one shared expert, sigmoid router with a
        # score-correction bias, q/k norms, partial rotary; 4 groups of 4 experts,
        # tokens routed within 2 groups (GLM-4.5 itself ships n_group 1).
        return transformers.Glm4MoeConfig(n_routed_experts=num_experts, moe_intermediate_size=64,
                                          n_shared_experts=1, first_k_dense_replace=1,
                                          n_group=4, topk_group=2, norm_topk_prob=True,
                                          use_qk_norm=True, attention_bias=True,
                                          partial_rotary_factor=0.5, **common)
    if family == "llama4":
        # Text-only Llama 4: MoE every second layer (interleave_moe_layer_step 2) with a
        # shared expert, dense layers intermediate_size_mlp wide, chunked attention;
        # experts fused as gate_up_proj [E, H, 2I] and down_proj [E, I, H]. Top-1
        # routing as released (vLLM applies the router weight on the input, top-1 only).
        return transformers.Llama4TextConfig(num_local_experts=num_experts,
                                             interleave_moe_layer_step=2,
                                             intermediate_size_mlp=128,
                                             attention_chunk_size=128,
                                             **common | {"num_experts_per_tok": 1})
    if family == "gpt_oss":
        # Fused experts with interleaved gate/up columns and biases, a router with a
        # bias, attention sinks, sliding and full attention layers.
        # YaRN as released (factor 32 over the original context), scaled to 512 positions.
        rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 16,
                "rope_theta": 150000.0}
        return transformers.GptOssConfig(num_local_experts=num_experts, sliding_window=128,
                                         rope_parameters=rope, **common)
    if family == "olmoe":
        return transformers.OlmoeConfig(num_experts=num_experts, **common)
    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=num_experts, **common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


# Tensors indexed by routed expert that transformers initialises to zero.
EXPERT_BIASES = ("e_score_correction_bias", "experts.gate_up_proj_bias", "experts.down_proj_bias",
                 "router.bias")


def build_tokenizer(directory: Path, vocab: int = 256) -> None:
    """A small BPE tokenizer (`vocab` tokens) with a chat template, trained here (no
    downloads) and saved to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def expert_alphas(num_layers: int, num_experts: int, seed: int) -> list[list[float]]:
    """Per layer, the alpha of each expert (a shuffled, evenly spaced ladder)."""
    g = torch.Generator().manual_seed(seed + 1)
    ladder = torch.linspace(0.6, 1.8, num_experts)
    return [ladder[torch.randperm(num_experts, generator=g)].tolist() for _ in range(num_layers)]


def build_tiny_moe(directory: str | Path, family: str = "qwen3_moe", *, num_layers: int = 4,
                   num_experts: int = 16, top_k: int = 2, seed: int = 0,
                   dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                   fused: bool = False, fp8_block: tuple[int, int] | None = None,
                   mxfp4: bool = False, mtp_layers: int = 0,
                   kv_lora_rank: int | None = None) -> Path:
    """Write a tiny random MoE checkpoint with a tokenizer to `directory`.

    fused: per-expert families rewritten with fused `experts.gate_up_proj` [E, 2I, H]
    and `experts.down_proj` [E, H, I] (llama4 and gpt_oss are always fused).
    fp8_block: store routed experts' weights block-quantized in float8_e4m3fn with
    `*.weight_scale_inv` per (rows, columns) block, as DeepSeek-V3 / Qwen3-FP8 do.
    mxfp4 (gpt_oss): store expert weights as MXFP4 `*_blocks` / `*_scales`, as the
    gpt-oss releases do.
    mtp_layers (deepseek_v3, glm4_moe): append that many multi-token-prediction layers
    at `model.layers.{num_layers + i}`, as DeepSeek-V3 and GLM-4.5 releases do.
    kv_lora_rank (deepseek_v2/v3): MLA's latent width (default 256); vLLM's CPU MLA
    decode kernel runs only DeepSeek's released 512 (+ 64 rope = 576).

    Returns:
        `directory`, as a Path.

    Raises:
        ValueError: `family` is not one of FAMILIES, or mxfp4 is asked of a family
            other than gpt_oss.
    """
    import transformers

    if mxfp4 and family != "gpt_oss":
        raise ValueError(f"mxfp4 checkpoints are gpt-oss's layout; got family {family!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = 256
    torch.manual_seed(seed)
    config = _config(family, num_layers, num_experts, top_k, vocab,
                     **({"kv_lora_rank": kv_lora_rank} if kv_lora_rank else {}))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    alphas = expert_alphas(num_layers, num_experts, seed)
    g = torch.Generator().manual_seed(seed + 2)
    state = model.state_dict()
    for name, tensor in state.items():
        # transformers keeps experts fused in memory ([E, ...] per layer) and writes
        # the family's per-expert layout on save.
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        for expert in range(tensor.shape[0]):
            u = torch.randn(tensor[expert].shape, generator=g)
            w = u.sign() * u.abs().pow(alphas[layer][expert])
            tensor[expert].copy_(0.05 * w / w.std())
    for name, tensor in state.items():
        # Expert-indexed biases start at zero: make them distinct so slicing shows.
        if name.endswith(EXPERT_BIASES):
            tensor.copy_(0.01 * torch.randn(tensor.shape, generator=g))
    model.load_state_dict(state)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    build_tokenizer(directory, vocab)
    if mtp_layers:
        add_mtp_layers(directory, num_layers, mtp_layers, num_experts, seed)
    if fused:
        fuse_experts(directory, family)
    if fp8_block:
        quantize_experts_fp8(directory, fp8_block)
    if mxfp4:
        quantize_experts_mxfp4(directory)
    return directory


def _rewrite_tensors(directory: Path, transform: Callable[[dict[str, torch.Tensor]],
                                                          dict[str, torch.Tensor]]) -> None:
    """Replace a checkpoint's safetensors files by one file of `transform(all tensors)`."""
    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        tensors.update(load_file(f))
    out = transform(tensors)
    for f in files:
        f.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})


def add_mtp_layers(directory: Path, num_layers: int, count: int, num_experts: int,
                   seed: int) -> None:
    """Append `count` MTP layers in DeepSeek-V3's layout (vLLM's deepseek_mtp.py and
    glm4_moe_mtp.py read them): layer `num_layers + i` is a copy of the last decoder
    layer with routed experts drawn afresh (their own shuffled alphas, so AIMER gives
    them their own plan), plus `enorm`, `hnorm`, `eh_proj [H, 2H]`, `shared_head.norm`,
    `shared_head.head` (the LM head) and `embed_tokens`, and sets
    `num_nextn_predict_layers` in config.json."""
    import re

    alphas = expert_alphas(num_layers + count, num_experts, seed)
    g = torch.Generator().manual_seed(seed + 3)
    last = f"model.layers.{num_layers - 1}."
    expert_re = re.compile(r"\.mlp\.experts\.(\d+)\.")

    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        hidden = tensors["model.embed_tokens.weight"].shape[1]
        for i in range(count):
            layer = num_layers + i
            prefix = f"model.layers.{layer}."
            for name, t in tensors.items():
                if not name.startswith(last):
                    continue
                new = prefix + name[len(last):]
                m = expert_re.search(new)
                if m:
                    u = torch.randn(t.shape, generator=g)
                    w = u.sign() * u.abs().pow(alphas[layer][int(m[1])])
                    out[new] = (0.05 * w / w.std()).to(t.dtype)
                else:
                    out[new] = (t + 0.01 * torch.randn(t.shape, generator=g)).to(t.dtype)
            dtype = tensors["model.embed_tokens.weight"].dtype
            out[prefix + "enorm.weight"] = torch.ones(hidden, dtype=dtype)
            out[prefix + "hnorm.weight"] = torch.ones(hidden, dtype=dtype)
            out[prefix + "eh_proj.weight"] = (
                0.05 * torch.randn(hidden, 2 * hidden, generator=g)).to(dtype)
            out[prefix + "shared_head.norm.weight"] = torch.ones(hidden, dtype=dtype)
            out[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
            out[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        return out

    _rewrite_tensors(directory, transform)
    _update_config(directory, num_nextn_predict_layers=count)


def _update_config(directory: Path, **values: Any) -> None:
    config = json.loads((directory / "config.json").read_text())
    write_json(directory / "config.json", config | values)


def quantize_experts_mxfp4(directory: Path) -> None:
    """Rewrite gpt-oss fused `experts.gate_up_proj` [E, H, 2I] and `experts.down_proj`
    [E, I, H] as `*_blocks` / `*_scales` over their [E, out, in] transposes, the layout
    of the gpt-oss MXFP4 releases, and record `quantization_config`."""
    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                out[name + "_blocks"], out[name + "_scales"] = mxfp4.encode_blocks(t.transpose(1, 2))
            else:
                out[name] = t
        return out

    _rewrite_tensors(directory, transform)
    _update_config(directory, quantization_config=dict(mxfp4.quantization_config(fused=True)))


def quantize_experts_fp8(directory: Path, block: tuple[int, int] = (128, 128),
                         also: str | None = None,
                         ignored_layers: list[str] | None = None) -> None:
    """Rewrite routed experts' weights as float8_e4m3fn with float32 block scales and
    record `quantization_config` in config.json, in the layout of block-FP8 checkpoints:
    per expert `experts.{id}.*.weight` + `*.weight_scale_inv`; fused
    `experts.gate_up_proj` [E, R, C] + `experts.gate_up_proj_scale_inv` [E, R/br, C/bc].
    `also`: a regex of more 2-D weights to quantize the same way (attention, as the
    released checkpoints do); `ignored_layers`: vLLM module names left unquantized."""
    import re

    fused = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")

    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if fused.search(name):
                parts = [fp8_block.encode(t[e], block) for e in range(t.shape[0])]
                out[name] = torch.stack([p["weight"] for p in parts]).contiguous()
                out[name + "_scale_inv"] = torch.stack(
                    [p["weight_scale_inv"] for p in parts]).contiguous()
            else:
                out[name] = t
        return out

    _rewrite_tensors(directory, transform)
    config = dict(fp8_block.quantization_config(block))
    if ignored_layers:
        config["ignored_layers"] = ignored_layers
    quantize_experts(directory, lambda w: fp8_block.encode(w, block), config,
                     pattern=_PER_EXPERT_WEIGHT + (f"|{also}" if also else ""))


_PER_EXPERT_WEIGHT = r"\.experts\.\d+\.[^.]+\.weight$"


def quantize_experts(directory: Path, encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                     quantization_config: Any, pattern: str = _PER_EXPERT_WEIGHT) -> None:
    """Rewrite every per-expert `experts.{id}.<proj>.weight` [out, in] (or every weight
    `pattern` matches) as the tensors `encode` returns (`<proj>.<suffix>`), and record
    `quantization_config`: a tiny checkpoint in any per-expert encoding of
    vllm_aimer.encodings (encoders in vllm_aimer.testing.encoders)."""
    import re

    per_expert = re.compile(pattern)

    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if per_expert.search(name) and t.is_floating_point() and t.element_size() > 1:
                base = name.removesuffix("weight")
                for suffix, q in encode(t).items():
                    out[base + suffix] = q
            else:
                out[name] = t
        return out

    _rewrite_tensors(directory, transform)
    _update_config(directory, quantization_config=dict(quantization_config))


def fuse_experts(directory: Path, family: str) -> None:
    """Rewrite per-expert tensors as fused `experts.gate_up_proj` [E, 2I, H] and
    `experts.down_proj` [E, H, I] (the layout of newer checkpoints)."""
    gate, up, down = (("w1", "w3", "w2") if family == "mixtral"
                      else ("gate_proj", "up_proj", "down_proj"))

    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for name, t in tensors.items():
            parts = name.split(".")
            if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
                i = parts.index("experts")
                prefix = ".".join(parts[: i + 1])
                groups.setdefault(prefix, {}).setdefault(int(parts[i + 1]), {})[parts[i + 2]] = t
            else:
                out[name] = t
        for prefix, experts in groups.items():
            ids = sorted(experts)
            out[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([experts[e][gate], experts[e][up]], dim=0) for e in ids]).contiguous()
            out[f"{prefix}.down_proj"] = torch.stack([experts[e][down] for e in ids]).contiguous()
        return out

    _rewrite_tensors(directory, transform)


def write_json(path: Path, data: Any) -> None:
    """Write `data` to `path` as indented JSON."""
    path.write_text(json.dumps(data, indent=1))
