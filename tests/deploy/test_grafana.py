"""deploy/grafana: the dashboard is importable JSON, every panel queries
something, and every query uses metrics the server exports."""

from __future__ import annotations

import json

import pytest

from tests.deploy.metric_names import AIMER_METRIC_NAMES, VLLM_METRICS_USED, is_known_metric
from tests.deploy.paths import DASHBOARD
from tests.deploy.promql import metric_names_in_promql

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def queries(dashboard):
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            yield f"variable {var['name']}", query["query"] if isinstance(query, dict) else query


def test_importable(dashboard):
    assert dashboard["uid"] == "vllm-aimer"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["id"] is None, "an exported dashboard carries no instance id"
    [ds_input] = dashboard["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS"
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_target(dashboard):
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == DS, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == DS, panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    # Also a datasource variable of the input's name, so a dashboard provisioned
    # from a file (no import dialog to fill ${DS_PROMETHEUS}) still resolves it.
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    assert variables["model_name"]["datasource"] == DS
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            assert 'model_name=~"$model_name"' in target["expr"], panel["title"]


def test_queries_use_only_exported_metrics(dashboard):
    used = set()
    for where, expr in queries(dashboard):
        names = metric_names_in_promql(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = {n for n in names if not is_known_metric(n)}
        assert not unknown, f"{where}: {unknown} in {expr!r}"
        used |= names
    # The panels the dashboard promises.
    assert {"vllm_aimer_experts_per_layer", "vllm_aimer_experts_pruned",
            "vllm_aimer_expert_skipped_bytes", "vllm_aimer_expert_loaded_bytes",
            "vllm_aimer_scoring_seconds", "vllm_aimer_plan_info"} <= used
    assert {"vllm:request_success_total", "vllm:e2e_request_latency_seconds_bucket",
            "vllm:time_to_first_token_seconds_bucket", "vllm:generation_tokens_total",
            "vllm:num_requests_running", "vllm:num_requests_waiting"} <= used
    assert used <= AIMER_METRIC_NAMES | VLLM_METRICS_USED


def test_experts_kept_per_layer_panel(dashboard):
    panel = next(p for p in panels(dashboard) if p["title"] == "Experts kept per layer")
    [target] = panel["targets"]
    assert 'state="after"' in target["expr"]
    assert "by (layer)" in target["expr"]
