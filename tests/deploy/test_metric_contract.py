"""The /metrics contract: the gauges the package exports (its one list,
vllm_aimer.metrics.METRICS) are the ones deploy/README.md documents for the rules and
dashboard, with the same labels and plan sources; the vLLM metrics they use exist."""

from __future__ import annotations

import re
import typing

from tests.deploy.metric_names import AIMER_METRICS, VLLM_METRICS_USED
from tests.deploy.paths import REPO


def _documented() -> dict[str, tuple[str, ...]]:
    """deploy/README.md's metrics table: `| \\`name\\` | \\`label\\`, ... | meaning |`."""
    text = (REPO / "deploy" / "README.md").read_text()
    rows = re.findall(r"^\| `(vllm_aimer_\w+)` \|([^|]*)\|", text, re.M)
    return {name: tuple(re.findall(r"`(\w+)`", labels)) for name, labels in rows}


def test_names_and_labels_match_the_documented_table():
    documented = _documented()
    assert documented, "no vllm_aimer metrics table found in deploy/README.md"
    assert set(AIMER_METRICS) == set(documented)
    for name, labels in AIMER_METRICS.items():
        assert labels == documented[name], name


def test_plan_sources_match_the_documentation():
    from vllm_aimer.report import PruningReport

    sources = set(typing.get_args(PruningReport.model_fields["source"].annotation))
    text = (REPO / "deploy" / "README.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("| `vllm_aimer_plan_info`"))
    documented = set(re.findall(r"`(\w+)`", line.split("`source` is", 1)[1]))
    assert sources == documented == {"score", "cache", "plan_file"}


def test_vllm_metric_names_exist_in_vllm():
    """Every vLLM metric the rules and dashboard use is defined by the installed vLLM
    (counters gain `_total`, histograms `_bucket` in the exposition)."""
    import inspect

    from vllm.v1.metrics import loggers

    source = inspect.getsource(loggers)
    for name in VLLM_METRICS_USED:
        base = name.removesuffix("_total").removesuffix("_bucket")
        assert f'"{base}"' in source, name
