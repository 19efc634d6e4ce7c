"""A plan's files in every format we write, each written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_aimer.files import atomic_write_text
from vllm_aimer.plan import PLAN_FILE, PRUNED_EXPERTS_FILE, SCORES_FILE, Plan, scores_csv
from vllm_aimer.plan_formats import VLLM_PROFILE_FILE, write_plan_as

__all__ = ["write_plan_outputs"]


def write_plan_outputs(plan: Plan, directory: Path, model: str | None = None) -> list[Path]:
    """pruned_experts.json, plan.json, the vLLM #37824/#42613 profile (vllm_profile.json,
    naming `model`) and (when the plan has scores) scores.csv."""
    outputs = [(directory / PRUNED_EXPERTS_FILE,
                _json_lines(plan.pruned_experts())),
               (directory / PLAN_FILE, plan.to_json()),
               (directory / VLLM_PROFILE_FILE, write_plan_as(plan, "vllm-profile", model=model))]
    if all(plan.layer(layer).scores is not None for layer in plan.layer_ids):
        outputs.append((directory / SCORES_FILE, scores_csv(plan)))
    for path, text in outputs:
        atomic_write_text(path, text)
    return [p for p, _ in outputs]


def _json_lines(pruned: dict[str, list[int]]) -> str:
    return json.dumps(pruned, indent=1) + "\n"
