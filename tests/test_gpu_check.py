"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without a GPU: it stops at
once, saying so; and its engine-comparing path runs (on vLLM's CPU build, tiny model),
so the script a GPU session depends on does not rot."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_without_a_gpu_it_stops_at_once():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "nothing was run" in proc.stderr
    assert time.perf_counter() - start < 60
    assert "| check |" not in proc.stdout  # no check started


@pytest.mark.engine
def test_cpu_smoke_runs_the_fidelity_check(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["ok"] for r in rows] == [True, True]
    assert "pruned vs stock vLLM on the sliced checkpoint" in rows[0]["check"]


def test_gpu_scoring_step_table(tiny_checkpoint, capsys):
    """Step 0's table rows (GPU scoring throughput, GPU vs CPU scores), run with the CPU
    in place of the GPU: no CUDA here, so this checks the step's plumbing, not a GPU."""
    from benchmarks.gpu_check import Table, gpu_scoring

    table = Table()
    model = tiny_checkpoint("qwen3_moe", dtype=torch.bfloat16)
    gpu_scoring(table, model, device="cpu")
    assert [r["check"] for r in table.rows] == [
        f"{model.name}: GPU scoring throughput (warm page cache)",
        f"{model.name}: GPU scores vs CPU scores, max relative difference"]
    assert "GB/s" in table.rows[0]["measured"] and table.rows[1]["ok"] is True
