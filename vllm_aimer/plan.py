"""Pruning plans: which experts each MoE layer drops, made and checked purely.

A plan is uniform (vLLM builds every MoE layer with one expert count), prunes
the highest AIMER scores (ties: lower expert id first) and keeps at least top_k
experts per layer. Plans serialise to the same bytes for the same input, and
read and write the authors' `pruned_experts.json` so plans move between tools.

Multi-token-prediction (MTP) layers (DeepSeek-V3 / GLM-4.5 `layers.{num_hidden_layers}`)
are built by vLLM from the same config, so they get the same kept count; their experts
are chosen by AIMER like a trunk layer's. They are kept apart (`mtp_layers`): they do
not count towards the ratio, and the authors' format, which never has them, still
describes a whole plan (the loader scores MTP layers a plan file omits).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator

from vllm_aimer.constraints import Router, check_prune_count, prune_count
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout

__all__ = ["LayerPlan", "Plan", "make_plan", "identity_plan", "with_mtp_layers",
           "plan_from_pruned_experts", "read_plan", "conform", "scores_csv", "select_pruned",
           "PLAN_FILE", "PRUNED_EXPERTS_FILE", "SCORES_FILE", "PRUNES_LOWEST"]

PLAN_FORMAT = "vllm-aimer.plan/v1"
PRUNED_EXPERTS_FILE = "pruned_experts.json"
PLAN_FILE = "plan.json"
SCORES_FILE = "scores.csv"
_REMAKE = "make a plan for this checkpoint with `vllm-aimer score MODEL --ratio R --output DIR`."


class LayerPlan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    pruned: list[int]
    kept: list[int]
    scores: list[float] | None = None


# Criteria whose LOWEST scores are pruned (vllm_aimer.criteria defines them all); every
# other criterion prunes its highest scores, as AIMER does.
PRUNES_LOWEST: frozenset[str] = frozenset({"magnitude"})


class Plan(BaseModel):
    """A whole pruning decision; it validates itself on construction and on reading
    (cache entries and plan files too): kept is the complement of pruned, every layer
    prunes the same count, groups stay balanced, and the count suits the router."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    format: Literal["vllm-aimer.plan/v1"] = PLAN_FORMAT
    checkpoint: str
    criterion: str = "aimer"
    """What the scores are and chose the pruned experts (see vllm_aimer.criteria)."""
    """Fingerprint of the checkpoint (sha256 of config, index and shard headers)."""
    family: str
    num_experts: int
    top_k: int
    n_group: int = 1
    """Expert groups of a group-limited router (1: none)."""
    topk_group: int = 1
    ratio: float
    """Pruned experts / routed experts, over all trunk MoE layers."""
    layers: dict[str, LayerPlan]
    """Trunk MoE layers, keyed by layer index (as a string, like pruned_experts.json)."""
    mtp_layers: dict[str, LayerPlan] = {}
    """MTP layers (index >= num_hidden_layers), same count pruned; may be absent."""

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "Plan":
        where = (info.context or {}).get("where", "plan") if info is not None else "plan"
        check_layers(self.router, {**self.layers, **self.mtp_layers}, where)
        return self

    @property
    def router(self) -> Router:
        return Router(self.num_experts, self.top_k, self.n_group, self.topk_group)

    @property
    def layer_ids(self) -> list[int]:
        return sorted(int(k) for k in self.layers)

    @property
    def mtp_layer_ids(self) -> list[int]:
        return sorted(int(k) for k in self.mtp_layers)

    def layer(self, layer: int) -> LayerPlan:
        """A trunk or MTP layer's plan."""
        key = str(layer)
        return self.layers[key] if key in self.layers else self.mtp_layers[key]

    def kept_by_layer(self) -> dict[int, list[int]]:
        """Kept ids of every layer the weight stream slices (trunk and MTP)."""
        return {layer: list(self.layer(layer).kept)
                for layer in self.layer_ids + self.mtp_layer_ids}

    @property
    def kept_per_layer(self) -> int:
        return self.num_experts - self.pruned_per_layer

    @property
    def pruned_per_layer(self) -> int:
        return len(next(iter(self.layers.values())).pruned) if self.layers else 0

    @property
    def total_pruned(self) -> int:
        """Pruned experts of the trunk layers (MTP layers are not counted)."""
        return sum(len(lp.pruned) for lp in self.layers.values())

    def pruned_experts(self) -> dict[str, list[int]]:
        """The authors' `{"<layer>": [pruned ids]}`: trunk layers only, as they write it."""
        return {str(k): list(self.layer(k).pruned) for k in self.layer_ids}

    @property
    def plan_hash(self) -> str:
        """Identity of the pruning decision: checkpoint + pruned ids (not scores)."""
        decision: list[Any] = [self.checkpoint, self.pruned_experts()]
        if self.mtp_layers:
            decision.append({str(k): self.layer(k).pruned for k in self.mtp_layer_ids})
        payload = json.dumps(decision, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        data["layers"] = {str(k): data["layers"][str(k)] for k in self.layer_ids}
        if self.mtp_layers:
            data["mtp_layers"] = {str(k): data["mtp_layers"][str(k)] for k in self.mtp_layer_ids}
        else:
            del data["mtp_layers"]
        return json.dumps(data, indent=1) + "\n"


def check_layers(router: Router, layers: Mapping[str, LayerPlan], where: str) -> None:
    """Every rule a set of layer plans must satisfy; an AimerError naming the first
    broken one. Shared by `Plan` (any origin: scoring, cache, file) and plan reading."""
    E = router.num_experts
    counts: dict[int, list[str]] = {}
    for key, lp in layers.items():
        out_of_range = [i for i in lp.pruned if not 0 <= i < E]
        if out_of_range:
            raise AimerError(
                f"{where} is for a different checkpoint: layer {key} prunes expert "
                f"id(s) {out_of_range[:5]}, but this checkpoint has experts 0..{E - 1}.", _REMAKE)
        if len(set(lp.pruned)) != len(lp.pruned):
            dups = sorted({i for i in lp.pruned if lp.pruned.count(i) > 1})
            raise AimerError(f"{where}: layer {key} lists expert id(s) {dups} more than once.",
                             "list each pruned expert once.")
        pruned = set(lp.pruned)
        if lp.pruned != sorted(pruned) or lp.kept != [e for e in range(E) if e not in pruned]:
            raise AimerError(f"{where}: layer {key}'s kept ids are not the complement of its "
                             "sorted pruned ids.", "regenerate the plan with `vllm-aimer score`.")
        if lp.scores is not None and len(lp.scores) != E:
            raise AimerError(f"{where}: layer {key} has {len(lp.scores)} scores for {E} experts.",
                             "regenerate the plan with `vllm-aimer score`.")
        counts.setdefault(len(lp.pruned), []).append(key)
    if len(counts) > 1:
        raise AimerError(
            f"{where} prunes a different number of experts per layer ({sorted(counts)}); "
            "vLLM builds every MoE layer with one expert count, so plans must be uniform.",
            "prune the same number of experts in every layer (vllm-aimer score makes uniform plans).")
    if router.n_group > 1:
        size = E // router.n_group
        for key, lp in layers.items():
            per_group = [sum(1 for e in lp.pruned if e // size == g) for g in range(router.n_group)]
            if len(set(per_group)) > 1:
                raise AimerError(
                    f"{where}: layer {key} prunes {per_group} experts from the router's "
                    f"{router.n_group} expert groups of {size}; a group-limited router needs "
                    "the same count pruned from every group.",
                    "prune the same number of experts from every group (vllm-aimer score "
                    "makes such plans).")
    if counts:
        check_prune_count(router, next(iter(counts)), where)


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


def _layer_plan(scores: Sequence[float], k: int, n_group: int,
                lowest: bool = False) -> LayerPlan:
    s = [float(x) for x in scores]
    pruned = select_pruned(s, k, n_group, lowest)
    dropped = set(pruned)
    return LayerPlan(pruned=pruned, kept=[e for e in range(len(s)) if e not in dropped], scores=s)


def _plan(layout: ExpertLayout, checkpoint: str, k: int, layers: dict[str, LayerPlan],
          mtp_layers: dict[str, LayerPlan], where: str = "plan",
          criterion: str = "aimer") -> Plan:
    try:
        return Plan.model_validate(
            dict(checkpoint=checkpoint, family=layout.arch.family, num_experts=layout.num_experts,
                 top_k=layout.top_k, n_group=layout.n_group, topk_group=layout.topk_group,
                 # The ratio actually pruned (k per layer / experts), which can differ
                 # from the one requested.
                 ratio=k / layout.num_experts, layers=layers, mtp_layers=mtp_layers,
                 criterion=criterion),
            context={"where": where})
    except ValidationError as e:
        raise _aimer_error(e) from None


def _aimer_error(e: ValidationError) -> Exception:
    """The AimerError a validator raised, else the ValidationError itself."""
    for err in e.errors():
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, AimerError):
            return inner
    return e


def make_plan(layout: ExpertLayout, scores: Mapping[int, Sequence[float]], ratio: float,
              checkpoint: str, criterion: str = "aimer") -> Plan:
    """Prune the k highest-scored experts of every MoE layer (ties: lower id first), or
    the k lowest-scored for a criterion in PRUNES_LOWEST. k comes from the trunk
    layers; MTP layers (when `scores` has them) lose k too."""
    k = prune_count(len(layout.layers), layout.router, ratio)
    lowest = criterion in PRUNES_LOWEST
    layers = {str(layer): _layer_plan(scores[layer], k, layout.n_group, lowest)
              for layer in layout.layers}
    mtp = {str(layer): _layer_plan(scores[layer], k, layout.n_group, lowest)
           for layer in layout.mtp_layers if layer in scores}
    return _plan(layout, checkpoint, k, layers, mtp, criterion=criterion)


def with_mtp_layers(plan: Plan, layout: ExpertLayout,
                    scores: Mapping[int, Sequence[float]]) -> Plan:
    """`plan` plus the checkpoint's MTP layers, each losing its own k highest AIMER
    scores (whatever criterion chose the trunk's: MTP layers only feed the draft)."""
    k = plan.pruned_per_layer
    mtp = {str(layer): _layer_plan(scores[layer], k, layout.n_group) for layer in layout.mtp_layers}
    return Plan.model_validate({**plan.model_dump(), "mtp_layers": mtp})


def identity_plan(layout: ExpertLayout, checkpoint: str) -> Plan:
    """A plan that prunes nothing (ratio 0)."""
    all_ids = list(range(layout.num_experts))
    keep = {str(layer): LayerPlan(pruned=[], kept=all_ids)
            for layer in layout.layers}
    return _plan(layout, checkpoint, 0, keep,
                 {str(layer): LayerPlan(pruned=[], kept=all_ids) for layer in layout.mtp_layers})


def plan_from_pruned_experts(layout: ExpertLayout, pruned: Mapping[str, Any], checkpoint: str,
                             where: str) -> Plan:
    """A plan from the authors' `{"<layer>": [pruned ids]}` format, fully checked. It names
    the trunk MoE layers, optionally followed by the checkpoint's MTP layers."""
    where = f"plan {where}"
    bad_keys = [k for k in pruned if not re.fullmatch(r"0|[1-9][0-9]*", str(k))]
    if bad_keys:
        raise AimerError(f"{where} has non-integer layer keys {bad_keys[:5]}.",
                         'a plan maps MoE layer indices to pruned ids: {"0": [3, 7], ...}.')
    have = sorted(int(k) for k in pruned)
    trunk, mtp = list(layout.layers), list(layout.mtp_layers)
    if have not in (trunk, trunk + mtp):
        raise AimerError(
            f"{where} is for a different checkpoint: it names {len(have)} MoE layers "
            f"{_short(have)} but this checkpoint has {len(trunk)} MoE layers {_short(trunk)}"
            + (f" (and MTP layers {mtp})" if mtp else "") + ".", _REMAKE)
    layers: dict[str, dict[str, LayerPlan]] = {"trunk": {}, "mtp": {}}
    for layer in have:
        ids = pruned[str(layer)] if str(layer) in pruned else pruned[layer]  # type: ignore[index]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise AimerError(f"{where}: layer {layer} must list integer expert ids, got {ids!r}.",
                             'write pruned ids as a JSON list, e.g. "0": [3, 7].')
        dropped = set(ids)
        kept = [e for e in range(layout.num_experts) if e not in dropped]
        part = "mtp" if layer in mtp else "trunk"
        # Unsorted or duplicated ids are reported by the plan's own checks.
        layers[part][str(layer)] = LayerPlan(
            pruned=sorted(ids) if len(dropped) == len(ids) else ids, kept=kept)
    k = len(next(iter(layers["trunk"].values())).pruned) if layers["trunk"] else 0
    return _plan(layout, checkpoint, k, layers["trunk"], layers["mtp"], where)


def read_plan(path: str | Path, layout: ExpertLayout, checkpoint: str) -> Plan:
    """Read a plan.json (ours) or pruned_experts.json (the authors'), or a directory with
    one. The result may lack the checkpoint's MTP layers (see `with_mtp_layers`)."""
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
        plan = Plan.model_validate(data, context={"where": f"plan file {str(p)!r}"})
    except ValidationError as e:
        inner = _aimer_error(e)
        if isinstance(inner, AimerError):
            raise inner from None
        raise AimerError(f"plan file {str(p)!r} is not a valid {PLAN_FORMAT} plan ({e}).",
                         "regenerate it with `vllm-aimer score`.") from None
    if plan.checkpoint != checkpoint:
        raise AimerError(
            f"plan file {str(p)!r} was made for a different checkpoint (fingerprint "
            f"{plan.checkpoint[:12]}…, this checkpoint is {checkpoint[:12]}…).", _REMAKE)
    return conform(plan, layout, f"plan file {str(p)!r}")


def conform(plan: Plan, layout: ExpertLayout, where: str = "plan") -> Plan:
    """`plan` checked against this checkpoint's layers and router (as a plan file is),
    with its scores, ratio and criterion kept; for plans from files and the plan cache."""
    named = {**plan.pruned_experts(),
             **{str(k): plan.layer(k).pruned for k in plan.mtp_layer_ids}}
    checked = plan_from_pruned_experts(layout, named, plan.checkpoint, where.removeprefix("plan "))

    def with_scores(part: dict[str, LayerPlan]) -> dict[str, dict[str, Any]]:
        return {k: {**v.model_dump(), "scores": plan.layer(int(k)).scores} for k, v in part.items()}

    data = {**checked.model_dump(), "layers": with_scores(checked.layers),
            "mtp_layers": with_scores(checked.mtp_layers), "ratio": plan.ratio,
            "criterion": plan.criterion}
    return Plan.model_validate(data, context={"where": where})


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
