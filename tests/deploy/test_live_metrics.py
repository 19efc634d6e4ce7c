"""Every metric the dashboard and the alerting/recording rules query is one a real
`vllm serve --load-format aimer` exports (scraped from the session's pruned server)."""

from __future__ import annotations

import json

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.paths import REPO
from tests.deploy.promql import metric_names_in_promql

pytestmark = pytest.mark.engine


def _exported(text: str) -> set[str]:
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)  # _total, _bucket, _sum, _count, _created
    return names


def _dashboard_exprs() -> list[str]:
    board = json.loads((REPO / "deploy/grafana/vllm-aimer-dashboard.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]


def _rule_exprs() -> tuple[list[str], set[str]]:
    rules = yaml.safe_load((REPO / "deploy/prometheus/vllm-aimer-rules.yaml").read_text())
    exprs, recorded = [], set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs.append(rule["expr"])
            if "record" in rule:
                recorded.add(rule["record"])
    return exprs, recorded


def test_queried_metrics_are_exported_by_a_real_server(pruned_server):
    exported = _exported(pruned_server.get("/metrics"))
    assert "vllm_aimer_plan_info" in exported and "vllm:num_requests_running" in exported
    rule_exprs, recorded = _rule_exprs()
    queried = set()
    for expr in _dashboard_exprs() + rule_exprs:
        queried |= metric_names_in_promql(expr)
    assert queried, "no metric names found in the dashboard and rules"
    missing = sorted(queried - exported - recorded - {"up"})
    assert not missing, f"queried but not exported by vllm serve: {missing}"
