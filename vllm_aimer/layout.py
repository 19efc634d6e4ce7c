"""Where each routed expert's weights sit in a checkpoint, found from tensor names.

MoE layers are the layers that have routed-expert tensors, so dense layers,
shared experts and attention never enter scoring or slicing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from vllm_aimer.architectures import ROLES, Architecture, architecture_for, config_value
from vllm_aimer.checkpoint import Checkpoint, TensorInfo
from vllm_aimer.errors import AimerError


@dataclass(frozen=True)
class ScoredTensor:
    """One tensor AIMER reads; `expert` is None for a fused tensor (dim 0 = expert)."""
    info: TensorInfo
    expert: int | None


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

    @property
    def total_experts(self) -> int:
        return self.num_experts * len(self.layers)


def expert_layout(ckpt: Checkpoint) -> ExpertLayout:
    arch = architecture_for(ckpt.config)
    num_experts = config_value(ckpt.config, arch.expert_count_keys, "routed expert count")
    top_k = config_value(ckpt.config, arch.top_k_keys, "top_k (experts per token)")

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
                scored[layer].append(ScoredTensor(info, expert))
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
                scored[layer].append(ScoredTensor(info, None))
                fused_roles[layer].update(roles)

    layers = tuple(sorted(expert_bytes))
    if not layers:
        raise AimerError(
            f"found no routed-expert tensors for family {arch.family} in {ckpt.directory}.",
            "check that this is a Mixture-of-Experts checkpoint in Hugging Face layout.")
    for layer in layers:
        for expert in range(num_experts):
            have = roles_seen[(layer, expert)] | fused_roles[layer]
            missing = [r for r in ROLES if r not in have]
            if missing:
                raise AimerError(
                    f"layer {layer} expert {expert} has no {'/'.join(missing)} projection "
                    "weights in the checkpoint.",
                    "the checkpoint is incomplete or in an unsupported layout; re-download it.")
        scored[layer].sort(key=lambda s: (s.info.file, s.expert or 0, s.info.name))
    return ExpertLayout(arch, num_experts, top_k, layers, dict(scored), dict(expert_bytes))
