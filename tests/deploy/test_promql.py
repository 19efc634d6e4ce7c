"""The PromQL metric-name extractor the rules and dashboard tests rely on."""

from __future__ import annotations

import pytest

from tests.deploy.promql import metric_names_in_promql


@pytest.mark.parametrize(("expr", "expected"), [
    ("vllm_aimer_experts_pruned", {"vllm_aimer_experts_pruned"}),
    ('vllm_aimer_experts_per_layer{state="after", model_name=~"$model_name"}',
     {"vllm_aimer_experts_per_layer"}),
    ("histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket[5m])))",
     {"vllm:e2e_request_latency_seconds_bucket"}),
    ("sum(rate(vllm:request_success_total{model_name=~\"$model_name\"}[$__rate_interval])) by (model_name)",
     {"vllm:request_success_total"}),
    ('vllm_aimer_experts_per_layer{state="after"} < on(instance) group_left vllm_aimer_top_k',
     {"vllm_aimer_experts_per_layer", "vllm_aimer_top_k"}),
    ("count by (model_name) (count by (model_name, plan_hash) (vllm_aimer_plan_info)) > 1",
     {"vllm_aimer_plan_info"}),
    ("count by (instance) (vllm:num_requests_running) unless on (instance) vllm_aimer_plan_info",
     {"vllm:num_requests_running", "vllm_aimer_plan_info"}),
    ("a_metric / ignoring(state) group_right(layer) b_metric and bool c_metric",
     {"a_metric", "b_metric", "c_metric"}),
    ("rate(x_total[5m] offset 1h) * 1e3 + 0x1f - 2.5e-3 + Inf + NaN", {"x_total"}),
    ('label_replace(up{job="a b"}, "dst", "$1", "src", "(.*)")', {"up"}),
    ("label_values(vllm:num_requests_running, model_name)", {"vllm:num_requests_running"}),
    ('label_values(vllm_aimer_plan_info{source="score"}, plan_hash)', {"vllm_aimer_plan_info"}),
    ("label_values(model_name)", set()),
    ("max_over_time(vllm:kv_cache_usage_perc[1h:5m])", {"vllm:kv_cache_usage_perc"}),
    ("SUM BY (le) (foo_bucket) OR ON() vector(0)", {"foo_bucket"}),
    ("time() - process_start_time_seconds", {"process_start_time_seconds"}),
    ("1 + 2", set()),
])
def test_metric_names_in_promql(expr, expected):
    assert metric_names_in_promql(expr) == expected
