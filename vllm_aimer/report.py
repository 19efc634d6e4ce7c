"""What the loader did: a plain schema of numbers and names, written by the worker
and read by the API server's /metrics (through `channel`). It imports nothing of the
worker side; the loader fills it in."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from vllm_aimer.units import human_bytes

__all__ = ["PruningReport", "ReportSource"]

ReportSource = Literal["score", "cache", "plan_file"]
"""Where the plan in use came from: scored at load, the plan cache, or a plan file."""


class PruningReport(BaseModel):
    model_name: str
    family: str
    checkpoint: str
    plan_hash: str
    ratio: float
    source: ReportSource
    top_k: int
    layers: list[int]
    experts_before: int
    experts_after: int
    experts_pruned: int
    expert_bytes_skipped: int
    expert_bytes_loaded: int
    scoring_seconds: float
    expert_rows: list[int]
    """Leading dim of each MoE layer's expert weights as vLLM allocated them."""
    plan_files: list[str]
    tensors_read: list[str] | None = None
    """Checkpoint tensors read from disk; only when AIMER_TRACE_READS=1."""
    criterion: str = "aimer"
    """What chose the pruned experts (a plan file may come from a baseline criterion)."""

    def summary(self) -> str:
        """The loader's log lines: family, criterion, plan, counts and bytes."""
        lines = [
            f"vllm-aimer: pruned {self.family} with "
            f"{'AIMER' if self.criterion == 'aimer' else self.criterion} ({self.source}), "
            f"ratio {self.ratio:g}, "
            f"plan {self.plan_hash}",
            f"  experts per layer {self.experts_before} -> {self.experts_after} in "
            f"{len(self.layers)} MoE layers ({self.experts_pruned} pruned), top_k {self.top_k}",
            f"  expert bytes skipped {human_bytes(self.expert_bytes_skipped)}, loaded "
            f"{human_bytes(self.expert_bytes_loaded)}; scoring {self.scoring_seconds:.2f} s",
        ]
        if self.plan_files:
            lines.append(f"  plan written to {', '.join(self.plan_files)}")
        return "\n".join(lines)
