"""Tiny MoE checkpoints built locally: the demo's default model and the tests' fixtures.

Each routed expert's weights are drawn as sign(u) * |u|^alpha with u Gaussian and
an alpha per expert, so AIMER scores are well separated (alpha < 1 flattens the
weights and raises the score, alpha > 1 concentrates them and lowers it) and the
expected pruning is unambiguous. The order of alphas is shuffled per layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3",
            "ernie4_5_moe", "glm4_moe")

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


def _config(family: str, num_layers: int, num_experts: int, top_k: int, vocab: int) -> Any:
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
        mla = dict(kv_lora_rank=256, q_lora_rank=None, qk_rope_head_dim=64,
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
    if family == "olmoe":
        return transformers.OlmoeConfig(num_experts=num_experts, **common)
    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=num_experts, **common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def build_tokenizer(directory: Path, vocab: int = 256) -> None:
    """A small BPE tokenizer with a chat template, trained here (no downloads)."""
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
                   fused: bool = False, fp8_block: tuple[int, int] | None = None) -> Path:
    """Write a tiny random MoE checkpoint with a tokenizer to `directory`.

    fp8_block: store routed experts' weights block-quantized in float8_e4m3fn with
    `*.weight_scale_inv` per (rows, columns) block, as DeepSeek-V3 / Qwen3-FP8 do.
    """
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = 256
    torch.manual_seed(seed)
    config = _config(family, num_layers, num_experts, top_k, vocab)
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
        # Score-correction biases start at zero: make them distinct so slicing shows.
        if name.endswith("e_score_correction_bias"):
            tensor.copy_(0.01 * torch.randn(tensor.shape, generator=g))
    model.load_state_dict(state)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    build_tokenizer(directory, vocab)
    if fused:
        fuse_experts(directory, family)
    if fp8_block:
        quantize_experts_fp8(directory, fp8_block)
    return directory


def quantize_experts_fp8(directory: Path, block: tuple[int, int] = (128, 128)) -> None:
    """Rewrite per-expert `experts.{id}.*.weight` tensors as float8_e4m3fn plus a float32
    `*.weight_scale_inv` [ceil(out/br), ceil(in/bc)] (block amax / 448), and record
    `quantization_config` in config.json, in the layout of block-FP8 checkpoints."""
    import re

    from safetensors.torch import load_file, save_file

    expert_weight = re.compile(r"\.experts\.\d+\.[^.]+\.weight$")
    files = sorted(directory.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
        f.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    br, bc = block
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not expert_weight.search(name):
            out[name] = t
            continue
        w = t.to(torch.float32)
        rows, cols = w.shape
        sr, sc = -(-rows // br), -(-cols // bc)
        padded = torch.zeros(sr * br, sc * bc)
        padded[:rows, :cols] = w
        blocks = padded.reshape(sr, br, sc, bc)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        q = (blocks / scale[:, None, :, None]).reshape(sr * br, sc * bc)[:rows, :cols]
        out[name] = q.to(torch.float8_e4m3fn).contiguous()
        out[name + "_scale_inv"] = scale.contiguous()
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": [br, bc]}
    write_json(directory / "config.json", config)


def fuse_experts(directory: Path, family: str) -> None:
    """Rewrite per-expert tensors as fused `experts.gate_up_proj` [E, 2I, H] and
    `experts.down_proj` [E, H, I] (the layout of newer checkpoints)."""
    from safetensors.torch import load_file, save_file

    gate, up, down = (("w1", "w3", "w2") if family == "mixtral"
                      else ("gate_proj", "up_proj", "down_proj"))
    files = sorted(directory.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
        f.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
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
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))
