"""Pruning facts on the same /metrics endpoint as vLLM's own metrics.

Loading runs in a worker process, /metrics in the API server, so the facts
travel as the worker's report file (see `channel`); this module imports neither torch
nor the worker-side modules. Two paths, because vLLM
serves /metrics two ways:

- one API server (the default): /metrics is prometheus_client's default
  REGISTRY, to which `install()` adds a collector that reads the report at
  scrape time;
- several API servers (`--api-server-count N`): vLLM sets PROMETHEUS_MULTIPROC_DIR
  before it starts any process and /metrics merges the files in that directory;
  the worker then also writes multiprocess-mode gauges there (`publish`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vllm_aimer.channel import read_reports
from vllm_aimer.report import PruningReport

__all__ = ["PREFIX", "MetricSpec", "METRICS", "METRIC_NAMES", "samples", "ReportCollector",
           "install", "publish"]

PREFIX = "vllm_aimer_"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    doc: str
    labels: tuple[str, ...] = ()


EXPERTS_PER_LAYER = MetricSpec("experts_per_layer",
                               "Routed experts per MoE layer, before and after pruning.",
                               ("layer", "state"))
EXPERTS_PRUNED = MetricSpec("experts_pruned", "Routed experts pruned over all MoE layers.")
MOE_LAYERS = MetricSpec("moe_layers", "MoE layers in the model.")
TOP_K = MetricSpec("top_k", "Experts each token is routed to (unchanged by pruning).")
PRUNE_RATIO = MetricSpec("prune_ratio", "Fraction of routed experts pruned.")
SKIPPED_BYTES = MetricSpec("expert_skipped_bytes",
                           "Bytes of pruned expert tensors that were never read or allocated.")
LOADED_BYTES = MetricSpec("expert_loaded_bytes", "Bytes of kept expert tensors loaded.")
SCORING_SECONDS = MetricSpec("scoring_seconds",
                             "Seconds spent computing AIMER scores at load (0 for a plan file).")
PLAN_INFO = MetricSpec("plan_info", "Identity of the pruning plan in use (value is always 1).",
                       ("ratio", "plan_hash", "source", "checkpoint"))

METRICS: tuple[MetricSpec, ...] = (EXPERTS_PER_LAYER, EXPERTS_PRUNED, MOE_LAYERS, TOP_K,
                                   PRUNE_RATIO, SKIPPED_BYTES, LOADED_BYTES, SCORING_SECONDS,
                                   PLAN_INFO)
METRIC_NAMES: tuple[str, ...] = tuple(PREFIX + m.name for m in METRICS)


def samples(report: PruningReport) -> Iterator[tuple[MetricSpec, tuple[str, ...], float]]:
    """Every sample of one report.

    Yields:
        (metric, its label values without model_name, value), in METRICS order.
    """
    for layer in report.layers:
        yield EXPERTS_PER_LAYER, (str(layer), "before"), report.experts_before
        yield EXPERTS_PER_LAYER, (str(layer), "after"), report.experts_after
    yield EXPERTS_PRUNED, (), report.experts_pruned
    yield MOE_LAYERS, (), len(report.layers)
    yield TOP_K, (), report.top_k
    yield PRUNE_RATIO, (), report.ratio
    yield SKIPPED_BYTES, (), report.expert_bytes_skipped
    yield LOADED_BYTES, (), report.expert_bytes_loaded
    yield SCORING_SECONDS, (), report.scoring_seconds
    yield PLAN_INFO, (f"{report.ratio:g}", report.plan_hash, report.source,
                      report.checkpoint[:16]), 1.0


class ReportCollector(Collector):
    """Reads the worker's report at scrape time (single API server mode)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reports = read_reports()
        if not reports:
            return
        report = reports[0]  # rank 0; every rank applies the same plan
        families = {m: GaugeMetricFamily(PREFIX + m.name, m.doc,
                                         labels=("model_name", *m.labels)) for m in METRICS}
        for metric, labels, value in samples(report):
            families[metric].add_metric((report.model_name, *labels), value)
        yield from families.values()


_installed = False


def install() -> None:
    """Add the collector to prometheus_client's default registry, once per process
    (API server side; nothing in multiprocess mode, where `publish` writes instead)."""
    global _installed
    if _installed or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    REGISTRY.register(ReportCollector())
    _installed = True


def publish(report: PruningReport) -> None:
    """In multiprocess mode (PROMETHEUS_MULTIPROC_DIR set), write `report` as
    multiprocess gauges that every API server's /metrics merges (worker side, rank 0);
    otherwise nothing."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return
    registry = CollectorRegistry()  # private: only the value files matter here
    for metric in METRICS:
        gauge = Gauge(PREFIX + metric.name, metric.doc, ("model_name", *metric.labels),
                      registry=registry, multiprocess_mode="mostrecent")
        for m, labels, value in samples(report):
            if m is metric:
                gauge.labels(report.model_name, *labels).set(value)
