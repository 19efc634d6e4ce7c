"""tests/deploy/metric_names.py is the list the rules and dashboard are checked
against; it must say what the package really exports."""

from __future__ import annotations

from tests.deploy.metric_names import AIMER_METRICS, VLLM_METRICS_USED


def test_names_match_the_package():
    from vllm_aimer import metrics

    assert set(metrics.METRIC_NAMES) == set(AIMER_METRICS)
    for spec in metrics.METRICS:
        assert tuple(spec.labels) == AIMER_METRICS[metrics.PREFIX + spec.name], spec.name


def test_vllm_metric_names_exist_in_vllm():
    """Every vLLM metric the rules and dashboard use is defined by the installed vLLM
    (counters gain `_total`, histograms `_bucket` in the exposition)."""
    import inspect

    from vllm.v1.metrics import loggers

    source = inspect.getsource(loggers)
    for name in VLLM_METRICS_USED:
        base = name.removesuffix("_total").removesuffix("_bucket")
        assert f'"{base}"' in source, name
