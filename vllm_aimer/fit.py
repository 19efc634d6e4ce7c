"""`vllm-aimer fit`: how far a MoE model must be pruned to fit on N GPUs.

Everything here is arithmetic on a model's shape; no weight is read. Sizes come
from safetensors headers when a checkpoint is at hand (exact, whatever the
layout or quantization), otherwise from config.json through the family's entry
in the architecture table (parameter counts x the config's dtype).

The memory model is vLLM's: with tensor parallelism over N GPUs each GPU holds
1/N of the weights and the KV cache of its share of the KV heads (heads are
replicated when there are fewer than N), and vLLM may use
`--gpu-memory-utilization` x the GPU's memory in all. A fixed per-GPU runtime
overhead (activations, CUDA graphs, NCCL buffers, the CUDA context) is set aside
first. Pruning is uniform (k experts per MoE layer, k = 0 .. E - top_k), so the
ratios tried are k / E and each maps back to exactly k through `prune_count`.
"""

from __future__ import annotations

import json
import math
import shlex
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_aimer.architectures import Architecture, architecture_for, config_value, text_config
from vllm_aimer.checkpoint import Checkpoint
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import expert_groups, expert_layout
from vllm_aimer.constraints import (ANYWHERE, Deployment, Gpu, Router, allowed_prune_counts,
                                   check_ratio, prune_count)

GIB = 1024**3

DEFAULT_GPU_MEMORY_GIB = 80.0
"""Nominal size of an 80 GB A100/H100. CUDA reports a little less (about 79.2 GiB
on an H100 80GB); pass the figure your GPUs report for a tight plan."""
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default --gpu-memory-utilization."""
DEFAULT_OVERHEAD_GIB = 1.5
"""Per-GPU memory vLLM uses besides weights and KV cache: peak activations of the
profiling run, CUDA graphs, NCCL buffers and non-torch allocations. 1.5 GiB is
a typical total for models of this size; raise it for very long prefills."""
DEFAULT_MAX_NUM_SEQS = 1
"""Full-length sequences the KV cache must hold. vLLM refuses to start unless at
least one max_model_len sequence fits; raise it to reserve room for concurrency."""
DEFAULT_RATIO = 0.5
TABLE_GPU_COUNTS: tuple[int, ...] = (1, 2, 4, 8)

# Element sizes of the dtype names configs use (torch_dtype / dtype).
DTYPE_BYTES: Mapping[str, int] = {
    "float64": 8, "double": 8, "float32": 4, "float": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "half": 2, "fp16": 2,
}
# vLLM's --kv-cache-dtype values and their element size (None: the model dtype).
KV_CACHE_DTYPE_BYTES: Mapping[str, int | None] = {
    "auto": None, "bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1,
}


# --------------------------------------------------------------------------- inputs

def _number(value: Any, flag: str, fix: str) -> float:
    if isinstance(value, bool):
        raise AimerError(f"{flag} must be a number, got {value!r}.", fix)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AimerError(f"{flag} must be a number, got {value!r}.", fix) from None
    if not math.isfinite(number):
        raise AimerError(f"{flag} must be a finite number, got {value!r}.", fix)
    return number


def _positive_int(value: Any, flag: str, fix: str) -> int:
    number = _number(value, flag, fix)
    if number != int(number) or number < 1:
        raise AimerError(f"{flag} must be a positive integer, got {value!r}.", fix)
    return int(number)


@dataclass(frozen=True)
class FitOptions:
    """What the user asked for; built by `fit_options`, which checks every value."""
    gpus: int | None = None
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    overhead_gib: float = DEFAULT_OVERHEAD_GIB
    max_model_len: int | None = None
    """None: the model's max_position_embeddings (vLLM's default)."""
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    kv_cache_dtype: str = "auto"
    ratio: float = DEFAULT_RATIO
    expert_parallel: bool = False
    """Serve with --enable-expert-parallel: the EP size is then the GPU count."""
    gpu: Gpu = Gpu.ANY
    """The GPU kind whose MoE kernel limits apply to the kept count."""

    def deployment(self, gpus: int) -> Deployment:
        return Deployment(ep_size=gpus if self.expert_parallel else 1, gpu=self.gpu)

    @property
    def budget_bytes(self) -> int:
        """What vLLM may use per GPU: memory x utilization."""
        return int(self.gpu_memory_gib * self.gpu_memory_utilization * GIB)

    @property
    def overhead_bytes(self) -> int:
        return int(self.overhead_gib * GIB)


def fit_options(*, gpus: Any = None, gpu_memory_gib: Any = None,
                gpu_memory_utilization: Any = None, overhead_gib: Any = None,
                max_model_len: Any = None, max_num_seqs: Any = None,
                kv_cache_dtype: Any = None, ratio: Any = None,
                expert_parallel: bool = False, gpu: Any = None) -> FitOptions:
    """Check raw option values (strings from the command line, or numbers); None = default.

    Each bad value gets an AimerError naming the flag and the fix, so the CLI can
    answer with one line instead of argparse's usage dump.
    """
    opts: dict[str, Any] = {}
    if gpus is not None:
        opts["gpus"] = _positive_int(
            gpus, "--gpus", "pass how many GPUs to shard the model over with tensor "
            "parallelism, e.g. --gpus 2 (at least 1).")
    if gpu_memory_gib is not None:
        g = _number(gpu_memory_gib, "--gpu-memory-gib",
                    "pass one GPU's memory in GiB, e.g. --gpu-memory-gib 80.")
        if g <= 0:
            raise AimerError(f"--gpu-memory-gib must be positive, got {gpu_memory_gib!r}.",
                             "pass one GPU's memory in GiB, e.g. --gpu-memory-gib 80.")
        opts["gpu_memory_gib"] = g
    if gpu_memory_utilization is not None:
        u = _number(gpu_memory_utilization, "--gpu-memory-utilization",
                    "pass the fraction of GPU memory vLLM may use, in (0, 1], e.g. 0.9.")
        if not 0.0 < u <= 1.0:
            raise AimerError(
                f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization!r}.",
                "pass the fraction of GPU memory vLLM may use, e.g. 0.9 (not a percentage).")
        opts["gpu_memory_utilization"] = u
    if overhead_gib is not None:
        o = _number(overhead_gib, "--overhead-gib",
                    "pass the per-GPU runtime overhead in GiB, e.g. --overhead-gib 1.5.")
        if o < 0:
            raise AimerError(f"--overhead-gib must be 0 or more, got {overhead_gib!r}.",
                             "pass the per-GPU runtime overhead in GiB, e.g. 1.5.")
        opts["overhead_gib"] = o
    if max_model_len is not None:
        opts["max_model_len"] = _positive_int(
            max_model_len, "--max-model-len",
            "pass the longest sequence (prompt + output) to serve, in tokens, e.g. 32768.")
    if max_num_seqs is not None:
        opts["max_num_seqs"] = _positive_int(
            max_num_seqs, "--max-num-seqs",
            "pass how many full-length sequences the KV cache must hold at once, e.g. 8.")
    if kv_cache_dtype is not None:
        if kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
            raise AimerError(
                f"--kv-cache-dtype {kv_cache_dtype!r} is not a vLLM KV cache dtype.",
                f"use one of {', '.join(KV_CACHE_DTYPE_BYTES)} (auto: the model's dtype).")
        opts["kv_cache_dtype"] = kv_cache_dtype
    if ratio is not None:
        opts["ratio"] = check_ratio(_number(
            ratio, "--ratio", "pass the fraction of routed experts to prune, e.g. 0.5."))
    if gpu is not None:
        kinds = [g.value for g in Gpu]
        if gpu not in kinds:
            raise AimerError(f"--gpu {gpu!r} is not a GPU kind vllm-aimer knows.",
                             f"use one of {', '.join(kinds)} (blackwell: NVIDIA B200/GB200/"
                             "B300, whose TRT-LLM MoE kernels limit the kept count).")
        opts["gpu"] = Gpu(gpu)
    return FitOptions(expert_parallel=bool(expert_parallel), **opts)


# --------------------------------------------------------------------------- model sizes

@dataclass(frozen=True)
class ModelFacts:
    """A model's shape and weight bytes, split into what pruning removes and the rest."""
    family: str
    serving: bool
    """Whether `--load-format aimer` can prune this family at load time."""
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


def _optional_int(cfg: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


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
    first = _optional_int(cfg, arch.first_moe_layer_keys) or 0
    last = _optional_int(cfg, arch.last_moe_layer_keys)
    last = layers - 1 if last is None or last < 0 else last
    step = _optional_int(cfg, arch.moe_layer_step_keys) or 1
    if step < 1:
        raise AimerError(f"config.json has a MoE layer step of {step} "
                         f"({'/'.join(arch.moe_layer_step_keys)}).",
                         "the step must be 1 or more; check config.json.")
    dense: set[int] = set()
    for key in arch.dense_layer_list_keys:
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
    kv_heads = _optional_int(cfg, ("num_key_value_heads",)) or heads
    head_dim = _optional_int(cfg, ("head_dim",)) or hidden // heads
    experts = config_value(config, arch.expert_count_keys, "routed expert count")
    moe_inter = config_value(config, arch.moe_intermediate_keys,
                             "routed expert intermediate size")
    moe_layers = moe_layer_indices(config, arch)
    dense_layers = layers - len(moe_layers)
    dense_inter = (config_value(config, arch.dense_intermediate_keys,
                                "dense MLP intermediate size") if dense_layers else 0)
    shared = _optional_int(cfg, arch.shared_expert_keys) or 0
    tied = _flag(cfg, ("tie_word_embeddings",), arch.tie_word_embeddings_default)

    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if _flag(cfg, arch.attention_bias_keys):
        attention += q + 2 * kv + hidden
    if arch.qk_norm == "head":
        attention += 2 * head_dim
    elif arch.qk_norm == "full":
        attention += hidden + (hidden // heads) * kv_heads
    # The gate is experts x hidden; any other router tensor (bias, score correction)
    # holds one value per expert.
    router_rows = experts * hidden + experts * (len(arch.router_tensors) - 1)
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
    hidden = _optional_int(cfg, ("hidden_size",))
    head_dim = _optional_int(cfg, ("head_dim",))
    if head_dim is None:
        if hidden is None:
            raise AimerError("config.json has neither head_dim nor hidden_size.",
                             "check that the checkpoint's config.json is complete.")
        head_dim = hidden // heads
    kv_heads = _optional_int(cfg, ("num_key_value_heads",)) or heads
    kv_vectors = 2
    latent = [cfg.get(k) for k in arch.latent_kv_keys]
    if latent and all(isinstance(v, int) for v in latent):
        # MLA caches one latent vector per token and layer, the same on every rank.
        kv_heads, head_dim, kv_vectors = 1, sum(latent), 1
    return {
        "num_layers": config_value(config, ("num_hidden_layers",), "layer count"),
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "kv_vectors": kv_vectors,
        "max_position_embeddings": _optional_int(cfg, ("max_position_embeddings",)),
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
    router_bytes = counts["router"] * (DTYPE_BYTES[arch.router_dtype] if arch.router_dtype
                                       else dtype_bytes)
    routed = counts["routed_experts"] * dtype_bytes
    other = sum(v for k, v in counts.items() if k not in ("router", "routed_experts"))
    num_experts = config_value(config, arch.expert_count_keys, "routed expert count")
    n_group, topk_group = expert_groups(config, arch, num_experts)
    return ModelFacts(
        family=arch.family, serving=arch.serving, source="config.json", dtype=dtype,
        dtype_bytes=dtype_bytes, **_attention_shape(config, arch),
        n_group=n_group, topk_group=topk_group, num_experts=num_experts,
        top_k=config_value(config, arch.top_k_keys, "top_k (experts per token)"),
        moe_layers=moe_layer_indices(config, arch),
        moe_intermediate_size=config_value(config, arch.moe_intermediate_keys,
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
    arch = architecture_for(ckpt.config, purpose="headers")
    quantization, scorable = "unquantized", True
    if arch.serving:
        layout = expert_layout(ckpt, scoring=False)  # also places every expert tensor
        num_experts, top_k, layers = layout.num_experts, layout.top_k, layout.layers
        # MTP layers lose the same k experts (the loader prunes them too), but the ratio
        # and its k come from the trunk layers.
        routed = sum(sum(layout.expert_bytes[layer]) for layer in layout.all_layers)
        quantization, scorable = layout.quant.describe(), layout.scorable
    else:
        num_experts = config_value(ckpt.config, arch.expert_count_keys, "routed expert count")
        top_k = config_value(ckpt.config, arch.top_k_keys, "top_k (experts per token)")
        per_layer: Counter[int] = Counter()
        for info in ckpt.tensors.values():
            hit = arch.match_expert(info.name)
            if hit is not None:
                per_layer[hit[0]] += info.nbytes
            elif (fused := arch.match_fused(info.name)) is not None:
                per_layer[fused[0]] += info.nbytes
        if not per_layer:
            raise AimerError(
                f"found no routed-expert tensors for family {arch.family} in {ckpt.directory}.",
                "check that this is a Mixture-of-Experts checkpoint in Hugging Face layout.")
        layers = tuple(sorted(per_layer))
        routed = sum(per_layer.values())
    router = sum(t.nbytes for t in ckpt.tensors.values() if arch.match_router(t.name) is not None)
    n_group, topk_group = expert_groups(ckpt.config, arch, num_experts)
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
        family=arch.family, serving=arch.serving, source="safetensors headers", dtype=dtype,
        dtype_bytes=dtype_bytes, **_attention_shape(ckpt.config, arch), num_experts=num_experts,
        n_group=n_group, topk_group=topk_group,
        top_k=top_k, moe_layers=tuple(layers),
        moe_intermediate_size=_optional_int(text_config(ckpt.config), arch.moe_intermediate_keys),
        total_bytes=ckpt.total_bytes, routed_expert_bytes=routed, router_bytes=router,
        quantization=quantization, scorable=scorable)


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


# --------------------------------------------------------------------------- fitting

def kv_cache_bytes_per_token(facts: ModelFacts, kv_cache_dtype: str = "auto") -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x element size (MLA:
    one latent of kv_lora_rank + qk_rope_head_dim per layer)."""
    size = KV_CACHE_DTYPE_BYTES[kv_cache_dtype] or facts.dtype_bytes
    return facts.kv_vectors * facts.num_layers * facts.num_kv_heads * facts.head_dim * size


def kv_heads_per_gpu(num_kv_heads: int, gpus: int) -> int:
    """vLLM shards KV heads over tensor-parallel ranks and replicates them when there
    are fewer heads than ranks, so a GPU never holds less than one head."""
    return max(1, num_kv_heads // gpus)


def tensor_parallel_problem(facts: ModelFacts, gpus: int) -> str | None:
    """Why vLLM cannot shard this model over `gpus` ranks, or None."""
    if facts.num_attention_heads % gpus:
        return (f"{facts.num_attention_heads} attention heads are not divisible by "
                f"tensor parallel size {gpus}")
    kv = facts.num_kv_heads
    if (gpus < kv and kv % gpus) or (gpus > kv and gpus % kv):
        return f"{kv} KV heads cannot be split or replicated evenly over {gpus} GPUs"
    if facts.moe_intermediate_size and facts.moe_intermediate_size % gpus:
        return (f"expert intermediate size {facts.moe_intermediate_size} is not divisible "
                f"by tensor parallel size {gpus}")
    return None


@dataclass(frozen=True)
class Fit:
    """The outcome for one GPU count: the smallest k that fits, or why none does."""
    gpus: int
    pruned_per_layer: int | None
    """Smallest per-layer prune count that fits; None when nothing fits."""
    ratio: str | None
    """That k as a prune_ratio (exact decimal text that `prune_count` maps back to k)."""
    budget_bytes: int
    overhead_bytes: int
    kv_cache_bytes: int
    """Per GPU."""
    weight_bytes: int
    """Per GPU, at the chosen k (or at the max ratio when nothing fits)."""
    non_expert_bytes: int
    """Per GPU: the part of weight_bytes pruning cannot remove."""
    reason: str | None = None
    """Why nothing fits, with the numbers."""
    why: str | None = None
    """The short form of reason, for the table."""

    @property
    def fits(self) -> bool:
        return self.pruned_per_layer is not None

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.overhead_bytes


def ratio_text(facts: ModelFacts, k: int, deployment: Deployment = ANYWHERE) -> str:
    """k/E as decimal text that the loader's `prune_count` turns back into exactly k."""
    text = f"{k / facts.num_experts:.10g}"
    if facts.prune_count(float(text), deployment) == k:
        return text
    return repr(k / facts.num_experts)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def fit_on(facts: ModelFacts, opts: FitOptions, gpus: int, max_model_len: int) -> Fit:
    """Smallest uniform prune count whose weights/N + KV + overhead fit one GPU's budget.

    Weights shrink with k and nothing else does, so the first k that fits is the answer;
    when even k = E - top_k does not fit, the reason names the part that is too big.
    """
    budget, overhead = opts.budget_bytes, opts.overhead_bytes
    kv_token = kv_cache_bytes_per_token(facts, opts.kv_cache_dtype)
    kv = (max_model_len * opts.max_num_seqs * kv_token
          * kv_heads_per_gpu(facts.num_kv_heads, gpus) // facts.num_kv_heads)
    non_expert = math.ceil(facts.non_expert_bytes / gpus)
    common = dict(gpus=gpus, budget_bytes=budget, overhead_bytes=overhead, kv_cache_bytes=kv,
                  non_expert_bytes=non_expert)
    problem = tensor_parallel_problem(facts, gpus)
    if problem:
        return Fit(pruned_per_layer=None, ratio=None,
                   weight_bytes=math.ceil(facts.weight_bytes(0) / gpus),
                   reason=f"vLLM cannot use tensor parallel size {gpus}: {problem}",
                   why=problem, **common)
    deployment = opts.deployment(gpus)
    counts = facts.prune_counts(deployment)
    for k in counts:
        weights = math.ceil(facts.weight_bytes(k) / gpus)
        if weights + kv + overhead <= budget:
            return Fit(pruned_per_layer=k, ratio=ratio_text(facts, k, deployment),
                       weight_bytes=weights, **common)
    k_max = counts[-1]
    weights = math.ceil(facts.weight_bytes(k_max) / gpus)
    kept = weights - non_expert
    total = weights + kv + overhead
    max_r = k_max / facts.num_experts
    head = (f"does not fit on {gpus} GPU{'s' if gpus > 1 else ''} even at the max ratio "
            f"{max_r:.4g} ({facts.num_experts - k_max} of {facts.num_experts} experts kept per layer): per GPU "
            f"non-expert weights {gib(non_expert)} + kept experts {gib(kept)} + KV cache "
            f"{gib(kv)} + overhead {gib(overhead)} = {gib(total)} > {gib(budget)} "
            f"({opts.gpu_memory_gib:g} GiB x {opts.gpu_memory_utilization:g})")
    if overhead >= budget:
        why = "the overhead alone exceeds the budget"
    elif non_expert + overhead > budget:
        why = "the non-expert weights alone exceed the budget (pruning cannot help)"
    elif kv + overhead > budget:
        why = (f"the KV cache alone ({max_model_len} tokens x {opts.max_num_seqs} sequences) "
               "exceeds the budget")
    elif non_expert + kv + overhead > budget:
        why = "non-expert weights and KV cache together exceed the budget"
    elif k_max < facts.num_experts - facts.top_k:
        why = (f"the {facts.num_experts - k_max} experts per layer this deployment needs at "
               "least (router groups, expert-parallel split, GPU kernels) do not fit next to "
               "the rest")
    else:
        why = "the top_k experts every layer must keep do not fit next to the rest"
    return Fit(pruned_per_layer=None, ratio=None, weight_bytes=weights,
               reason=f"{head}; {why}", why=why, **common)


def serve_command(model_dir: Path, facts: ModelFacts, opts: FitOptions, fit: Fit,
                  max_model_len: int) -> str:
    """The `vllm serve` line for a fit (no aimer flags when nothing needs pruning)."""
    parts = ["vllm", "serve", shlex.quote(str(model_dir)),
             "--tensor-parallel-size", str(fit.gpus)]
    if opts.expert_parallel:
        parts.append("--enable-expert-parallel")
    if fit.pruned_per_layer:
        extra = json.dumps({"prune_ratio": json.loads(fit.ratio or "0")})
        parts += ["--load-format", "aimer", "--model-loader-extra-config", shlex.quote(extra)]
    parts += ["--max-model-len", str(max_model_len),
              "--gpu-memory-utilization", f"{opts.gpu_memory_utilization:g}"]
    if opts.max_num_seqs != DEFAULT_MAX_NUM_SEQS:
        parts += ["--max-num-seqs", str(opts.max_num_seqs)]
    if opts.kv_cache_dtype != "auto":
        parts += ["--kv-cache-dtype", opts.kv_cache_dtype]
    return " ".join(parts)


@dataclass(frozen=True)
class FitReport:
    model_dir: Path
    """The directory `vllm serve` is pointed at (a config.json's own directory)."""
    facts: ModelFacts
    options: FitOptions
    max_model_len: int
    ratio_pruned_per_layer: int
    """k for --ratio (the loader's prune_count)."""
    table: tuple[Fit, ...]
    requested: Fit | None
    """The row for --gpus, None without it."""
    notes: tuple[str, ...] = field(default=())

    @property
    def chosen(self) -> Fit | None:
        """The fit the serve command is for: --gpus's, else the smallest count that fits."""
        if self.requested is not None:
            return self.requested if self.requested.fits else None
        return next((f for f in self.table if f.fits), None)

    @property
    def command(self) -> str | None:
        chosen = self.chosen
        return (serve_command(self.model_dir, self.facts, self.options, chosen,
                              self.max_model_len) if chosen else None)

    @property
    def exit_code(self) -> int:
        """1 when --gpus was given and nothing fits (like grep finding nothing), else 0."""
        return 1 if self.requested is not None and not self.requested.fits else 0

    def to_json(self) -> dict[str, Any]:
        f, opts = self.facts, self.options
        req = self.requested
        return {
            "model": str(self.model_dir),
            "family": f.family,
            "size_source": f.source,
            "load_time_pruning_supported": f.serving,
            "dtype": f.dtype,
            "experts_per_layer": [f.num_experts, f.num_experts - self.ratio_pruned_per_layer],
            "top_k": f.top_k,
            "expert_parallel": opts.expert_parallel,
            "gpu": opts.gpu.value,
            "quantization": f.quantization,
            "aimer_scoring": f.scorable,
            "moe_layers": len(f.moe_layers),
            "max_ratio": f.max_pruned_per_layer / f.num_experts,
            "dense_weight_bytes": f.total_bytes,
            "non_expert_weight_bytes": f.non_expert_bytes,
            "routed_expert_bytes": f.routed_expert_bytes,
            "router_bytes": f.router_bytes,
            "ratio": opts.ratio,
            "pruned_experts_per_layer": self.ratio_pruned_per_layer,
            "pruned_weight_bytes": f.weight_bytes(self.ratio_pruned_per_layer),
            "kv_cache_dtype": opts.kv_cache_dtype,
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(f, opts.kv_cache_dtype),
            "max_model_len": self.max_model_len,
            "max_num_seqs": opts.max_num_seqs,
            "gpu_memory_gib": opts.gpu_memory_gib,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "overhead_gib": opts.overhead_gib,
            "budget_bytes_per_gpu": opts.budget_bytes,
            "gpus": opts.gpus,
            "min_ratio": _ratio_value(self.facts, req) if req is not None else None,
            "fits": req.fits if req is not None else None,
            "reason": req.reason if req is not None else None,
            "serve_command": self.command,
            "table": [_row_json(f, row) for row in self.table],
            "notes": list(self.notes),
        }


def _ratio_value(facts: ModelFacts, row: Fit) -> float | None:
    """k/E of a fit; None when nothing fits."""
    return None if row.pruned_per_layer is None else row.pruned_per_layer / facts.num_experts


def _row_json(facts: ModelFacts, row: Fit) -> dict[str, Any]:
    return {"gpus": row.gpus, "fits": row.fits,
            "min_ratio": _ratio_value(facts, row),
            "pruned_experts_per_layer": row.pruned_per_layer,
            "weight_bytes_per_gpu": row.weight_bytes,
            "kv_cache_bytes_per_gpu": row.kv_cache_bytes,
            "overhead_bytes_per_gpu": row.overhead_bytes,
            "total_bytes_per_gpu": row.total_bytes,
            "budget_bytes_per_gpu": row.budget_bytes,
            "reason": row.reason}


def plan_fit(facts: ModelFacts, opts: FitOptions, model_dir: Path) -> FitReport:
    """The whole answer: sizes, the --ratio figure, the table and the --gpus row."""
    max_model_len = opts.max_model_len or facts.max_position_embeddings
    if max_model_len is None:
        raise AimerError("config.json has no max_position_embeddings to default "
                         "--max-model-len to.", "pass --max-model-len, e.g. 32768.")
    k_ratio = facts.prune_count(opts.ratio)
    counts = sorted(set(TABLE_GPU_COUNTS) | ({opts.gpus} if opts.gpus else set()))
    table = tuple(fit_on(facts, opts, n, max_model_len) for n in counts)
    requested = next((row for row in table if row.gpus == opts.gpus), None)
    notes = []
    if facts.source == "config.json":
        notes.append("sizes come from config.json alone: point `vllm serve` at the full "
                     "checkpoint directory if it is not the config's own directory.")
    if not facts.serving:
        notes.append(f"{facts.family}: load-time pruning (--load-format aimer) is not "
                     "implemented for this family yet; fit only sizes it.")
    if not facts.scorable:
        notes.append(f"AIMER cannot score this checkpoint's expert encoding ({facts.quantization}): "
                     "prune it with a plan file (`plan` in --model-loader-extra-config) instead "
                     "of prune_ratio.")
    if facts.dtype_bytes == 4:
        notes.append("config dtype is float32: vLLM's --dtype auto serves float32 checkpoints "
                     "in 16 bits on GPUs, so these weight and KV figures are about twice what "
                     "vLLM will allocate (conservative).")
    if facts.max_position_embeddings and max_model_len > facts.max_position_embeddings:
        notes.append(f"--max-model-len {max_model_len} exceeds max_position_embeddings "
                     f"{facts.max_position_embeddings}; vLLM rejects that unless rope "
                     "scaling extends the context.")
    return FitReport(model_dir, facts, opts, max_model_len, k_ratio, table, requested,
                     tuple(notes))


def render_fit(report: FitReport) -> str:
    """The human-readable answer."""
    f, opts = report.facts, report.options
    k = report.ratio_pruned_per_layer
    kv_token = kv_cache_bytes_per_token(f, opts.kv_cache_dtype)
    kv_name = (f"auto ({f.dtype})" if opts.kv_cache_dtype == "auto" else opts.kv_cache_dtype)
    lines = [
        f"model     {report.model_dir} ({f.family}, sizes from {f.source})",
        f"experts   {f.num_experts} per layer x {len(f.moe_layers)} MoE layers, top_k {f.top_k}; "
        f"max ratio {f.max_pruned_per_layer / f.num_experts:.4g} "
        f"(keeps {f.num_experts - f.max_pruned_per_layer})",
        f"weights   dense {gib(f.total_bytes)} (non-expert {gib(f.non_expert_bytes)}, routed "
        f"experts + router {gib(f.prunable_bytes)}), {f.dtype}"
        + (f", stored {f.quantization}" if f.quantization != "unquantized" else ""),
        f"          at ratio {opts.ratio:g} ({k} of {f.num_experts} pruned per layer): "
        f"{gib(f.weight_bytes(k))}",
        f"KV cache  {kv_token} B/token ({kv_name}); budgeted {report.max_model_len} tokens x "
        f"{opts.max_num_seqs} sequence{'s' if opts.max_num_seqs > 1 else ''}",
        f"per GPU   {opts.gpu_memory_gib:g} GiB x {opts.gpu_memory_utilization:g} = "
        f"{gib(opts.budget_bytes)}, of which {gib(opts.overhead_bytes)} runtime overhead",
        *([f"ratios    only those safe"
           + (" with expert parallelism over the GPUs (kept count a multiple of the GPU "
              "count)" if opts.expert_parallel else "") + f" on {opts.gpu.label}"]
          if opts.expert_parallel or opts.gpu is not Gpu.ANY else []),
        "",
        f"{'GPUs':>4}  {'min ratio':<10} {'weights/GPU':>12} {'KV/GPU':>11} {'total/GPU':>11}",
    ]
    for row in report.table:
        if row.fits:
            lines.append(f"{row.gpus:>4}  {row.ratio:<10} {gib(row.weight_bytes):>12} "
                         f"{gib(row.kv_cache_bytes):>11} {gib(row.total_bytes):>11}")
        else:
            lines.append(f"{row.gpus:>4}  does not fit: {row.why}")
    lines.append("")
    req, chosen = report.requested, report.chosen
    if req is not None and not req.fits:
        lines.append(f"No prune ratio fits: {req.reason}.")
        lines.append("Fix: more GPUs, a smaller --max-model-len or --max-num-seqs, "
                     "--kv-cache-dtype fp8, or GPUs with more memory.")
    elif chosen is None:
        lines.append("No prune ratio fits on any GPU count in the table; pass --gpus N "
                     "to see why for N GPUs.")
    else:
        where = f"On {chosen.gpus} GPU{'s' if chosen.gpus > 1 else ''}"
        if req is None:
            where = f"Smallest fit: {chosen.gpus} GPU{'s' if chosen.gpus > 1 else ''}"
        if chosen.pruned_per_layer:
            lines.append(f"{where}: prune ratio {chosen.ratio} ({chosen.pruned_per_layer} of "
                         f"{f.num_experts} experts pruned per layer).")
        else:
            lines.append(f"{where}: fits without pruning.")
        lines.append(report.command or "")
        if chosen.pruned_per_layer and not f.serving:
            lines.append(f"(this command fails until --load-format aimer supports {f.family}; "
                         "for now prune offline and serve the pruned checkpoint)")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
