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

FAMILIES = ("qwen3_moe", "olmoe", "mixtral")

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
                   fused: bool = False) -> Path:
    """Write a tiny random MoE checkpoint with a tokenizer to `directory`."""
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
    model.load_state_dict(state)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    build_tokenizer(directory, vocab)
    if fused:
        fuse_experts(directory, family)
    return directory


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
