"""The /metrics names that the deployment material (alert rules, dashboard) relies on.

The vllm_aimer gauges come from the package itself (`vllm_aimer.metrics.METRICS`, the
one list); `test_metric_contract.py` checks that list against the documented table in
deploy/README.md. vLLM's own metrics that the rules and dashboard use are listed here.
"""

from __future__ import annotations

from vllm_aimer.metrics import METRICS, PREFIX

# vllm_aimer gauges: name -> labels besides `model_name` (every one carries model_name).
AIMER_METRICS: dict[str, tuple[str, ...]] = {PREFIX + m.name: tuple(m.labels) for m in METRICS}
AIMER_METRIC_NAMES: frozenset[str] = frozenset(AIMER_METRICS)

# vLLM's own metrics (exposition names, i.e. counters with `_total`, histograms
# with `_bucket`/`_sum`/`_count`) that the rules and dashboard use. Every vLLM
# metric keeps its `vllm:` prefix and carries `model_name`.
VLLM_PREFIX = "vllm:"
VLLM_METRICS_USED: frozenset[str] = frozenset({
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:request_success_total",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:kv_cache_usage_perc",
})


def is_known_metric(name: str) -> bool:
    """True for a vLLM metric (any `vllm:` name) or one of the vllm_aimer gauges."""
    return name.startswith(VLLM_PREFIX) or name in AIMER_METRIC_NAMES
