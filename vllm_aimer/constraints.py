"""Every rule about how many experts a pruned MoE layer may keep, in one place.

vLLM builds every MoE layer with one expert count K, and the count must suit the
router, the expert-parallel split and the GPU kernels vLLM picks; a count one of
them does not expect gives wrong answers or a crash after start-up, not an error.
The loader, `vllm-aimer fit`, `inspect` and plan reading all ask this module, so a
ratio they offer is one the loader accepts. Pure: no vLLM, no I/O.

Where each rule comes from (vLLM 0.32):
- top_k floor: a router picks top_k distinct experts per token.
- groups: a group-limited router (DeepSeek-V3 `n_group`, `topk_group`) splits a
  layer into n_group contiguous groups of K / n_group (grouped_topk_router.py), so
  every group must lose the same count and topk_group groups must still hold top_k.
- expert parallelism: vLLM spreads a remainder of K over the first EP ranks
  (expert_map_manager.py), but FlashInfer CUTLASS (Hopper, block FP8) and the
  TRT-LLM kernels (Blackwell) compute each rank's window as rank x K / ep_size, and
  DeepEP and gpt-oss divide K by ep_size: only an even split is safe.
- Blackwell (compute capability family 10.x): vLLM prefers FlashInfer's TRT-LLM
  MoE kernels there (experts/trtllm_*_moe.py, `is_device_capability_family(100)`),
  whose launcher checks K % 4 == 0, K > top_k and, with groups,
  top_k < topk_group x K / n_group (trtllm_fused_moe_kernel_launcher.cu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vllm_aimer.errors import AimerError

__all__ = ["Gpu", "Router", "Deployment", "check_ratio", "problems", "allowed_prune_counts",
           "allowed_ratios", "nearest_ratios", "check_prune_count", "prune_count",
           "ratio_text", "ANYWHERE"]


class Gpu(str, Enum):
    """The kernel family whose limits apply to the kept count."""
    ANY = "any"
    """vLLM's CPU backend, NVIDIA GPUs before Blackwell, others: the base rules."""
    BLACKWELL = "blackwell"
    """NVIDIA compute capability 10.x (B200, GB200, B300): TRT-LLM MoE kernels."""

    @property
    def label(self) -> str:
        return {"any": "any GPU or CPU",
                "blackwell": "NVIDIA Blackwell (SM100, TRT-LLM MoE kernels)"}[self.value]


@dataclass(frozen=True)
class Router:
    """What a MoE layer's router needs from its expert count."""
    num_experts: int
    top_k: int
    n_group: int = 1
    """Expert groups of a group-limited router (contiguous, equal size); 1: none."""
    topk_group: int = 1
    """Groups each token may be routed to (meaningful when n_group > 1)."""


@dataclass(frozen=True)
class Deployment:
    """Where the pruned model is served."""
    ep_size: int = 1
    """Expert-parallel ranks (1: no expert parallelism)."""
    gpu: Gpu = Gpu.ANY


ANYWHERE = Deployment()


def check_ratio(ratio: Any) -> float:
    """A prune ratio must be a number in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise AimerError(f"prune_ratio must be a number, got {ratio!r} ({type(ratio).__name__}).",
                         'pass a number, e.g. {"prune_ratio": 0.5}.')
    if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise AimerError(f"prune_ratio must be in [0, 1), got {ratio}.",
                         "pass the fraction of routed experts to prune, e.g. 0.25 or 0.5.")
    return float(ratio)


def problems(router: Router, k: int, deployment: Deployment = ANYWHERE) -> list[str]:
    """Why pruning k experts from every layer is unsafe (empty: it is safe).

    k = 0 leaves the model as released, so it is always safe: whatever the
    released count needs is vLLM's concern, not a consequence of pruning.
    """
    E, top_k, n_group, topk_group = router.num_experts, router.top_k, router.n_group, router.topk_group
    kept = E - k
    if k == 0:
        return []
    if not 0 < k <= E:
        return [f"prune {k} of {E} experts per layer, which is out of range"]
    if kept < top_k:
        return [f"keep {kept} of {E} experts per layer, fewer than top_k={top_k} experts "
                "each token is routed to"]
    out: list[str] = []
    if n_group > 1:
        if k % n_group:
            out.append(f"prune {k} of {E} experts per layer, which does not split evenly over "
                       f"the router's {n_group} expert groups (n_group={n_group}); vLLM's "
                       "group-limited router needs groups of equal size")
        elif kept // n_group * topk_group < top_k:
            per_group = kept // n_group
            out.append(f"keep {per_group} experts in each of {n_group} groups; a token is "
                       f"routed within topk_group={topk_group} groups, so at most "
                       f"{per_group * topk_group} experts could be chosen, fewer than "
                       f"top_k={top_k}")
    if deployment.ep_size > 1 and kept % deployment.ep_size:
        out.append(f"keep {kept} experts per layer, which do not split evenly over "
                   f"{deployment.ep_size} expert-parallel ranks; vLLM's GPU MoE kernels "
                   "(FlashInfer, TRT-LLM, DeepEP) assume an even split and would compute the "
                   "wrong experts or crash")
    if deployment.gpu is Gpu.BLACKWELL:
        if kept % 4:
            out.append(f"keep {kept} experts per layer; FlashInfer's TRT-LLM MoE kernels on "
                       "Blackwell need a multiple of 4")
        if kept <= top_k:
            out.append(f"keep {kept} experts per layer; FlashInfer's TRT-LLM MoE kernels on "
                       f"Blackwell need more than top_k={top_k}")
        if n_group > 1 and not top_k * n_group < topk_group * kept:
            out.append(f"keep {kept // n_group} experts per group; FlashInfer's TRT-LLM routing "
                       f"on Blackwell needs top_k={top_k} < topk_group x experts per group "
                       f"({topk_group} x {kept // n_group})")
    return out


def allowed_prune_counts(router: Router, deployment: Deployment = ANYWHERE) -> list[int]:
    """Per-layer prune counts k that are safe for this router and deployment, ascending
    (always starts with 0)."""
    return [k for k in range(router.num_experts) if not problems(router, k, deployment)]


def allowed_ratios(router: Router, deployment: Deployment = ANYWHERE) -> list[float]:
    """The ratios k / E of `allowed_prune_counts`."""
    return [k / router.num_experts for k in allowed_prune_counts(router, deployment)]


def ratio_text(ratio: float) -> str:
    return f"{ratio:.4g}"


def nearest_ratios(router: Router, k: int, deployment: Deployment = ANYWHERE,
                   n: int = 3) -> list[float]:
    """Up to n safe ratios closest to k / E, ascending."""
    counts = allowed_prune_counts(router, deployment)
    near = sorted(counts, key=lambda c: (abs(c - k), c))[:n]
    return [c / router.num_experts for c in sorted(near)]


def check_prune_count(router: Router, k: int, what: str,
                      deployment: Deployment = ANYWHERE) -> None:
    """Raise an AimerError naming every problem of pruning k per layer and the nearest
    safe ratios; `what` names the input ("prune_ratio 0.3", "plan FILE")."""
    found = problems(router, k, deployment)
    if not found:
        return
    E, top_k = router.num_experts, router.top_k
    if 0 <= E - k < top_k:
        limit = (E - top_k) / E
        raise AimerError(f"{what} would {found[0]}.",
                         f"use a prune_ratio of at most {limit:.4g} (prunes at most "
                         f"{E - top_k} and keeps {top_k} experts per layer).")
    near = ", ".join(ratio_text(r) for r in nearest_ratios(router, k, deployment))
    where = []
    if deployment.ep_size > 1:
        where.append(f"{deployment.ep_size} expert-parallel ranks")
    if deployment.gpu is not Gpu.ANY:
        where.append(deployment.gpu.label)
    on = f" on {' and '.join(where)}" if where else ""
    if router.n_group > 1 and deployment == ANYWHERE:
        works = ", ".join(ratio_text(r) for r in allowed_ratios(router))
        fix = (f"use a prune_ratio that prunes a multiple of {router.n_group} experts per layer "
               f"and keeps at least {-(-top_k // router.topk_group)} per group; ratios that "
               f"work: {works}.")
    else:
        fix = f"use a prune_ratio that is safe{on}; nearest: {near}."
    raise AimerError(f"{what} would {'; and '.join(found)}.", fix)


def prune_count(num_layers: int, router: Router, ratio: float,
                deployment: Deployment = ANYWHERE) -> int:
    """Experts pruned per layer for `ratio`: the k whose k x layers is closest to
    round(ratio x routed experts) (Python's round, halves to even, as in the AIMER
    authors' code; ties between two k go to the smaller), checked by `problems`.
    """
    ratio = check_ratio(ratio)
    target = round(ratio * num_layers * router.num_experts)
    low = target // num_layers
    k = low if target - low * num_layers <= (low + 1) * num_layers - target else low + 1
    check_prune_count(router, k, f"prune_ratio {ratio}", deployment)
    return k
