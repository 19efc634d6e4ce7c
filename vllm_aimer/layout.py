"""Where each routed expert's weights sit in a checkpoint, found from tensor names.

MoE layers are the layers that have routed-expert tensors, so dense layers,
shared experts and attention never enter scoring or slicing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from vllm_aimer.architectures import ROLES, Architecture, architecture_for, config_value, text_config
from vllm_aimer.checkpoint import Checkpoint, TensorInfo
from vllm_aimer.constraints import Router
from vllm_aimer.encodings import FUSED_SUFFIXES, Projection, QuantConfig, Scorer, scorer_for
from vllm_aimer.encodings.base import quant_config
from vllm_aimer.errors import AimerError

__all__ = ["ScoredTensor", "ExpertLayout", "expert_layout", "trunk_layer_count",
           "split_mtp_layers", "expert_groups"]


@dataclass(frozen=True)
class ScoredTensor:
    """One projection AIMER reads; `expert` is None for a fused tensor (dim 0 = expert)."""
    info: TensorInfo
    """Its main tensor (the weight or the packed codes)."""
    expert: int | None
    scorer: Scorer
    """Adds the projection's sums of |w| and w^2 (its encoding's decoder)."""
    encoding: str
    """The name of its `Encoding`."""


@dataclass(frozen=True)
class ExpertLayout:
    """A checkpoint's routed experts: the family, the router's shape, the MoE layers and
    the tensors scoring reads (from `expert_layout`)."""
    arch: Architecture
    num_experts: int
    """Routed experts per MoE layer in the checkpoint."""
    top_k: int
    """Experts each token is routed to."""
    layers: tuple[int, ...]
    """Indices of the MoE layers, ascending."""
    scored: dict[int, list[ScoredTensor]]
    """Per layer: the gate/up/down projections AIMER reads."""
    expert_bytes: dict[int, list[int]]
    """Per layer, per expert: bytes of all its tensors (weights, scales, biases)."""
    n_group: int = 1
    """Expert groups of a group-limited router (contiguous, equal size); 1: none."""
    topk_group: int = 1
    """Groups each token may be routed to (meaningful when n_group > 1)."""
    mtp_layers: tuple[int, ...] = ()
    """Indices of multi-token-prediction layers (>= num_hidden_layers), ascending: vLLM
    builds them with the same expert count, but they are not part of the trunk."""
    quant: QuantConfig = field(default_factory=lambda: QuantConfig(None))
    """The checkpoint's quantization config."""
    encodings: tuple[str, ...] = ()
    """Encodings of the routed experts' projections (sorted names)."""
    unscorable: str | None = None
    """Why AIMER cannot score these experts (only for layouts built with scoring=False,
    which a plan file uses); None: every projection has a decoder."""
    mtp_base: int = 0
    """num_hidden_layers: the key of the first `mtp_prefix` layer (Architecture.match_*)."""

    @property
    def total_experts(self) -> int:
        """Routed experts of the trunk MoE layers (MTP layers not counted)."""
        return self.num_experts * len(self.layers)

    @property
    def router(self) -> Router:
        """What the count rules (`constraints`) need of this checkpoint's routers."""
        return Router(self.num_experts, self.top_k, self.n_group, self.topk_group)

    @property
    def all_layers(self) -> tuple[int, ...]:
        """Trunk MoE layers, then MTP layers: every layer whose experts are scored and sliced."""
        return self.layers + self.mtp_layers

    @property
    def scorable(self) -> bool:
        """Whether every projection has a decoder (see `unscorable`)."""
        return self.unscorable is None


def expert_layout(ckpt: Checkpoint, scoring: bool = True) -> ExpertLayout:
    """Where every routed expert's tensors are and how each projection is encoded.

    Every tensor under a MoE block's `experts.` must be placed: a per-expert tensor of a
    known projection (renamed when pruning), or a fused all-expert tensor of a known
    projection with a suffix some encoding owns (sliced on dim 0); anything else is
    refused. scoring=True also requires a decoder for every projection (AimerError
    naming the format otherwise); scoring=False (a plan file, ratio 0, inspect, fit)
    records why scoring would fail instead, since renaming and slicing do not depend
    on the encoding.

    Args:
        ckpt: an opened checkpoint.
        scoring: require a scorer for every projection (see above).

    Returns:
        The layout; its `unscorable` says why scoring would fail (scoring=False only).

    Raises:
        AimerError: the family is not supported; config.json lacks the expert count or
            top_k, or has expert groups that do not divide the experts; a tensor under
            the experts cannot be placed, names an expert or projection the config does
            not have, or a fused one lacks the experts on dim 0; an expert lacks a
            gate/up/down projection; no routed-expert tensors are found; expert
            tensors sit in layers beyond the trunk and its MTP layers; or (scoring=True)
            a projection is in an encoding vllm-aimer cannot decode.
    """
    arch = architecture_for(ckpt.config)
    num_experts = config_value(ckpt.config, arch.expert_count_keys, "routed expert count")
    top_k = config_value(ckpt.config, arch.top_k_keys, "top_k (experts per token)")
    n_group, topk_group = expert_groups(ckpt.config, arch, num_experts)
    quant = quant_config(ckpt)
    mtp_base = trunk_layer_count(ckpt.config) or 0

    per_expert: dict[tuple[int, int, str], dict[str, TensorInfo]] = defaultdict(dict)
    modules: dict[tuple[int, int, str] | tuple[int, str], str] = {}
    fused: dict[tuple[int, str], dict[str, TensorInfo]] = defaultdict(dict)
    expert_bytes: dict[int, list[int]] = defaultdict(lambda: [0] * num_experts)

    for info in ckpt.tensors.values():
        hit = arch.names.match_expert(info.name, mtp_base)
        if hit is not None:
            layer, expert, proj = hit
            if expert >= num_experts:
                raise AimerError(
                    f"tensor {info.name} names expert {expert} but config.json says there are "
                    f"{num_experts} routed experts per layer.",
                    "the checkpoint and its config.json disagree; re-download the checkpoint.")
            if proj not in arch.names.projections:
                raise AimerError(
                    f"expert tensor {info.name}: {proj!r} is not a projection of a "
                    f"{arch.family} expert (known: {', '.join(arch.names.projections) or 'none, experts are fused'}).",
                    "use the checkpoint as released for this family.")
            suffix = arch.names.expert_suffix(info.name)
            per_expert[(layer, expert, proj)][suffix] = info
            modules[(layer, expert, proj)] = info.name[: len(info.name) - len(suffix) - 1]
            expert_bytes[layer][expert] += info.nbytes
            continue
        hit_fused = arch.names.match_fused(info.name, mtp_base)
        if hit_fused is not None:
            layer, rest = hit_fused
            split = arch.names.split_fused(rest, FUSED_SUFFIXES)
            if split is None:
                raise AimerError(
                    f"tensor {info.name} sits under the routed experts but is neither a "
                    f"per-expert tensor (`experts.<id>.<proj>.*`) nor a fused "
                    f"{'/'.join(arch.names.fused_projections) or '(none)'} tensor with a known suffix "
                    f"({', '.join(repr(s) for s in sorted(FUSED_SUFFIXES))}); vllm-aimer will not "
                    "hand vLLM a tensor with rows of pruned experts.",
                    "use the checkpoint in its released layout (per-expert or Hugging Face "
                    "fused names).")
            if not info.shape or info.shape[0] != num_experts:
                raise AimerError(
                    f"fused expert tensor {info.name} has shape {list(info.shape)}, "
                    f"expected {num_experts} experts on dim 0.",
                    "the checkpoint and its config.json disagree; re-download the checkpoint.")
            proj, suffix = split
            fused[(layer, proj)][suffix] = info
            modules[(layer, proj)] = info.name[: len(info.name) - len(suffix)]
            share = info.nbytes // num_experts
            expert_bytes[layer] = [b + share for b in expert_bytes[layer]]

    found = tuple(sorted(expert_bytes))
    layers, mtp_layers = split_mtp_layers(ckpt.config, arch, found)
    if not layers:
        raise AimerError(
            f"found no routed-expert tensors for family {arch.family} in {ckpt.directory}.",
            "check that this is a Mixture-of-Experts checkpoint in Hugging Face layout.")

    scored: dict[int, list[ScoredTensor]] = defaultdict(list)
    roles: dict[tuple[int, int], set[str]] = defaultdict(set)
    fused_roles: dict[int, set[str]] = defaultdict(set)
    encodings: set[str] = set()
    unscorable: str | None = None

    def place(key: Any, tensors: dict[str, TensorInfo], expert: int | None) -> None:
        nonlocal unscorable
        proj = Projection(modules[key], tensors, expert is None, num_experts)
        try:
            encoding, scorer = scorer_for(quant, proj)
        except AimerError as e:
            if scoring:
                raise
            unscorable = unscorable or str(e)
            return
        encodings.add(encoding.name)
        scored[key[0]].append(ScoredTensor(scorer.reads[0], expert, scorer, encoding.name))

    for key, tensors in per_expert.items():
        layer, expert, proj = key
        roles[(layer, expert)].add(arch.names.projections[proj])
        place(key, tensors, expert)
    for key, tensors in fused.items():
        layer, proj = key
        if not arch.names.fused_projections[proj]:
            continue
        fused_roles[layer].update(arch.names.fused_projections[proj])
        if set(tensors) <= {"_bias"}:
            continue  # a bias alone (its weight is elsewhere): sliced, not scored
        place(key, {s: t for s, t in tensors.items()}, None)

    for layer in found:
        for expert in range(num_experts):
            have = roles[(layer, expert)] | fused_roles[layer]
            missing = [r for r in ROLES if r not in have]
            if missing:
                raise AimerError(
                    f"layer {layer} expert {expert} has no {'/'.join(missing)} projection "
                    "tensors in the checkpoint.",
                    "the checkpoint is incomplete (finish the download) or not in this "
                    "family's layout.")
        scored[layer].sort(key=lambda s: (s.info.file, s.expert or 0, s.info.name))
    return ExpertLayout(arch, num_experts, top_k, layers, dict(scored), dict(expert_bytes),
                        n_group, topk_group, mtp_layers, quant, tuple(sorted(encodings)),
                        unscorable, mtp_base)


def trunk_layer_count(config) -> int | None:
    """num_hidden_layers of the (text) config: where MTP layers start; None when it has
    no int num_hidden_layers."""
    value = text_config(config).get("num_hidden_layers")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def split_mtp_layers(config, arch: Architecture,
                     found: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(trunk, MTP) layer indices. MTP layers follow the trunk at num_hidden_layers..
    (DeepSeek-V3, GLM-4.5: `num_nextn_predict_layers`); an expert tensor at any other
    index beyond the trunk means the config does not describe the checkpoint.

    Args:
        config: config.json as a dict.
        arch: its family's entry.
        found: the layer indices holding routed-expert tensors, ascending.

    Returns:
        (trunk layers, MTP layers); all of `found` is trunk when the config has no
        num_hidden_layers.

    Raises:
        AimerError: a layer is beyond num_hidden_layers plus the config's MTP layer
            count (families without their own MTP prefix).
    """
    cfg = text_config(config)
    trunk_count = trunk_layer_count(config)
    if trunk_count is None:
        return found, ()
    mtp_count = next((cfg[k] for k in arch.mtp_layer_keys
                      if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)), 0)
    trunk = tuple(i for i in found if i < trunk_count)
    mtp = tuple(i for i in found if i >= trunk_count)
    # A family with its own MTP prefix (`mtp.layers.{i}`) names its MTP layers itself.
    stray = [] if arch.names.mtp_prefix else [i for i in mtp if i >= trunk_count + mtp_count]
    if stray:
        keys = "/".join(arch.mtp_layer_keys) or "no multi-token-prediction layers"
        raise AimerError(
            f"the checkpoint has routed-expert tensors in layer(s) {stray}, but config.json "
            f"says num_hidden_layers={trunk_count} and {mtp_count} MTP layer(s) ({keys}).",
            "the checkpoint and its config.json disagree; use the config.json released with "
            "these weights.")
    return trunk, mtp


def expert_groups(config, arch: Architecture, num_experts: int) -> tuple[int, int]:
    """(n_group, topk_group) of a group-limited router; (1, 1) for a plain one.

    topk_group defaults to n_group when the config names no value for it.

    Raises:
        AimerError: `num_experts` is not a multiple of n_group.
    """
    if not arch.group_count_keys:
        return 1, 1
    cfg = text_config(config)
    n_group = next((cfg[k] for k in arch.group_count_keys if isinstance(cfg.get(k), int)), None)
    if n_group is None or n_group <= 1:
        return 1, 1
    topk_group = next((cfg[k] for k in arch.group_topk_keys if isinstance(cfg.get(k), int)),
                      n_group)
    if num_experts % n_group:
        raise AimerError(
            f"config.json has {num_experts} routed experts in {n_group} groups "
            f"({'/'.join(arch.group_count_keys)}), which do not divide evenly.",
            "check that the checkpoint's config.json is complete and consistent.")
    return n_group, topk_group
