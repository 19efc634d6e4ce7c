"""Where the deployment material lives in the repository."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CHART_DIR = REPO / "helm" / "vllm-aimer"
DEPLOY_DIR = REPO / "deploy"
RULES_FILE = DEPLOY_DIR / "prometheus" / "vllm-aimer-rules.yaml"
PROMETHEUS_RULE_CR = DEPLOY_DIR / "prometheus" / "kube-prometheus-rule.yaml"
DASHBOARD = DEPLOY_DIR / "grafana" / "vllm-aimer-dashboard.json"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool"
