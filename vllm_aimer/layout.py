"""Where each routed expert's weights sit in a checkpoint, found from tensor names.

MoE layers are the layers that have routed-expert tensors, so dense layers,
shared experts and attention never enter scoring or slicing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from vllm_aimer.architectures import (ROLES, Architecture, architecture_for, config_value,
                                      text_config)
from vllm_aimer.checkpoint import Checkpoint, TensorInfo
from vllm_aimer.errors import AimerError


# Block-quantized FP8 weights (DeepSeek-V3, Qwen3-FP8): `<name>` in float8 with
# `<name>_scale_inv` holding one float32 scale per block of the weight.
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)
# MXFP4 (OCP microscaling, gpt-oss): `<name>_blocks` uint8 [..., groups, 16] packs two
# FP4 (E2M1) values per byte, low nibble first; `<name>_scales` uint8 [..., groups]
# holds one E8M0 exponent (bias 127) per group of 32 values.
MXFP4_BLOCKS_SUFFIX = "_blocks"
MXFP4_SCALES_SUFFIX = "_scales"


@dataclass(frozen=True)
class ScoredTensor:
    """One tensor AIMER reads; `expert` is None for a fused tensor (dim 0 = expert)."""
    info: TensorInfo
    expert: int | None
    scale: TensorInfo | None = None
    """Block scales of an FP8 weight (dequantized value = weight x its block's scale)."""
    block: tuple[int, int] = DEFAULT_FP8_BLOCK
    """(rows, columns) of one scale block."""
    mxfp4_scales: TensorInfo | None = None
    """E8M0 group exponents of an MXFP4 `*_blocks` tensor (fused, dim 0 = expert)."""


@dataclass(frozen=True)
class ExpertLayout:
    arch: Architecture
    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    """Indices of the MoE layers, ascending."""
    scored: dict[int, list[ScoredTensor]]
    """Per layer: the gate/up/down weight tensors AIMER reads."""
    expert_bytes: dict[int, list[int]]
    """Per layer, per expert: bytes of all its tensors (weights, scales, biases)."""
    n_group: int = 1
    """Expert groups of a group-limited router (contiguous, equal size); 1: none."""
    topk_group: int = 1
    """Groups each token may be routed to (meaningful when n_group > 1)."""
    mtp_layers: tuple[int, ...] = ()
    """Indices of multi-token-prediction layers (>= num_hidden_layers), ascending: vLLM
    builds them with the same expert count, but they are not part of the trunk."""

    @property
    def total_experts(self) -> int:
        return self.num_experts * len(self.layers)

    @property
    def all_layers(self) -> tuple[int, ...]:
        """Trunk MoE layers, then MTP layers: every layer whose experts are scored and sliced."""
        return self.layers + self.mtp_layers


def expert_layout(ckpt: Checkpoint) -> ExpertLayout:
    arch = architecture_for(ckpt.config)
    num_experts = config_value(ckpt.config, arch.expert_count_keys, "routed expert count")
    top_k = config_value(ckpt.config, arch.top_k_keys, "top_k (experts per token)")
    n_group, topk_group = expert_groups(ckpt.config, arch, num_experts)

    scored: dict[int, list[ScoredTensor]] = defaultdict(list)
    roles_seen: dict[tuple[int, int], set[str]] = defaultdict(set)
    fused_roles: dict[int, set[str]] = defaultdict(set)
    expert_bytes: dict[int, list[int]] = defaultdict(lambda: [0] * num_experts)

    def check_id(layer: int, expert: int, name: str) -> None:
        if expert >= num_experts:
            raise AimerError(
                f"tensor {name} names expert {expert} but config.json says there are "
                f"{num_experts} routed experts per layer.",
                "the checkpoint and its config.json disagree; re-download the checkpoint.")

    for info in ckpt.tensors.values():
        hit = arch.match_expert(info.name)
        if hit is not None:
            layer, expert, proj = hit
            check_id(layer, expert, info.name)
            expert_bytes[layer][expert] += info.nbytes
            role = arch.projections.get(proj)
            if role is not None and info.name.endswith(f"{proj}.weight"):
                scored[layer].append(_scored(ckpt, info, expert))
                roles_seen[(layer, expert)].add(role)
            continue
        fused = arch.match_fused(info.name)
        if fused is not None:
            layer, proj = fused
            if not info.shape or info.shape[0] != num_experts:
                raise AimerError(
                    f"fused expert tensor {info.name} has shape {list(info.shape)}, "
                    f"expected {num_experts} experts on dim 0.",
                    "the checkpoint and its config.json disagree; re-download the checkpoint.")
            share = info.nbytes // num_experts
            expert_bytes[layer] = [b + share for b in expert_bytes[layer]]
            roles = arch.fused_projections.get(proj)
            if roles and not info.name.endswith(("_bias", ".bias")):
                scored[layer].append(_scored_fused(ckpt, info))
                fused_roles[layer].update(roles)

    found = tuple(sorted(expert_bytes))
    layers, mtp_layers = split_mtp_layers(ckpt.config, arch, found)
    if not layers:
        raise AimerError(
            f"found no routed-expert tensors for family {arch.family} in {ckpt.directory}.",
            "check that this is a Mixture-of-Experts checkpoint in Hugging Face layout.")
    for layer in found:
        for expert in range(num_experts):
            have = roles_seen[(layer, expert)] | fused_roles[layer]
            missing = [r for r in ROLES if r not in have]
            if missing:
                raise AimerError(
                    f"layer {layer} expert {expert} has no {'/'.join(missing)} projection "
                    "weights in the checkpoint.",
                    "the checkpoint is incomplete or in an unsupported layout; re-download it.")
        scored[layer].sort(key=lambda s: (s.info.file, s.expert or 0, s.info.name))
    return ExpertLayout(arch, num_experts, top_k, layers, dict(scored), dict(expert_bytes),
                        n_group, topk_group, mtp_layers)


def split_mtp_layers(config, arch: Architecture,
                     found: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(trunk, MTP) layer indices. MTP layers follow the trunk at num_hidden_layers..
    (DeepSeek-V3, GLM-4.5: `num_nextn_predict_layers`); an expert tensor at any other
    index beyond the trunk means the config does not describe the checkpoint."""
    cfg = text_config(config)
    trunk_count = cfg.get("num_hidden_layers")
    if not isinstance(trunk_count, int) or isinstance(trunk_count, bool):
        return found, ()
    mtp_count = next((cfg[k] for k in arch.mtp_layer_keys
                      if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)), 0)
    trunk = tuple(i for i in found if i < trunk_count)
    mtp = tuple(i for i in found if i >= trunk_count)
    stray = [i for i in mtp if i >= trunk_count + mtp_count]
    if stray:
        keys = "/".join(arch.mtp_layer_keys) or "no multi-token-prediction layers"
        raise AimerError(
            f"the checkpoint has routed-expert tensors in layer(s) {stray}, but config.json "
            f"says num_hidden_layers={trunk_count} and {mtp_count} MTP layer(s) ({keys}).",
            "the checkpoint and its config.json disagree; use the config.json released with "
            "these weights.")
    return trunk, mtp


def _fp8_block(config) -> tuple[int, int]:
    quant = text_config(config).get("quantization_config") or config.get("quantization_config")
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block):
        return block[0], block[1]
    return DEFAULT_FP8_BLOCK


def _scored(ckpt: Checkpoint, info: TensorInfo, expert: int | None) -> ScoredTensor:
    """A weight to score (per expert, or fused with dim 0 = expert when `expert` is
    None), with its block scales when it is FP8: `<name>_scale_inv` in the per-expert
    layout, `experts.<name>_scale_inv` [E, row blocks, column blocks] when fused."""
    if info.dtype not in FP8_DTYPES:
        return ScoredTensor(info, expert)
    scale = ckpt.tensors.get(info.name + SCALE_SUFFIX)
    block = _fp8_block(ckpt.config)
    lead = () if expert is not None else info.shape[:1]
    if scale is None or len(info.shape) != 2 + len(lead):
        raise AimerError(
            f"FP8 expert weight {info.name} {list(info.shape)} has no block scales "
            f"({info.name}{SCALE_SUFFIX}); AIMER scores dequantized weights.",
            "use a block-quantized FP8 checkpoint (DeepSeek-V3 / Qwen3-FP8 style) or the "
            "unquantized one.")
    want = (*lead, *(-(-d // b) for d, b in zip(info.shape[len(lead):], block)))
    if tuple(scale.shape) != want:
        raise AimerError(
            f"block scales {scale.name} have shape {list(scale.shape)}, expected {list(want)} "
            f"for weight {list(info.shape)} in {block[0]}x{block[1]} blocks.",
            "check quantization_config.weight_block_size in config.json.")
    return ScoredTensor(info, expert, scale, block)


def _scored_fused(ckpt: Checkpoint, info: TensorInfo) -> ScoredTensor:
    """A fused all-experts weight to score, with its MXFP4 group scales when packed
    (or its FP8 block scales)."""
    if not info.name.endswith(MXFP4_BLOCKS_SUFFIX):
        return _scored(ckpt, info, None)
    base = info.name[: -len(MXFP4_BLOCKS_SUFFIX)]
    scales = ckpt.tensors.get(base + MXFP4_SCALES_SUFFIX)
    if (info.dtype != "U8" or scales is None or scales.dtype != "U8" or len(info.shape) != 4
            or info.shape[-1] != 16 or tuple(scales.shape) != tuple(info.shape[:-1])):
        raise AimerError(
            f"MXFP4 expert tensor {info.name} {info.dtype} {list(info.shape)} does not come "
            f"with {base}{MXFP4_SCALES_SUFFIX} of shape {list(info.shape[:-1])} in uint8 "
            "(two FP4 values per byte, one E8M0 exponent per 32 values); AIMER scores "
            "dequantized weights.",
            "use the checkpoint as released (gpt-oss MXFP4 layout) or its BF16 release.")
    return ScoredTensor(info, None, mxfp4_scales=scales)


def expert_groups(config, arch: Architecture, num_experts: int) -> tuple[int, int]:
    """(n_group, topk_group) of a group-limited router; (1, 1) for a plain one."""
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
