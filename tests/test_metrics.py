"""Pruning facts on vLLM's own /metrics, with one API server and with two (prometheus
multiprocess mode), parsed by prometheus_client's parser and linted by promtool."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SERVED_NAME, server_args
from tests.deploy.metric_names import AIMER_METRIC_NAMES
from tests.helpers.reference import load_tensors, EXPERT_WEIGHT_RE

pytestmark = pytest.mark.engine

AIMER_METRICS = AIMER_METRIC_NAMES  # the package's one list (tests/deploy/metric_names.py)
VLLM_METRICS = {"vllm:num_requests_running", "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc"}


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def aimer_exposition(text: str) -> str:
    return "\n".join(l for l in text.splitlines()
                     if "vllm_aimer_" in l.split(" ", 3)[:3] or l.startswith("vllm_aimer_")
                     or (l.startswith("#") and " vllm_aimer_" in l)) + "\n"


def sample_map(fams, name):
    return [(s.labels, s.value) for s in fams[name].samples]


def expected_bytes(model, plan):
    """Pruned and kept expert bytes straight from the tensors (independent of the package)."""
    pruned = {int(k): set(v) for k, v in plan.items()}
    skipped = loaded = 0
    for name, t in load_tensors(model).items():
        m = EXPERT_WEIGHT_RE.search(name)
        if m:
            n = t.numel() * t.element_size()
            if int(m[2]) in pruned[int(m[1])]:
                skipped += n
            else:
                loaded += n
    return skipped, loaded


def check_pruning_metrics(text: str, model, plan_out, source: str = "score") -> None:
    fams = families(text)
    assert AIMER_METRICS <= set(fams), AIMER_METRICS - set(fams)
    assert VLLM_METRICS <= set(fams), VLLM_METRICS - set(fams)
    assert len([n for n in fams if n.startswith("vllm:")]) >= 10
    plan = json.loads((plan_out / "pruned_experts.json").read_text())
    per_layer = sample_map(fams, "vllm_aimer_experts_per_layer")
    assert sorted((l["layer"], l["state"], v) for l, v in per_layer) == sorted(
        [(str(i), "before", 16.0) for i in range(4)] + [(str(i), "after", 8.0) for i in range(4)])
    assert all(l["model_name"] == SERVED_NAME for l, _ in per_layer)
    assert sample_map(fams, "vllm_aimer_experts_pruned")[0][1] == 32
    assert sample_map(fams, "vllm_aimer_top_k")[0][1] == 2
    assert sample_map(fams, "vllm_aimer_prune_ratio")[0][1] == 0.5
    skipped, loaded = expected_bytes(model, plan)
    assert sample_map(fams, "vllm_aimer_expert_skipped_bytes")[0][1] == skipped
    assert sample_map(fams, "vllm_aimer_expert_loaded_bytes")[0][1] == loaded
    seconds = sample_map(fams, "vllm_aimer_scoring_seconds")[0][1]
    assert (0 < seconds < 60) if source == "score" else seconds == 0
    (labels, value), = sample_map(fams, "vllm_aimer_plan_info")
    full_plan = json.loads((plan_out / "plan.json").read_text())
    assert value == 1 and labels["source"] == source and labels["ratio"] == "0.5"
    assert full_plan["checkpoint"].startswith(labels["checkpoint"])
    assert len(labels["plan_hash"]) == 16


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                          capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metrics_single_api_server(pruned_server):
    text = pruned_server.get("/metrics")
    check_pruning_metrics(text, pruned_server.model, pruned_server.plan_out)


def test_promtool_accepts_the_pruning_metrics(pruned_server):
    text = pruned_server.get("/metrics")
    ours = aimer_exposition(text)
    assert "# TYPE vllm_aimer_plan_info gauge" in ours
    promtool_check(ours)


def test_metrics_with_two_api_servers(pruned_server, tmp_path):
    """Also a restart on the same checkpoint and ratio: the plan comes from the cache."""
    from vllm_aimer.testing.server import ServerProcess

    model = pruned_server.model
    plan_out = tmp_path / "plan"
    args = server_args({"prune_ratio": 0.5, "plan_out": str(plan_out),
                        "plan_cache": str(pruned_server.plan_cache)}, "--api-server-count", "2")
    with ServerProcess(model, args, tmp_path / "srv") as server:
        server.wait_ready()
        assert "api_server_count=2" in server.log().replace(" ", "") or "ApiServer_1" in server.log()
        # Each scrape may reach either API server: all must show the same facts.
        for _ in range(6):
            text = server.get("/metrics")
            check_pruning_metrics(text, model, plan_out, source="cache")
        assert (plan_out / "pruned_experts.json").read_text() == (
            pruned_server.plan_out / "pruned_experts.json").read_text()
        promtool_check(aimer_exposition(text))
