"""What vllm-aimer knows about each MoE family, as data.

One `Architecture` entry per family: the config keys that hold its expert count,
top_k, router groups and MTP layers; where its routed experts and routers sit in the
checkpoint (`TensorNames`: what the loader, export and plan files need); and how
`vllm-aimer fit` sizes it from config.json alone (`ShapeModel`). Adding a family is
adding an entry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from vllm_aimer.errors import AimerError

__all__ = ["ROLES", "TensorNames", "ShapeModel", "Architecture", "ARCHITECTURES",
           "SUPPORTED_FAMILIES", "FIT_FAMILIES", "text_config", "architecture_for",
           "config_value", "optional_int"]

# The roles AIMER concatenates for one expert.
ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class TensorNames:
    """Where a family's routed experts and expert-indexed router tensors sit in the
    checkpoint, and how a tensor name is matched and renumbered."""
    moe_block: str
    """Regex of a MoE block's module path; must capture `layer`."""
    projections: Mapping[str, str]
    """Per-expert tensor names (`experts.{id}.<name>.weight`) -> AIMER role."""
    fused_projections: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Fused tensor names (`experts.<name>`, dim 0 = expert) -> roles they hold."""
    router_tensors: Mapping[str, int] = field(default_factory=lambda: {"gate.weight": 0})
    """Tensors under the MoE block indexed by routed expert (router rows, router bias,
    score-correction bias) -> the dimension that expert indexes (ERNIE's score-correction
    bias is [1, experts]: dim 1)."""
    mtp_prefix: str = ""
    """Where a family stores its multi-token-prediction layers under their own numbering
    (Qwen3-Next / Qwen3.5: `mtp.layers.{i}`): such a layer is keyed num_hidden_layers + i,
    after the trunk, like DeepSeek's; matchers take that base as `mtp_base`."""

    @cached_property
    def _per_expert_re(self) -> re.Pattern[str]:
        return re.compile(
            rf"^(?P<head>(?:.*\.)?{self.moe_block}\.experts\.)(?P<expert>\d+)\.(?P<tail>(?P<proj>[^.]+)\..+)$"
        )

    @cached_property
    def _expert_module_re(self) -> re.Pattern[str]:
        return re.compile(rf"^(?P<head>(?:.*\.)?{self.moe_block}\.experts\.)(?P<expert>\d+)"
                          rf"(?P<tail>(?:\..*)?)$")

    @cached_property
    def _fused_re(self) -> re.Pattern[str]:
        # Anything under `experts.` that is not `experts.{id}.`: fused all-expert tensors.
        # layout.py refuses names it cannot place (an unknown projection or suffix), so
        # nothing under `experts.` reaches vLLM unsliced.
        return re.compile(rf"^(?:.*\.)?{self.moe_block}\.experts\.(?P<rest>(?!\d+\.).+)$")

    @cached_property
    def _router_re(self) -> re.Pattern[str]:
        names = "|".join(re.escape(n) for n in self.router_tensors)
        return re.compile(rf"^(?:.*\.)?{self.moe_block}\.(?:{names})$")

    def _layer(self, name: str, m: re.Match[str], mtp_base: int) -> int:
        """The layer key of a match: its index, after the trunk for an `mtp_prefix` layer."""
        layer = int(m["layer"])
        if self.mtp_prefix and name[:m.start("layer")].endswith(f"{self.mtp_prefix}layers."):
            return mtp_base + layer
        return layer

    def match_expert(self, name: str, mtp_base: int = 0) -> tuple[int, int, str] | None:
        """(layer, expert id, projection name) of a per-expert tensor, else None."""
        m = self._per_expert_re.match(name)
        if not m:
            return None
        return self._layer(name, m, mtp_base), int(m["expert"]), m["proj"]

    def expert_suffix(self, name: str) -> str:
        """What follows `<proj>.` in a per-expert tensor name (`weight`, `qweight`, ...)."""
        m = self._per_expert_re.match(name)
        assert m is not None, name
        return m["tail"][len(m["proj"]) + 1:]

    def rename_expert(self, name: str, new_id: int) -> str:
        """A per-expert tensor's name with its expert id replaced by `new_id`."""
        m = self._per_expert_re.match(name)
        assert m is not None, name
        return f"{m['head']}{new_id}.{m['tail']}"

    def match_expert_module(self, name: str) -> tuple[int, int, str, str] | None:
        """(layer, expert id, text before the id, text after it) of a name that is one
        routed expert's module or any name under it (`...layers.N.mlp.experts.E[.rest]`),
        else None. Export renames such entries of a quantization config."""
        m = self._expert_module_re.match(name)
        return (int(m["layer"]), int(m["expert"]), m["head"], m["tail"]) if m else None

    def match_fused(self, name: str, mtp_base: int = 0) -> tuple[int, str] | None:
        """(layer, name after `experts.`) of a fused all-experts tensor, else None."""
        m = self._fused_re.match(name)
        return (self._layer(name, m, mtp_base), m["rest"]) if m else None

    def split_fused(self, rest: str, suffixes: frozenset[str]) -> tuple[str, str] | None:
        """(projection, suffix) of a fused tensor's name after `experts.`, when it is a
        known projection followed by one of `suffixes`; else None."""
        for proj in sorted(self.fused_projections, key=len, reverse=True):
            if rest.startswith(proj) and rest[len(proj):] in suffixes:
                return proj, rest[len(proj):]
        return None

    def match_router(self, name: str, mtp_base: int = 0) -> int | None:
        """Layer of a router tensor indexed by expert, else None."""
        m = self._router_re.match(name)
        return self._layer(name, m, mtp_base) if m else None

    def router_dim(self, name: str) -> int:
        """The dimension of router tensor `name` that routed experts index.

        Raises:
            KeyError: `name` is not one of the family's router tensors.
        """
        for tail, dim in self.router_tensors.items():
            if name.endswith(f".{tail}"):
                return dim
        raise KeyError(name)


@dataclass(frozen=True)
class ShapeModel:
    """What `vllm-aimer fit` needs to size a family from config.json alone (fit/sizing.py):
    the config keys of its layer shapes and the rules of its modeling code."""
    from_config: bool = True
    """False: fit sizes this family only from a checkpoint's safetensors headers (its
    attention or shared-expert shapes are not modelled); load-time pruning does not
    depend on this."""
    moe_intermediate_keys: tuple[str, ...] = ("moe_intermediate_size",)
    """Config keys holding one routed expert's intermediate size."""
    dense_intermediate_keys: tuple[str, ...] = ("intermediate_size",)
    """Config keys holding the intermediate size of a dense (non-MoE) layer's MLP."""
    shared_expert_keys: tuple[str, ...] = ()
    """Config keys holding the shared-expert count (one MLP, count x moe_intermediate wide)."""
    first_moe_layer_keys: tuple[str, ...] = ()
    """Config keys: layers below this index are dense (first_k_dense_replace style)."""
    last_moe_layer_keys: tuple[str, ...] = ()
    """Config keys: layers above this index are dense (-1 or absent: the last layer)."""
    moe_layer_step_keys: tuple[str, ...] = ()
    """Config keys: only layers with (index + 1) % step == 0 are MoE."""
    dense_layer_list_keys: tuple[str, ...] = ()
    """Config keys listing layer indices that are dense (mlp_only_layers style)."""
    latent_kv_keys: tuple[str, ...] = ()
    """Config keys whose sum is the per-token, per-layer width of a latent KV cache
    (MLA: kv_lora_rank + qk_rope_head_dim), which vLLM keeps whole on every rank."""
    qk_norm: Literal["head", "full", "none"] = "none"
    """Attention q/k norms: "head" (head_dim wide), "full" (hidden and
    kv_heads x hidden / heads wide, OLMoE) or "none"."""
    attention_bias_keys: tuple[str, ...] = ("attention_bias",)
    """Config keys that, when true, give q/k/v/o projections a bias."""
    tie_word_embeddings_default: bool = False
    """What the family's config class assumes when tie_word_embeddings is absent."""
    router_dtype: str | None = None
    """dtype the checkpoint stores router tensors in when it is not the model's
    (ERNIE keeps gate and score-correction bias in float32); None: the model dtype."""


@dataclass(frozen=True)
class Architecture:
    family: str
    """Short name, as users see it (and as `model_type` usually spells it)."""
    model_types: tuple[str, ...]
    """HF `model_type` values that use this entry."""
    expert_count_keys: tuple[str, ...]
    """Config keys (aliases) holding the routed-expert count; all are rewritten."""
    top_k_keys: tuple[str, ...]
    """Config keys holding the number of experts each token is routed to."""
    names: TensorNames
    """Where the routed experts and routers sit in the checkpoint."""
    shape: ShapeModel = ShapeModel()
    """How fit sizes the family from config.json."""
    group_count_keys: tuple[str, ...] = ()
    """Config keys holding the number of expert groups of a group-limited router
    (DeepSeek-V3 `n_group`): experts form that many contiguous groups of equal size."""
    group_topk_keys: tuple[str, ...] = ()
    """Config keys holding how many groups each token may be routed to (`topk_group`)."""
    mtp_layer_keys: tuple[str, ...] = ()
    """Config keys holding the number of multi-token-prediction layers stored after the
    trunk (`layers.{num_hidden_layers + i}`), which vLLM's MTP drafter builds with the
    same expert count (DeepSeek-V3 / GLM-4.5 `num_nextn_predict_layers`)."""


# The most common layout: `layers.N.mlp.experts.{id}.{gate,up,down}_proj.weight`, or
# fused `layers.N.mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` in newer saves.
_MLP_EXPERTS = TensorNames(
    moe_block=r"layers\.(?P<layer>\d+)\.mlp",
    projections={"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
    fused_projections={"gate_up_proj": ("gate", "up"), "down_proj": ("down",)},
)
# Qwen-style dense layers: a step (decoder_sparse_step) and an explicit list.
_QWEN_SHAPE = ShapeModel(moe_layer_step_keys=("decoder_sparse_step",),
                         dense_layer_list_keys=("mlp_only_layers",))

# DeepSeek-V2/V3 and GLM-4.5 share one layout: dense first layers, shared experts
# (`mlp.shared_experts.*`) and the dense layers' `mlp.{gate,up,down}_proj` do not match
# `mlp.experts.{id}`; V3 and GLM add a score-correction bias [experts] (V2 has none).
# n_group is left unchanged: vLLM's group size is experts / n_group, and
# plan.check_groups keeps the groups equal.
_DEEPSEEK = Architecture(
    family="deepseek",
    model_types=("deepseek_v2", "deepseek_v3"),
    expert_count_keys=("n_routed_experts",),
    top_k_keys=("num_experts_per_tok",),
    names=replace(_MLP_EXPERTS,
                  router_tensors={"gate.weight": 0, "gate.e_score_correction_bias": 0}),
    # MLA attention (DeepSeek) and partial rotary (GLM) are not modelled by fit's sizing.
    shape=ShapeModel(from_config=False, shared_expert_keys=("n_shared_experts",),
                     first_moe_layer_keys=("first_k_dense_replace",),
                     latent_kv_keys=("kv_lora_rank", "qk_rope_head_dim")),
    group_count_keys=("n_group",),
    group_topk_keys=("topk_group",),
    # vllm/model_executor/models/deepseek_mtp.py and glm4_moe_mtp.py: MTP layers at
    # num_hidden_layers + i, experts named like a trunk layer's.
    mtp_layer_keys=("num_nextn_predict_layers",),
)

_MIXTRAL = Architecture(
    family="mixtral",
    model_types=("mixtral",),
    expert_count_keys=("num_local_experts", "num_experts"),
    top_k_keys=("num_experts_per_tok",),
    names=TensorNames(
        moe_block=r"layers\.(?P<layer>\d+)\.block_sparse_moe",
        projections={"w1": "gate", "w3": "up", "w2": "down"},
        fused_projections={"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}),
    shape=ShapeModel(moe_intermediate_keys=("intermediate_size",), attention_bias_keys=()),
)

# Qwen3-Next (qwen3_next.py, qwen3_next_mtp.py): per-expert
# `model.layers.N.mlp.experts.{j}.{gate,up,down}_proj` (or fused), router `mlp.gate.weight`,
# a shared expert and its gate untouched; the MTP drafter's layers are `mtp.layers.{i}.*`
# (the target drops `mtp.`, the drafter maps it to `model.`), built from the same config,
# so pruned alike.
_QWEN3_NEXT = Architecture(
    family="qwen3_next",
    model_types=("qwen3_next",),
    expert_count_keys=("num_experts",),
    top_k_keys=("num_experts_per_tok",),
    names=replace(_MLP_EXPERTS, mtp_prefix="mtp."),
    # Gated delta-net attention and the shared expert are not modelled.
    shape=replace(_QWEN_SHAPE, from_config=False),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        family="qwen3_moe",
        model_types=("qwen3_moe",),
        # Public checkpoints say num_experts; transformers 5 writes num_local_experts.
        expert_count_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        names=_MLP_EXPERTS,
        shape=replace(_QWEN_SHAPE, qk_norm="head"),
    ),
    Architecture(
        # Qwen3-VL MoE (qwen3_vl_moe.py): the text model is Qwen3-MoE under
        # `model.language_model.` (hf_to_vllm_mapper), sized by text_config
        # (model_type qwen3_vl_moe_text); experts are fused and stored transposed,
        # `experts.gate_up_proj` [E, H, 2I] and `experts.down_proj` [E, I, H]
        # (is_fused_checkpoint_transposed), router `mlp.gate.weight`. Vision tensors
        # (`model.visual.*`) are not under a MoE block.
        family="qwen3_vl_moe",
        model_types=("qwen3_vl_moe", "qwen3_vl_moe_text"),
        expert_count_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        names=_MLP_EXPERTS,
        # The vision tower and mrope are not modelled by fit's sizing.
        shape=replace(_QWEN_SHAPE, qk_norm="head", from_config=False),
    ),
    Architecture(
        family="olmoe",
        model_types=("olmoe",),
        expert_count_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        names=_MLP_EXPERTS,
        shape=ShapeModel(moe_intermediate_keys=("intermediate_size",), qk_norm="full"),
    ),
    _MIXTRAL,
    Architecture(
        family="qwen2_moe",
        model_types=("qwen2_moe",),
        expert_count_keys=("num_experts",),
        top_k_keys=("num_experts_per_tok",),
        # The shared expert (`mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`) is
        # not matched by these names, so it is never scored nor sliced.
        names=_MLP_EXPERTS,
        # shared_expert_intermediate_size is not modelled by fit's sizing.
        shape=replace(_QWEN_SHAPE, from_config=False),
    ),
    _QWEN3_NEXT,
    # Qwen3.5 / Qwen3.6 MoE (qwen3_5.py, qwen3_5_mtp.py): the Qwen3-Next text model under
    # `model.language_model.` (hf_to_vllm_mapper) with config in text_config
    # (qwen3_5_moe_text); BF16 releases fuse experts as `experts.gate_up_proj` [E, 2I, H]
    # + `experts.down_proj`, FP8 releases store them per expert; MTP under `mtp.layers.{i}`.
    replace(_QWEN3_NEXT, family="qwen3_5_moe", model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
            shape=ShapeModel(from_config=False)),
    # MiniMax-M2 / M2.5 / M2.7 (minimax_m2.py): Mixtral names
    # `block_sparse_moe.experts.{j}.w{1,3,2}`, router `block_sparse_moe.gate.weight` and
    # `block_sparse_moe.e_score_correction_bias` [E]; MTP modules stored after the trunk
    # at `layers.{num_hidden_layers + i}` (`num_mtp_modules`, dropped by vLLM's target
    # model; pruned alike so a drafter would match).
    replace(_MIXTRAL, family="minimax_m2", model_types=("minimax_m2",),
            expert_count_keys=("num_local_experts",),
            names=replace(_MIXTRAL.names, fused_projections={},
                          router_tensors={"gate.weight": 0, "e_score_correction_bias": 0}),
            mtp_layer_keys=("num_mtp_modules",),
            # Partial rotary and q/k norms over all heads are not modelled.
            shape=replace(_MIXTRAL.shape, from_config=False)),
    _DEEPSEEK,
    replace(_DEEPSEEK, family="glm4_moe", model_types=("glm4_moe",),
            shape=replace(_DEEPSEEK.shape, latent_kv_keys=())),
    # DeepSeek-V3.2 (DSA): vLLM's CPU build serves it with DeepseekV3ForCausalLM and CUDA
    # with models/deepseek_v32 (a DeepseekV2ForCausalLM subclass); both load experts with
    # fused_moe_make_expert_params_mapping over `mlp.experts.{j}.{gate,up,down}_proj`, plus
    # `mlp.gate.e_score_correction_bias`. The indexer's tensors are attention, untouched.
    replace(_DEEPSEEK, family="deepseek_v32", model_types=("deepseek_v32",)),
    # GLM-5 (glm_moe_dsa): models/deepseek_v32/__init__.py aliases GlmMoeDsaForCausalLM to
    # the same DSA model (deepseek_v2.GlmMoeDsaForCausalLM on CPU): DeepSeek names, MLA.
    replace(_DEEPSEEK, family="glm_moe_dsa", model_types=("glm_moe_dsa",)),
    # GLM-4.7-Flash (glm4_moe_lite): glm4_moe_lite.py, MLA attention with GLM-4.5's MoE
    # (Glm4MoE: `mlp.gate.weight` + `mlp.gate.e_score_correction_bias`, shared experts,
    # first_k_dense_replace); experts mapped over `mlp.experts.{j}.{gate,up,down}_proj`.
    replace(_DEEPSEEK, family="glm4_moe_lite", model_types=("glm4_moe_lite",)),
    # Kimi-K2 / K2-Thinking (kimi_k2: transformers_utils/config.py maps it to
    # DeepseekV3Config, served by deepseek_v2.py) and Kimi-K2.5/K2.6 (kimi_k25:
    # kimi_k25.py runs DeepseekV2ForCausalLM on config.text_config, tensors under
    # `language_model.model.layers.`; its hf_to_vllm_mapper also accepts the legacy
    # `language_model.layers.`): DeepSeek-V3 names, 384 experts, n_group 1.
    replace(_DEEPSEEK, family="kimi_k2", model_types=("kimi_k2", "kimi_k25")),
    Architecture(
        family="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        expert_count_keys=("moe_num_experts",),
        top_k_keys=("moe_k",),
        names=TensorNames(
            moe_block=r"layers\.(?P<layer>\d+)\.mlp",
            projections={"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
            # The score-correction bias is [1, experts]: experts index dim 1.
            router_tensors={"gate.weight": 0, "moe_statics.e_score_correction_bias": 1}),
        shape=ShapeModel(
            shared_expert_keys=("moe_num_shared_experts",),
            first_moe_layer_keys=("moe_layer_start_index",),
            last_moe_layer_keys=("moe_layer_end_index",),
            moe_layer_step_keys=("moe_layer_interval",),
            attention_bias_keys=("use_bias",),
            tie_word_embeddings_default=True,
            router_dtype="float32"),
    ),
    Architecture(
        family="llama4",
        # Llama 4 Scout/Maverick (multimodal: the text part sits under `language_model.`
        # and in config.json's text_config) and text-only Llama4ForCausalLM.
        model_types=("llama4", "llama4_text"),
        expert_count_keys=("num_local_experts",),
        top_k_keys=("num_experts_per_tok",),
        # Released BF16 checkpoints fuse experts as gate_up_proj [E, H, 2I] (gate half,
        # then up half) and down_proj [E, I, H]; Meta's FP8 release is per expert. The
        # shared expert (`feed_forward.shared_expert.*`) and the dense layers'
        # `feed_forward.{gate,up,down}_proj` do not match `feed_forward.experts.`.
        names=TensorNames(
            moe_block=r"layers\.(?P<layer>\d+)\.feed_forward",
            projections={"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
            fused_projections={"gate_up_proj": ("gate", "up"), "down_proj": ("down",)},
            router_tensors={"router.weight": 0}),
        # Chunked attention / no-RoPE layers and the shared expert are not modelled.
        shape=ShapeModel(from_config=False, moe_intermediate_keys=("intermediate_size",),
                         dense_intermediate_keys=("intermediate_size_mlp",),
                         moe_layer_step_keys=("interleave_moe_layer_step",)),
    ),
    Architecture(
        family="gpt_oss",
        model_types=("gpt_oss",),
        expert_count_keys=("num_local_experts",),
        top_k_keys=("num_experts_per_tok", "experts_per_token"),
        # Always fused: gate_up_proj [E, H, 2I] with gate and up interleaved column by
        # column, down_proj [E, I, H], each with an [E, ...] bias (sliced, not scored).
        # MXFP4 releases store `<name>_blocks` (packed FP4) + `<name>_scales` (E8M0).
        names=TensorNames(
            moe_block=r"layers\.(?P<layer>\d+)\.mlp",
            projections={},
            fused_projections={"gate_up_proj": ("gate", "up"), "down_proj": ("down",)},
            router_tensors={"router.weight": 0, "router.bias": 0}),
        # Attention sinks and sliding layers are not modelled by fit's sizing.
        shape=ShapeModel(from_config=False, moe_intermediate_keys=("intermediate_size",)),
    ),
)

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(a.family for a in ARCHITECTURES)
"""Families `--load-format aimer` prunes at load time (every entry)."""
FIT_FAMILIES: tuple[str, ...] = tuple(a.family for a in ARCHITECTURES if a.shape.from_config)
"""Families `vllm-aimer fit` can size from config.json alone (every family from headers)."""


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a (possibly multimodal) HF config dict."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def architecture_for(config: Mapping[str, Any],
                     purpose: Literal["serve", "fit"] = "serve") -> Architecture:
    """The entry for an HF config dict.

    Args:
        config: config.json as a dict (multimodal configs: the family is read from
            text_config when it has one).
        purpose: "serve" (the loader, score, plan, export, and fit on a checkpoint's
            headers) accepts every entry; "fit" (`vllm-aimer fit` on a config.json
            alone) accepts the entries whose shapes fit models (`ShapeModel.from_config`).

    Raises:
        AimerError: a dense or unknown model_type, or (purpose "fit") a family fit
            sizes from headers only, each naming the fix.
    """
    model_type = text_config(config).get("model_type") or config.get("model_type")
    arch = next((a for a in ARCHITECTURES if model_type in a.model_types), None)
    if purpose == "fit":
        if arch is not None and arch.shape.from_config:
            return arch
        if arch is not None:
            raise AimerError(
                f"`vllm-aimer fit` cannot size model_type {model_type!r} from config.json "
                f"alone yet (from a config it sizes: {', '.join(FIT_FAMILIES)}).",
                "point fit at the checkpoint directory: sizes then come from its "
                "safetensors headers, for every supported family.")
        raise AimerError(
            f"model_type {model_type!r} is not a Mixture-of-Experts family `vllm-aimer fit` "
            f"knows (supported: {', '.join(SUPPORTED_FAMILIES)}).",
            "pass a config.json or checkpoint of a supported family.")
    if arch is not None:
        return arch
    raise AimerError(
        f"model_type {model_type!r} is not a supported Mixture-of-Experts family "
        f"(supported: {', '.join(SUPPORTED_FAMILIES)}).",
        "serve this model without --load-format aimer, or use a checkpoint of a "
        "supported family.",
    )


def optional_int(config: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    """The first of `keys` holding an int (not a bool) in the (text) config, else None."""
    cfg = text_config(config)
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def config_value(config: Mapping[str, Any], keys: Sequence[str], what: str) -> int:
    """The first of `keys` holding an int in the (text) config.

    Raises:
        AimerError: none of `keys` holds one; `what` names the value for the user.
    """
    value = optional_int(config, keys)
    if value is not None:
        return value
    raise AimerError(
        f"config.json has no {what} (looked for {', '.join(keys)}).",
        "check that the checkpoint's config.json is complete.",
    )
