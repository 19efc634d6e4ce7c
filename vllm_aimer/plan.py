"""Pruning plans: which experts each MoE layer drops, made and checked purely.

A plan is uniform (vLLM builds every MoE layer with one expert count), prunes
the highest AIMER scores (ties: lower expert id first) and keeps at least top_k
experts per layer. Plans serialise to the same bytes for the same input, and
read and write the authors' `pruned_experts.json` so plans move between tools.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout

PLAN_FORMAT = "vllm-aimer.plan/v1"
PRUNED_EXPERTS_FILE = "pruned_experts.json"
PLAN_FILE = "plan.json"
SCORES_FILE = "scores.csv"


class LayerPlan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    pruned: list[int]
    kept: list[int]
    scores: list[float] | None = None


# Criteria whose LOWEST scores are pruned (vllm_aimer.criteria defines them all); every
# other criterion prunes its highest scores, as AIMER does.
PRUNES_LOWEST: frozenset[str] = frozenset({"magnitude"})


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    format: Literal["vllm-aimer.plan/v1"] = PLAN_FORMAT
    checkpoint: str
    criterion: str = "aimer"
    """What the scores are and chose the pruned experts (see vllm_aimer.criteria)."""
    """Fingerprint of the checkpoint (sha256 of config, index and shard headers)."""
    family: str
    num_experts: int
    top_k: int
    ratio: float
    """Pruned experts / routed experts, over all MoE layers."""
    layers: dict[str, LayerPlan]
    """Keyed by MoE layer index (as a string, like pruned_experts.json)."""

    @property
    def layer_ids(self) -> list[int]:
        return sorted(int(k) for k in self.layers)

    def layer(self, layer: int) -> LayerPlan:
        return self.layers[str(layer)]

    @property
    def kept_per_layer(self) -> int:
        return self.num_experts - self.pruned_per_layer

    @property
    def pruned_per_layer(self) -> int:
        return len(next(iter(self.layers.values())).pruned) if self.layers else 0

    @property
    def total_pruned(self) -> int:
        return sum(len(lp.pruned) for lp in self.layers.values())

    def pruned_experts(self) -> dict[str, list[int]]:
        return {str(k): list(self.layer(k).pruned) for k in self.layer_ids}

    @property
    def plan_hash(self) -> str:
        """Identity of the pruning decision: checkpoint + pruned ids (not scores)."""
        payload = json.dumps([self.checkpoint, self.pruned_experts()], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        data["layers"] = {str(k): data["layers"][str(k)] for k in self.layer_ids}
        return json.dumps(data, indent=1) + "\n"


def check_ratio(ratio: Any) -> float:
    """A ratio must be a number in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise AimerError(f"prune_ratio must be a number, got {ratio!r} ({type(ratio).__name__}).",
                         'pass a number, e.g. {"prune_ratio": 0.5}.')
    if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise AimerError(f"prune_ratio must be in [0, 1), got {ratio}.",
                         "pass the fraction of routed experts to prune, e.g. 0.25 or 0.5.")
    return float(ratio)


def max_ratio(num_experts: int, top_k: int) -> float:
    """The largest ratio that still keeps top_k experts in every layer."""
    return (num_experts - top_k) / num_experts


def prune_count(num_layers: int, num_experts: int, top_k: int, ratio: float,
                n_group: int = 1, topk_group: int = 1) -> int:
    """Experts pruned per layer: k with k * layers closest to round(ratio * total).

    `round` is Python's (halves to even), as in the authors' code. Ties between two k
    go to the smaller one (prune less). Fails when fewer than top_k would remain, or
    (group-limited routers, n_group > 1) when k does not split evenly over the groups
    or the groups a token may use would hold fewer than top_k kept experts.
    """
    ratio = check_ratio(ratio)
    target = round(ratio * num_layers * num_experts)
    low = target // num_layers
    k = low if target - low * num_layers <= (low + 1) * num_layers - target else low + 1
    if num_experts - k < top_k:
        limit = max_ratio(num_experts, top_k)
        raise AimerError(
            f"prune_ratio {ratio} would keep {num_experts - k} of {num_experts} experts per "
            f"layer, fewer than top_k={top_k} experts each token is routed to.",
            f"use a prune_ratio of at most {limit:.4g} (keeps {top_k} experts per layer).")
    check_groups(num_experts, k, top_k, n_group, topk_group, f"prune_ratio {ratio}")
    return k


def group_prune_counts(num_experts: int, top_k: int, n_group: int, topk_group: int) -> list[int]:
    """Per-layer prune counts k a router accepts, ascending: k a multiple of n_group, and
    the topk_group groups a token may use still holding top_k kept experts (n_group 1:
    every k that keeps top_k)."""
    return [k for k in range(0, num_experts, n_group)
            if (num_experts - k) // n_group * topk_group >= top_k]


def group_ratios(num_experts: int, top_k: int, n_group: int, topk_group: int) -> list[float]:
    """The ratios k / E of `group_prune_counts`."""
    return [k / num_experts for k in group_prune_counts(num_experts, top_k, n_group, topk_group)]


def check_groups(num_experts: int, k: int, top_k: int, n_group: int, topk_group: int,
                 what: str) -> None:
    """Fail when pruning k experts per layer breaks a group-limited router.

    Such a router (DeepSeek-V3 style) splits a layer's experts into n_group contiguous
    groups of E / n_group, picks topk_group groups per token and top_k experts within
    them; vLLM derives the group size from the expert count, so every group must lose
    the same number of experts, and topk_group groups must still hold top_k experts.
    """
    if n_group <= 1:
        return
    ok = group_ratios(num_experts, top_k, n_group, topk_group)
    works = ", ".join(f"{r:.4g}" for r in ok)
    fix = (f"use a prune_ratio that prunes a multiple of {n_group} experts per layer and "
           f"keeps at least {-(-top_k // topk_group)} per group; ratios that work: {works}.")
    if k % n_group:
        raise AimerError(
            f"{what} would prune {k} of {num_experts} experts per layer, which does not split "
            f"evenly over the router's {n_group} expert groups (n_group={n_group}); vLLM's "
            "group-limited router needs groups of equal size.", fix)
    per_group = (num_experts - k) // n_group
    if per_group * topk_group < top_k:
        raise AimerError(
            f"{what} would keep {per_group} experts in each of {n_group} groups; a token is "
            f"routed within topk_group={topk_group} groups, so at most {per_group * topk_group} "
            f"experts could be chosen, fewer than top_k={top_k}.", fix)


def select_pruned(scores: Sequence[float], k: int, n_group: int = 1,
                  lowest: bool = False) -> list[int]:
    """The k experts to prune from one layer, sorted: the highest scores (`lowest`: the
    lowest), ties to the lower id. With n_group > 1 the experts form n_group contiguous
    groups of E / n_group and each group loses its own k / n_group experts."""
    size = len(scores) // n_group
    per_group = k // n_group
    sign = 1.0 if lowest else -1.0
    pruned: list[int] = []
    for g in range(n_group):
        ids = range(g * size, (g + 1) * size)
        pruned += sorted(ids, key=lambda e: (sign * float(scores[e]), e))[:per_group]
    return sorted(pruned)


def ep_balanced_ratios(num_experts: int, top_k: int, ep_size: int) -> list[float]:
    """Ratios (k / E) whose kept count splits evenly over `ep_size` expert-parallel ranks."""
    return [k / num_experts for k in range(num_experts - top_k + 1)
            if (num_experts - k) % ep_size == 0 and num_experts - k >= ep_size]


def check_expert_parallel(num_experts: int, kept: int, top_k: int, ep_size: int) -> str | None:
    """Fail when a rank would hold no expert; a warning text when ranks hold unequal counts.

    vLLM spreads a remainder over the first ranks, so uneven counts work, but the
    largest rank then sets the memory needed per GPU.
    """
    if ep_size <= 1 or kept % ep_size == 0:
        return None
    ratio = (num_experts - kept) / num_experts
    ok = ep_balanced_ratios(num_experts, top_k, ep_size)
    near = ", ".join(f"{r:.4g}" for r in sorted(ok, key=lambda r: (abs(r - ratio), r))[:3])
    if kept < ep_size:
        raise AimerError(
            f"{kept} kept experts per layer cannot be spread over {ep_size} expert-parallel "
            "ranks (some rank would hold none).",
            f"use a prune_ratio that keeps a multiple of {ep_size} experts, e.g. {near}.")
    return (f"{kept} kept experts per layer do not split evenly over {ep_size} expert-parallel "
            f"ranks; the largest rank sets the memory per GPU. Balanced ratios nearby: {near}.")


def make_plan(layout: ExpertLayout, scores: Mapping[int, Sequence[float]], ratio: float,
              checkpoint: str, criterion: str = "aimer") -> Plan:
    """Prune the k highest-scored experts of every MoE layer (ties: lower id first), or
    the k lowest-scored for a criterion in PRUNES_LOWEST."""
    k = prune_count(len(layout.layers), layout.num_experts, layout.top_k, ratio,
                    layout.n_group, layout.topk_group)
    layers: dict[str, LayerPlan] = {}
    for layer in layout.layers:
        s = [float(x) for x in scores[layer]]
        pruned = select_pruned(s, k, layout.n_group, lowest=criterion in PRUNES_LOWEST)
        dropped = set(pruned)
        kept = [e for e in range(len(s)) if e not in dropped]
        layers[str(layer)] = LayerPlan(pruned=pruned, kept=kept, scores=s)
    # The ratio actually pruned (k per layer / experts), which can differ from the request.
    return Plan(checkpoint=checkpoint, family=layout.arch.family, num_experts=layout.num_experts,
                top_k=layout.top_k, ratio=k / layout.num_experts, layers=layers,
                criterion=criterion)


def identity_plan(layout: ExpertLayout, checkpoint: str) -> Plan:
    """A plan that prunes nothing (ratio 0)."""
    all_ids = list(range(layout.num_experts))
    return Plan(checkpoint=checkpoint, family=layout.arch.family, num_experts=layout.num_experts,
                top_k=layout.top_k, ratio=0.0,
                layers={str(layer): LayerPlan(pruned=[], kept=all_ids) for layer in layout.layers})


def plan_from_pruned_experts(layout: ExpertLayout, pruned: Mapping[str, Any], checkpoint: str,
                             where: str) -> Plan:
    """A plan from the authors' `{"<layer>": [pruned ids]}` format, fully checked."""
    bad_keys = [k for k in pruned if not re.fullmatch(r"0|[1-9][0-9]*", str(k))]
    if bad_keys:
        raise AimerError(f"plan {where} has non-integer layer keys {bad_keys[:5]}.",
                         'a plan maps MoE layer indices to pruned ids: {"0": [3, 7], ...}.')
    have = sorted(int(k) for k in pruned)
    want = list(layout.layers)
    if have != want:
        raise AimerError(
            f"plan {where} is for a different checkpoint: it names {len(have)} MoE layers "
            f"{_short(have)} but this checkpoint has {len(want)} MoE layers {_short(want)}.",
            "make a plan for this checkpoint with `vllm-aimer score MODEL --ratio R --output DIR`.")
    layers: dict[str, LayerPlan] = {}
    counts = set()
    for layer in want:
        ids = pruned[str(layer)] if str(layer) in pruned else pruned[layer]  # type: ignore[index]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise AimerError(f"plan {where}: layer {layer} must list integer expert ids, got {ids!r}.",
                             'write pruned ids as a JSON list, e.g. "0": [3, 7].')
        out_of_range = [i for i in ids if not 0 <= i < layout.num_experts]
        if out_of_range:
            raise AimerError(
                f"plan {where} is for a different checkpoint: layer {layer} prunes expert "
                f"id(s) {out_of_range[:5]}, but this checkpoint has experts 0..{layout.num_experts - 1}.",
                "make a plan for this checkpoint with `vllm-aimer score MODEL --ratio R --output DIR`.")
        if len(set(ids)) != len(ids):
            dups = sorted({i for i in ids if ids.count(i) > 1})
            raise AimerError(f"plan {where}: layer {layer} lists expert id(s) {dups} more than once.",
                             "list each pruned expert once.")
        counts.add(len(ids))
        kept = [e for e in range(layout.num_experts) if e not in set(ids)]
        layers[str(layer)] = LayerPlan(pruned=sorted(ids), kept=kept)
    if len(counts) > 1:
        raise AimerError(
            f"plan {where} prunes a different number of experts per layer ({sorted(counts)}); "
            "vLLM builds every MoE layer with one expert count, so plans must be uniform.",
            "prune the same number of experts in every layer (vllm-aimer score makes uniform plans).")
    k = counts.pop() if counts else 0
    if layout.n_group > 1:
        size = layout.num_experts // layout.n_group
        for layer in want:
            per_group = [sum(1 for e in layers[str(layer)].pruned if e // size == g)
                         for g in range(layout.n_group)]
            if len(set(per_group)) > 1:
                raise AimerError(
                    f"plan {where}: layer {layer} prunes {per_group} experts from the router's "
                    f"{layout.n_group} expert groups of {size}; a group-limited router needs "
                    "the same count pruned from every group.",
                    "prune the same number of experts from every group (vllm-aimer score "
                    "makes such plans).")
        check_groups(layout.num_experts, k, layout.top_k, layout.n_group, layout.topk_group,
                     f"plan {where}")
    if layout.num_experts - k < layout.top_k:
        raise AimerError(
            f"plan {where} keeps {layout.num_experts - k} experts per layer, fewer than "
            f"top_k={layout.top_k}.",
            f"prune at most {layout.num_experts - layout.top_k} experts per layer.")
    return Plan(checkpoint=checkpoint, family=layout.arch.family, num_experts=layout.num_experts,
                top_k=layout.top_k, ratio=k / layout.num_experts, layers=layers)


def read_plan(path: str | Path, layout: ExpertLayout, checkpoint: str) -> Plan:
    """Read a plan.json (ours) or pruned_experts.json (the authors'), or a directory with one."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in (PLAN_FILE, PRUNED_EXPERTS_FILE) if (p / n).is_file()]
        if not found:
            raise AimerError(f"plan directory {str(path)!r} holds neither {PLAN_FILE} nor "
                             f"{PRUNED_EXPERTS_FILE}.",
                             "pass the plan file itself, or the --output directory of "
                             "`vllm-aimer score`.")
        p = found[0]
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise AimerError(f"plan file {str(path)!r} does not exist.",
                         "pass the path of a pruned_experts.json or plan.json "
                         "(written by `vllm-aimer score`).") from None
    except OSError as e:
        raise AimerError(f"plan file {str(p)!r} cannot be read ({e.strerror or e}).",
                         "check the path and its permissions.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise AimerError(f"plan file {str(p)!r} is not valid JSON ({e}).",
                         "pass a pruned_experts.json or plan.json written by `vllm-aimer score`.") from None
    if not isinstance(data, dict):
        raise AimerError(f"plan file {str(p)!r} must hold a JSON object, got {type(data).__name__}.",
                         'use {"<layer>": [pruned expert ids]} or a plan.json from `vllm-aimer score`.')
    if "format" not in data:
        return plan_from_pruned_experts(layout, data, checkpoint, str(p))
    try:
        plan = Plan.model_validate(data)
    except ValueError as e:
        raise AimerError(f"plan file {str(p)!r} is not a valid {PLAN_FORMAT} plan ({e}).",
                         "regenerate it with `vllm-aimer score`.") from None
    if plan.checkpoint != checkpoint:
        raise AimerError(
            f"plan file {str(p)!r} was made for a different checkpoint (fingerprint "
            f"{plan.checkpoint[:12]}…, this checkpoint is {checkpoint[:12]}…).",
            "make a plan for this checkpoint with `vllm-aimer score MODEL --ratio R --output DIR`.")
    checked = plan_from_pruned_experts(layout, plan.pruned_experts(), checkpoint, str(p))
    return plan.model_copy(update={"layers": {k: LayerPlan(pruned=v.pruned, kept=v.kept,
                                                           scores=plan.layers[k].scores)
                                              for k, v in checked.layers.items()}})


def scores_csv(plan: Plan) -> str:
    """layer,expert_id,<criterion>_score,rank_in_layer,is_pruned (rank 0 = the first to
    prune: the highest score, or the lowest for a criterion in PRUNES_LOWEST)."""
    lines = [f"layer,expert_id,{plan.criterion}_score,rank_in_layer,is_pruned"]
    sign = 1.0 if plan.criterion in PRUNES_LOWEST else -1.0
    for layer in plan.layer_ids:
        lp = plan.layer(layer)
        if lp.scores is None:
            raise ValueError("this plan carries no scores")
        order = sorted(range(len(lp.scores)), key=lambda e: (sign * lp.scores[e], e))
        rank = {e: r for r, e in enumerate(order)}
        pruned = set(lp.pruned)
        for e, s in enumerate(lp.scores):
            lines.append(f"{layer},{e},{s!r},{rank[e]},{e in pruned}")
    return "\n".join(lines) + "\n"


def _short(ids: Sequence[int]) -> str:
    return str(list(ids)) if len(ids) <= 8 else f"[{ids[0]}..{ids[-1]}]"
