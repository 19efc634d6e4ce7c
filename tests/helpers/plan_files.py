"""Plan files written the way their producers write them (independent of vllm_aimer),
from a test's own decision {decoder layer: sorted pruned ids}.

Each writer follows the producer's serialisation (see vllm_aimer/plan_formats.py for
where each shape comes from): the AIMER authors' `json.dump(..., indent=2)` of
pruned_experts.json and pruning_plan.json, vLLM RIY / #42613 profiles, vllm-ascend's
JSON Lines (`"\\n".join(json.dumps({layer: ids}))`, as its own tests write them) and
llm-compressor's `json.dump(retained_experts)` keyed by MoE block module name.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

Decision = dict[int, list[int]]


def random_decision(layers: list[int], experts: int, k: int, n_group: int = 1,
                    seed: int = 0) -> Decision:
    """k pruned experts per layer, k / n_group from each of n_group contiguous groups."""
    rng = random.Random(seed)
    size = experts // n_group
    out = {}
    for layer in layers:
        pruned: list[int] = []
        for g in range(n_group):
            pruned += rng.sample(range(g * size, (g + 1) * size), k // n_group)
        out[layer] = sorted(pruned)
    return out


def kept(decision: Decision, experts: int) -> Decision:
    return {layer: [e for e in range(experts) if e not in p] for layer, p in decision.items()}


def authors_pruned_experts(directory: Path, decision: Decision) -> Path:
    """ZongfangLiu/AIMER src/calib_free_prune.py: only layers that prune something."""
    path = directory / "pruned_experts.json"
    with open(path, "w") as f:
        json.dump({str(layer): sorted(ids) for layer, ids in sorted(decision.items()) if ids},
                  f, indent=2)
    return path


def authors_pruning_plan(directory: Path, decision: Decision, experts: int) -> Path:
    """The same script's pruning_plan.json (counts), written beside pruned_experts.json."""
    authors_pruned_experts(directory, decision)
    rows = [{"layer": layer, "total_experts": experts, "pruned_experts": len(ids),
             "kept_experts": experts - len(ids), "prune_ratio": len(ids) / experts}
            for layer, ids in sorted(decision.items())]
    k = len(next(iter(decision.values())))
    path = directory / "pruning_plan.json"
    with open(path, "w") as f:
        json.dump({"plan": rows, "metric": "aimer", "uniform_pruning": True,
                   "uniform_pruned_per_layer": k}, f, indent=2)
    return path


def vllm_profile(directory: Path, decision: Decision, version: int = 1,
                 routing_mode: str | None = None, name: str = "profile.json") -> Path:
    """vLLM #37824 (RIY) docs example shape; #42613 reads the same keys."""
    data: dict = {"version": version}
    if routing_mode is not None:
        data["routing_mode"] = routing_mode
    data |= {"model": "tiny-moe", "workload": "test",
             "pruned_experts": [[layer, e] for layer, ids in sorted(decision.items())
                                for e in ids]}
    path = directory / name
    path.write_text(json.dumps(data, indent=2))
    return path


def ascend_lines(directory: Path, decision: Decision, experts: int, seed: int = 0,
                 drop_tail: int = 0) -> Path:
    """vllm-ascend #12525: per layer every expert, kept ones first (each part shuffled, as
    a ranking would order them); `drop_tail` leaves the last few pruned ids out of the
    list (vllm-ascend prunes unlisted experts too)."""
    rng = random.Random(seed)
    lines = []
    for layer, pruned in sorted(decision.items()):
        keep = [e for e in range(experts) if e not in pruned]
        tail = list(pruned)
        rng.shuffle(keep)
        rng.shuffle(tail)
        lines.append(json.dumps({str(layer): keep + tail[:len(tail) - drop_tail]}))
    path = directory / "experts.jsonl"
    path.write_text("\n".join(lines))
    return path


def llm_compressor_report(directory: Path, decision: Decision, experts: int,
                          block: str = "mlp") -> Path:
    """llm-compressor REAPPruningModifier report_path: module name -> retained ids."""
    path = directory / "reap_report.json"
    with open(path, "w") as f:
        json.dump({f"model.layers.{layer}.{block}": ids
                   for layer, ids in sorted(kept(decision, experts).items())}, f)
    return path
