"""deploy/prometheus: promtool accepts the rules and their unit tests pass, the
PrometheusRule carries the same groups, and every query uses metrics the
server exports."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.deploy.metric_names import AIMER_METRIC_NAMES, is_known_metric
from tests.deploy.paths import PROMETHEUS_RULE_CR, PROMTOOL_TESTS, RULES_FILE
from tests.deploy.promql import metric_names_in_promql

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package `prometheus`: apt-get install prometheus)")


def rules():
    return [rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"]
            for rule in group["rules"]]


@needs_promtool
def test_promtool_check_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES_FILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests():
    tests = sorted(PROMTOOL_TESTS.glob("*.test.yaml"))
    assert tests
    result = subprocess.run([PROMTOOL, "test", "rules", *(t.name for t in tests)],
                            cwd=PROMTOOL_TESTS, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_cover_every_alert():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    tested = set()
    for path in PROMTOOL_TESTS.glob("*.test.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", [])}
    pruning_alerts = {a for a in alerts if a.startswith("Aimer")}
    assert {"AimerPlanMismatchAcrossReplicas", "AimerPruningNotApplied",
            "AimerExpertsBelowTopK"} <= pruning_alerts
    assert pruning_alerts <= tested


def test_rules_structure():
    doc = yaml.safe_load(RULES_FILE.read_text())
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names))
    recorded = [r["record"] for r in rules() if "record" in r]
    assert "vllm_aimer:expert_bytes_saved:ratio" in recorded
    assert any("vllm:request_success_total" in r["expr"] for r in rules() if "record" in r)
    assert any("vllm:e2e_request_latency_seconds_bucket" in r["expr"]
               for r in rules() if "record" in r)
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_use_only_exported_metrics():
    recorded = {r["record"] for r in rules() if "record" in r}
    used = set()
    for rule in rules():
        names = metric_names_in_promql(rule["expr"])
        assert names, rule
        unknown = {n for n in names if not is_known_metric(n) and n not in recorded}
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"
        used |= names
    assert used & AIMER_METRIC_NAMES


def test_prometheus_rule_matches_rules_file():
    cr = yaml.safe_load(PROMETHEUS_RULE_CR.read_text())
    assert cr["apiVersion"] == "monitoring.coreos.com/v1"
    assert cr["kind"] == "PrometheusRule"
    assert cr["metadata"]["name"]
    assert cr["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]
