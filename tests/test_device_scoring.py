"""benchmarks/device_scoring.py, the script a GPU session runs where vLLM and pydantic
are not installed: here it runs with both blocked from import (a meta-path finder that
refuses them, and psutil, prometheus_client and matplotlib, which that machine may lack), on small checkpoints, with its GPU path skipped and the reason recorded.
Its transformers path (--no-dense here: transformers probes for pydantic, which the
blocker answers differently from a machine without it) is the benchmark's own
dense_baseline, run by `make bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_BLOCKED = """
import importlib.abc, runpy, sys

class NotOnTheGpuMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("vllm", "pydantic", "psutil", "prometheus_client",
                                      "matplotlib"):
            raise ImportError(f"{name} is not installed on the GPU machine")

sys.meta_path.insert(0, NotOnTheGpuMachine())
sys.argv = ["device_scoring", *sys.argv[1:]]
runpy.run_module("benchmarks.device_scoring", run_name="__main__")
"""


def test_device_scoring_runs_without_vllm_and_pydantic(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED, "--out", str(out), "--size", "0.03",
         "--fp32-size", "0.03", "--dir", str(tmp_path / "ckpt"), "--repeats", "1",
         "--no-dense"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "device_scoring.json").read_text())
    assert result["gpu_scoring"].startswith("skipped: no CUDA device")
    assert [r["dtype"] for r in result["runs"]] == ["bfloat16", "float32"]
    for run in result["runs"]:
        assert run["checks"] == {"cpu_1_thread_equals_all_threads": True}
        assert run["failed"] == {}
        for state in ("cold", "warm"):
            assert set(run["gb_per_s"][state]) == {
                "plain_read_1_thread", f"plain_read_{run['cores']}_threads",
                "cpu_scoring_1_thread", f"cpu_scoring_{run['cores']}_threads"}
        assert all(r is None or r < 0.5 for r in run["resident_before"]["cold"])
    assert "| checkpoint | cache | path | GB/s |" in proc.stdout
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
