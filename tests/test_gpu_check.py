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
