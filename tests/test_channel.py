"""The worker-to-server channel: reports and errors travel through the state directory,
and the API server's side (plugin registration, /metrics) reads them without importing
torch or the worker-side modules. No engine: the collector reads a report file as it
does at scrape time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_aimer.channel import ERROR_FILE, read_reports, write_error
from vllm_aimer.report import PruningReport
from vllm_aimer.units import human_bytes

WORKER_SIDE = ("vllm_aimer.loader", "vllm_aimer.weights", "vllm_aimer.layout", "vllm_aimer.plan",
               "vllm_aimer.scoring", "vllm_aimer.checkpoint", "vllm_aimer.encodings")


def _report(**changes) -> PruningReport:
    fields = dict(model_name="m", family="qwen3_moe", checkpoint="ab" * 32, plan_hash="c" * 16,
                  ratio=0.5, source="score", top_k=2, layers=[0, 1], experts_before=8,
                  experts_after=4, experts_pruned=8, expert_bytes_skipped=1024,
                  expert_bytes_loaded=2048, scoring_seconds=0.25, expert_rows=[4, 4],
                  plan_files=[])
    return PruningReport(**{**fields, **changes})


def test_reports_are_read_lowest_rank_first_and_partial_ones_skipped(tmp_path):
    for rank in (10, 2, 0):
        (tmp_path / f"report-rank{rank}.json").write_text(
            _report(model_name=f"rank{rank}").model_dump_json())
    (tmp_path / "report-rank1.json").write_text('{"model_name": "half-writ')
    assert [r.model_name for r in read_reports(tmp_path)] == ["rank0", "rank2", "rank10"]
    assert read_reports(tmp_path / "missing") == []


def test_error_is_recorded_only_inside_a_vllm_process_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("AIMER_STATE_DIR", raising=False)
    write_error("nowhere to go")  # no state directory: nothing is written, nothing fails
    monkeypatch.setenv("AIMER_STATE_DIR", str(tmp_path))
    write_error("vllm-aimer: bad ratio. Fix: pass 0.5.")
    assert (tmp_path / ERROR_FILE).read_text() == "vllm-aimer: bad ratio. Fix: pass 0.5."


def test_summary_from_numbers():
    text = _report().summary()
    assert "experts per layer 8 -> 4 in 2 MoE layers (8 pruned), top_k 2" in text
    assert "expert bytes skipped 1.00 KiB, loaded 2.00 KiB; scoring 0.25 s" in text


@pytest.mark.parametrize("n, kwargs, text", [
    (512, {}, "512 B"), (1536, {}, "1.50 KiB"), (3 * 1024**3, {}, "3.00 GiB"),
    (5 * 1024**5, {}, "5120.00 TiB"), (-2048, {}, "-2.00 KiB"),
    (1024**2, {"unit": "GiB", "digits": 3}, "0.001 GiB"), (1024**3, {"unit": "GiB"}, "1.00 GiB"),
    (100, {"unit": "B"}, "100 B"),
])
def test_human_bytes(n, kwargs, text):
    assert human_bytes(n, **kwargs) == text


def test_human_bytes_refuses_an_unknown_unit():
    with pytest.raises(ValueError, match="GB"):
        human_bytes(1, unit="GB")


API_SERVER = """
import json, sys
from vllm_aimer import metrics
families = {f.name: f for f in metrics.ReportCollector().collect()}
after_scrape = sorted(m for m in sys.modules if m == "torch" or m.startswith("vllm_aimer"))
from vllm_aimer import plugin
plugin.register()
after_register = sorted(m for m in sys.modules if m.startswith("vllm_aimer"))
from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER as loaders
print("RESULT " + json.dumps({
    "pruned": [s.value for s in families["vllm_aimer_experts_pruned"].samples],
    "after_scrape": after_scrape, "after_register": after_register,
    "registered": "aimer" in loaders}))
"""


def test_api_server_side_imports_nothing_of_the_worker(tmp_path):
    """What the API server does (register the plugin, scrape /metrics from a worker's
    report) in a fresh interpreter: torch is not imported for the scrape, and none of
    our worker-side modules are imported at all (vLLM's own registry imports torch)."""
    (tmp_path / "report-rank0.json").write_text(_report().model_dump_json())
    env = {"AIMER_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", API_SERVER], capture_output=True, text=True,
                          env=env, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, proc.stdout + proc.stderr
    result = json.loads(line[len("RESULT "):])
    assert result["pruned"] == [8.0]
    assert "torch" not in result["after_scrape"]
    assert result["registered"]
    loaded = set(result["after_scrape"]) | set(result["after_register"])
    assert not loaded & set(WORKER_SIDE), sorted(loaded & set(WORKER_SIDE))
    assert {"vllm_aimer.channel", "vllm_aimer.metrics", "vllm_aimer.plugin"} <= loaded
