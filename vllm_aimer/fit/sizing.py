"""A model's shape and weight bytes for `vllm-aimer fit`, without reading a weight:
exact from safetensors headers when a checkpoint is at hand (whatever the layout or
quantization), else from config.json through the family's `ShapeModel` (parameter
counts x the config's dtype)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_aimer.architectures import (Architecture, architecture_for, config_value,
                                     optional_int, text_config)
from vllm_aimer.checkpoint import Checkpoint
from vllm_aimer.constraints import ANYWHERE, Deployment, Router, allowed_prune_counts, prune_count
from vllm_aimer.errors import AimerError
from vllm_aimer.fit.options import KV_CACHE_DTYPE_BYTES
from vllm_aimer.layout import expert_groups, expert_layout

__all__ = ["ModelFacts", "DTYPE_BYTES", "model_dtype", "moe_layer_indices",
           "config_param_counts", "facts_from_config", "facts_from_checkpoint",
           "facts_for_checkpoint", "load_model_facts", "kv_cache_bytes_per_token"]

# Element sizes of the dtype names configs use (torch_dtype / dtype).
DTYPE_BYTES: Mapping[str, int] = {
    "float64": 8, "double": 8, "float32": 4, "float": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "half": 2, "fp16": 2,
}


@dataclass(frozen=True)
class ModelFacts:
    """A model's shape and weight bytes, split into what pruning removes and the rest."""
    family: str
    source: str
    """"safetensors headers" or "config.json"."""
    dtype: str
    dtype_bytes: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int | None
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    moe_intermediate_size: int | None
    total_bytes: int
    """Every weight of the dense (unpruned) model."""
    routed_expert_bytes: int
    """All routed experts of all MoE layers (what uniform pruning removes k/E of)."""
    router_bytes: int
    """Router tensors indexed by expert (rows go with their pruned expert)."""
    kv_vectors: int = 2
    """Cached vectors per KV head, token and layer: K and V (2), or MLA's one latent."""
    n_group: int = 1
    """Expert groups of a group-limited router (1: none); k must split over them."""
    topk_group: int = 1
    quantization: str = "unquantized"
    """The checkpoint's quantization (method and scheme), from its config."""
    scorable: bool = True
    """Whether AIMER can score the experts' encoding (else a plan file prunes them)."""

    @property
    def router(self) -> Router:
        return Router(self.num_experts, self.top_k, self.n_group, self.topk_group)

    def prune_counts(self, deployment: Deployment = ANYWHERE) -> list[int]:
        """Per-layer prune counts the loader accepts on `deployment`, ascending
        (see `constraints`: top_k floor, groups, EP split, kernel limits)."""
        return allowed_prune_counts(self.router, deployment)

    def prune_count(self, ratio: float, deployment: Deployment = ANYWHERE) -> int:
        """The loader's k for `ratio`; fails as the loader would."""
        return prune_count(len(self.moe_layers), self.router, ratio, deployment)

    @property
    def prunable_bytes(self) -> int:
        return self.routed_expert_bytes + self.router_bytes

    @property
    def non_expert_bytes(self) -> int:
        """What pruning never touches: embeddings, attention, norms, dense and shared MLPs."""
        return self.total_bytes - self.prunable_bytes

    @property
    def max_pruned_per_layer(self) -> int:
        """Every layer keeps at least top_k experts (and its groups stay equal)."""
        return self.prune_counts()[-1]

    def weight_bytes(self, pruned_per_layer: int) -> int:
        """Weights after pruning k experts in every MoE layer (experts are equal in size)."""
        return self.total_bytes - self.prunable_bytes * pruned_per_layer // self.num_experts


def model_dtype(config: Mapping[str, Any]) -> tuple[str, int]:
    """The dtype config.json declares (transformers 5 writes `dtype`, older `torch_dtype`)."""
    cfg = text_config(config)
    for source in (cfg, config):
        for key in ("torch_dtype", "dtype"):
            name = source.get(key)
            if isinstance(name, str):
                name = name.removeprefix("torch.")
                if name not in DTYPE_BYTES:
                    raise AimerError(
                        f"config.json has {key} {name!r}, which vllm-aimer fit cannot size.",
                        f"set {key} to one of bfloat16, float16, float32, or point fit at the "
                        "checkpoint directory so sizes come from its safetensors headers.")
                return name, DTYPE_BYTES[name]
    raise AimerError(
        "config.json has no torch_dtype or dtype, so weight bytes are unknown.",
        'add "torch_dtype": "bfloat16" (or the checkpoint\'s dtype) to config.json, or point '
        "fit at the checkpoint directory so sizes come from its safetensors headers.")


def _flag(cfg: Mapping[str, Any], keys: Sequence[str], default: bool = False) -> bool:
    for key in keys:
        if isinstance(cfg.get(key), bool):
            return cfg[key]
    return default


def moe_layer_indices(config: Mapping[str, Any], arch: Architecture) -> tuple[int, ...]:
    """Which decoder layers are MoE, by the family's rules (as its modeling code decides).

    Dense layers come from a first-MoE index (first_k_dense_replace,
    moe_layer_start_index), a last-MoE index (moe_layer_end_index, -1 = last), a step
    ((i + 1) % step == 0: decoder_sparse_step, moe_layer_interval) and an explicit
    list (mlp_only_layers). A family without those keys is MoE in every layer.
    """
    cfg = text_config(config)
    layers = config_value(config, ("num_hidden_layers",), "layer count")
    first = optional_int(cfg, arch.shape.first_moe_layer_keys) or 0
    last = optional_int(cfg, arch.shape.last_moe_layer_keys)
    last = layers - 1 if last is None or last < 0 else last
    step = optional_int(cfg, arch.shape.moe_layer_step_keys) or 1
    if step < 1:
        raise AimerError(f"config.json has a MoE layer step of {step} "
                         f"({'/'.join(arch.shape.moe_layer_step_keys)}).",
                         "the step must be 1 or more; check config.json.")
    dense: set[int] = set()
    for key in arch.shape.dense_layer_list_keys:
        value = cfg.get(key)
        if isinstance(value, list):
            dense.update(int(i) for i in value)
    return tuple(i for i in range(layers)
                 if first <= i <= last and (i + 1) % step == 0 and i not in dense)


def config_param_counts(config: Mapping[str, Any], arch: Architecture) -> dict[str, int]:
    """Parameter counts per component of a decoder-only MoE model, from config keys.

    Counts what the family's modeling code creates: embeddings (+ an untied lm_head),
    per layer q/k/v/o (+ biases), q/k norms and the two RMSNorms, a dense SwiGLU MLP
    (3 x hidden x intermediate) in dense layers, and in MoE layers the router
    (experts x hidden, + ERNIE's score-correction bias), routed experts (3 x hidden x
    moe_intermediate each) and shared experts; plus the final norm.
    """
    cfg = text_config(config)
    hidden = config_value(config, ("hidden_size",), "hidden_size")
    vocab = config_value(config, ("vocab_size",), "vocab_size")
    layers = config_value(config, ("num_hidden_layers",), "layer count (num_hidden_layers)")
    heads = config_value(config, ("num_attention_heads",), "num_attention_heads")
    kv_heads = optional_int(cfg, ("num_key_value_heads",)) or heads
    head_dim = optional_int(cfg, ("head_dim",)) or hidden // heads
    experts = config_value(config, arch.expert_count_keys, "routed expert count")
    moe_inter = config_value(config, arch.shape.moe_intermediate_keys,
                             "routed expert intermediate size")
    moe_layers = moe_layer_indices(config, arch)
    dense_layers = layers - len(moe_layers)
    dense_inter = (config_value(config, arch.shape.dense_intermediate_keys,
                                "dense MLP intermediate size") if dense_layers else 0)
    shared = optional_int(cfg, arch.shape.shared_expert_keys) or 0
    tied = _flag(cfg, ("tie_word_embeddings",), arch.shape.tie_word_embeddings_default)

    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if _flag(cfg, arch.shape.attention_bias_keys):
        attention += q + 2 * kv + hidden
    if arch.shape.qk_norm == "head":
        attention += 2 * head_dim
    elif arch.shape.qk_norm == "full":
        attention += hidden + (hidden // heads) * kv_heads
    # The gate is experts x hidden; any other router tensor (bias, score correction)
    # holds one value per expert.
    router_rows = experts * hidden + experts * (len(arch.names.router_tensors) - 1)
    return {
        "embeddings": vocab * hidden,
        "lm_head": 0 if tied else vocab * hidden,
        "attention": layers * attention,
        "norms": layers * 2 * hidden + hidden,
        "dense_mlp": dense_layers * 3 * hidden * dense_inter,
        "shared_experts": len(moe_layers) * 3 * hidden * moe_inter * shared,
        "router": len(moe_layers) * router_rows,
        "routed_experts": len(moe_layers) * experts * 3 * hidden * moe_inter,
    }


def _attention_shape(config: Mapping[str, Any], arch: Architecture) -> dict[str, Any]:
    cfg = text_config(config)
    heads = config_value(config, ("num_attention_heads",), "num_attention_heads")
    hidden = optional_int(cfg, ("hidden_size",))
    head_dim = optional_int(cfg, ("head_dim",))
    if head_dim is None:
        if hidden is None:
            raise AimerError("config.json has neither head_dim nor hidden_size.",
                             "check that the checkpoint's config.json is complete.")
        head_dim = hidden // heads
    kv_heads = optional_int(cfg, ("num_key_value_heads",)) or heads
    kv_vectors = 2
    latent = [cfg.get(k) for k in arch.shape.latent_kv_keys]
    if latent and all(isinstance(v, int) for v in latent):
        # MLA caches one latent vector per token and layer, the same on every rank.
        kv_heads, head_dim, kv_vectors = 1, sum(latent), 1
    return {
        "num_layers": config_value(config, ("num_hidden_layers",), "layer count"),
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "kv_vectors": kv_vectors,
        "max_position_embeddings": optional_int(cfg, ("max_position_embeddings",)),
    }


def facts_from_config(config: Mapping[str, Any]) -> ModelFacts:
    """Sizes from config.json alone: parameter counts x the declared dtype."""
    arch = architecture_for(config, purpose="fit")
    quant = text_config(config).get("quantization_config") or config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, Mapping) else "?"
        raise AimerError(
            f"config.json declares a quantized checkpoint (quant_method {method!r}); its "
            "weight bytes cannot be derived from the config alone.",
            "point fit at the checkpoint directory so sizes come from its safetensors headers.")
    dtype, dtype_bytes = model_dtype(config)
    counts = config_param_counts(config, arch)
    router_bytes = counts["router"] * (DTYPE_BYTES[arch.shape.router_dtype] if arch.shape.router_dtype
                                       else dtype_bytes)
    routed = counts["routed_experts"] * dtype_bytes
    other = sum(v for k, v in counts.items() if k not in ("router", "routed_experts"))
    num_experts = config_value(config, arch.expert_count_keys, "routed expert count")
    n_group, topk_group = expert_groups(config, arch, num_experts)
    return ModelFacts(
        family=arch.family, source="config.json", dtype=dtype,
        dtype_bytes=dtype_bytes, **_attention_shape(config, arch),
        n_group=n_group, topk_group=topk_group, num_experts=num_experts,
        top_k=config_value(config, arch.top_k_keys, "top_k (experts per token)"),
        moe_layers=moe_layer_indices(config, arch),
        moe_intermediate_size=config_value(config, arch.shape.moe_intermediate_keys,
                                           "routed expert intermediate size"),
        total_bytes=other * dtype_bytes + routed + router_bytes,
        routed_expert_bytes=routed, router_bytes=router_bytes)


_HEADER_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def facts_from_checkpoint(directory: str | Path) -> ModelFacts:
    """Exact sizes from the safetensors headers (open_checkpoint reads no tensor data
    beyond a 128 KiB identity sample per shard)."""
    from vllm_aimer.checkpoint import open_checkpoint

    return facts_for_checkpoint(open_checkpoint(directory))


def facts_for_checkpoint(ckpt: Checkpoint) -> ModelFacts:
    """Sizes from a checkpoint's headers: every tensor as stored (packed codes, scales,
    zero points of quantized experts included), so quantized releases are sized
    exactly; routed-expert bytes are all of each expert's tensors."""
    layout = expert_layout(ckpt, scoring=False)  # also places every expert tensor
    arch, num_experts = layout.arch, layout.num_experts
    # MTP layers lose the same k experts (the loader prunes them too), but the ratio
    # and its k come from the trunk layers.
    routed = sum(sum(layout.expert_bytes[layer]) for layer in layout.all_layers)
    router = sum(t.nbytes for t in ckpt.tensors.values() if arch.names.match_router(t.name) is not None)
    n_group, topk_group = layout.n_group, layout.topk_group
    try:
        dtype, dtype_bytes = model_dtype(ckpt.config)
    except AimerError:
        # No usable dtype in config.json: the dtype most weight bytes are stored in.
        by_dtype: Counter[str] = Counter()
        for t in ckpt.tensors.values():
            if t.dtype in _HEADER_DTYPE_NAMES:
                by_dtype[t.dtype] += t.nbytes
        if not by_dtype:
            raise
        dtype = _HEADER_DTYPE_NAMES[by_dtype.most_common(1)[0][0]]
        dtype_bytes = DTYPE_BYTES[dtype]
    return ModelFacts(
        family=arch.family, source="safetensors headers", dtype=dtype,
        dtype_bytes=dtype_bytes, **_attention_shape(ckpt.config, arch), num_experts=num_experts,
        n_group=n_group, topk_group=topk_group,
        top_k=layout.top_k, moe_layers=layout.layers,
        moe_intermediate_size=optional_int(text_config(ckpt.config), arch.shape.moe_intermediate_keys),
        total_bytes=ckpt.total_bytes, routed_expert_bytes=routed, router_bytes=router,
        quantization=layout.quant.describe(), scorable=layout.scorable)


def _has_safetensors(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or (
        directory / "model.safetensors.index.json").is_file()


def load_model_facts(model: str | Path) -> tuple[ModelFacts, Path]:
    """Facts for a checkpoint directory (headers) or a config.json (or a directory
    holding only one); also the directory `vllm serve` should be given."""
    path = Path(model)
    if path.is_dir():
        if _has_safetensors(path):
            return facts_from_checkpoint(path), path
        config_path = path / "config.json"
        if not config_path.is_file():
            raise AimerError(f"{path} has neither safetensors weights nor a config.json.",
                             "pass a checkpoint directory or the model's config.json.")
    elif path.is_file():
        config_path = path
    else:
        raise AimerError(f"model {str(model)!r} does not exist.",
                         "pass a local checkpoint directory or a config.json file.")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AimerError(f"{config_path} is not a readable JSON config ({e}).",
                         "pass the model's config.json (or its checkpoint directory).") from None
    if not isinstance(config, Mapping):
        raise AimerError(f"{config_path} is not a JSON object.",
                         "pass the model's config.json (or its checkpoint directory).")
    return facts_from_config(config), config_path.parent


def kv_cache_bytes_per_token(facts: ModelFacts, kv_cache_dtype: str = "auto") -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x element size (MLA:
    one latent of kv_lora_rank + qk_rope_head_dim per layer)."""
    size = KV_CACHE_DTYPE_BYTES[kv_cache_dtype] or facts.dtype_bytes
    return facts.kv_vectors * facts.num_layers * facts.num_kv_heads * facts.head_dim * size
