"""The /metrics contract that the deployment material (alert rules, dashboard) relies on.

One place for the names, so the dashboard and rules tests (and later a live
scrape of a real server) check against the same list. The package exports the
same names as `vllm_aimer.metrics.METRIC_NAMES`; `test_metric_contract.py`
checks the two agree.
"""

from __future__ import annotations

# vllm_aimer gauges: name -> labels besides `model_name` (every one carries model_name).
AIMER_METRICS: dict[str, tuple[str, ...]] = {
    "vllm_aimer_experts_per_layer": ("layer", "state"),  # state: "before" | "after"
    "vllm_aimer_experts_pruned": (),
    "vllm_aimer_moe_layers": (),
    "vllm_aimer_top_k": (),
    "vllm_aimer_prune_ratio": (),
    "vllm_aimer_expert_skipped_bytes": (),
    "vllm_aimer_expert_loaded_bytes": (),
    "vllm_aimer_scoring_seconds": (),
    "vllm_aimer_plan_info": ("ratio", "plan_hash", "source", "checkpoint"),
}
AIMER_METRIC_NAMES: frozenset[str] = frozenset(AIMER_METRICS)
PLAN_SOURCES: frozenset[str] = frozenset({"score", "plan_file", "cache"})

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
