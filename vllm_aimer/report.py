"""What the loader did, written by the worker for the API server's /metrics.

Model loading runs in a worker process and /metrics is served by the API
server, so the worker writes this small JSON report atomically into a state
directory that both processes share through the environment (set by the plugin
in the first process that loads it; children inherit it).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from vllm_aimer.layout import ExpertLayout
from vllm_aimer.outputs import atomic_write_text
from vllm_aimer.plan import Plan

if TYPE_CHECKING:  # weights.py needs torch, which the CLI does not import
    from vllm_aimer.weights import LoadStats

STATE_DIR_ENV = "AIMER_STATE_DIR"
TRACE_READS_ENV = "AIMER_TRACE_READS"
REPORT_GLOB = "report-rank*.json"


class PruningReport(BaseModel):
    model_name: str
    family: str
    checkpoint: str
    plan_hash: str
    ratio: float
    source: str
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

    @classmethod
    def build(cls, *, model_name: str, plan: Plan, layout: ExpertLayout, source: str,
              scoring_seconds: float, stats: LoadStats | None, expert_rows: list[int],
              plan_files: list[str]) -> "PruningReport":
        if stats is None:  # nothing pruned: vLLM's own loader read every expert
            loaded = sum(sum(layout.expert_bytes[layer]) for layer in layout.layers)
            skipped, reads = 0, None
        else:
            loaded, skipped = stats.expert_bytes_loaded, stats.expert_bytes_skipped
            reads = sorted(stats.tensors_read) if os.environ.get(TRACE_READS_ENV) == "1" else None
        return cls(model_name=model_name, family=layout.arch.family, checkpoint=plan.checkpoint,
                   plan_hash=plan.plan_hash, ratio=plan.ratio, source=source, top_k=layout.top_k,
                   layers=list(layout.layers), experts_before=layout.num_experts,
                   experts_after=plan.kept_per_layer, experts_pruned=plan.total_pruned,
                   expert_bytes_skipped=skipped, expert_bytes_loaded=loaded,
                   scoring_seconds=scoring_seconds, expert_rows=expert_rows,
                   plan_files=plan_files, tensors_read=reads, criterion=plan.criterion)

    def summary(self) -> str:
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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def state_dir(create: bool = False) -> Path | None:
    """The directory shared with the API server, or None when none was set up."""
    value = os.environ.get(STATE_DIR_ENV)
    if not value:
        if not create:
            return None
        value = tempfile.mkdtemp(prefix="vllm-aimer-")
        os.environ[STATE_DIR_ENV] = value
        # The creating process is the top of the process tree: it has the last word.
        atexit.register(_at_exit, Path(value))
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


ERROR_FILE = "error.txt"


def write_error(message: str) -> None:
    """Record a load failure so the top process can repeat it as its last line."""
    directory = state_dir()
    if directory is not None:
        atomic_write_text(directory / ERROR_FILE, message)


def _at_exit(directory: Path) -> None:
    # vLLM ends a failed start with its own "Engine core initialization failed";
    # the user should see what to fix as the very last line instead.
    error = directory / ERROR_FILE
    if error.is_file():
        print(error.read_text().strip(), file=sys.stderr, flush=True)
    shutil.rmtree(directory, ignore_errors=True)


def rank() -> int:
    """This process's global rank (0 outside torch.distributed)."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_report(report: PruningReport) -> Path:
    directory = state_dir(create=True)
    assert directory is not None
    path = directory / f"report-rank{rank()}.json"
    atomic_write_text(path, report.model_dump_json(indent=1))
    return path


def read_reports(directory: Path | None = None) -> list[PruningReport]:
    """Reports of this server's workers, lowest rank first; unreadable ones are ignored."""
    directory = directory or state_dir()
    if directory is None or not directory.is_dir():
        return []
    reports = []
    for path in sorted(directory.glob(REPORT_GLOB), key=lambda p: int(p.stem.split("rank")[-1])):
        try:
            reports.append(PruningReport.model_validate_json(path.read_bytes()))
        except (OSError, ValueError):
            continue
    return reports
