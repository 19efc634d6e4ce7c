"""The plan cache: one scoring for many processes starting together, atomic entries."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from vllm_aimer.plan import LayerPlan, Plan
from vllm_aimer.plan_cache import cached_plan

FP = "f" * 64


def _plan(fp: str = FP) -> Plan:
    return Plan(checkpoint=fp, family="olmoe", num_experts=4, top_k=2, ratio=0.5,
                layers={"0": LayerPlan(pruned=[1, 3], kept=[0, 2], scores=[0.1, 0.9, 0.2, 0.8])})


def _worker(cache: str, log: str, out: str) -> None:
    def compute() -> Plan:
        with open(log, "a") as f:
            f.write("scored\n")
        time.sleep(0.5)  # long enough that the other processes arrive meanwhile
        return _plan()

    plan, hit = cached_plan(Path(cache), FP, 0.5, compute)
    Path(out).write_text(f"{hit}\n{plan.to_json()}")


def test_processes_starting_together_score_once(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "c"), str(tmp_path / "log"),
                                                str(tmp_path / f"out{i}"))) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert (tmp_path / "log").read_text() == "scored\n"
    outs = [(tmp_path / f"out{i}").read_text().split("\n", 1) for i in range(4)]
    assert sorted(hit for hit, _ in outs) == ["False", "True", "True", "True"]
    assert len({body for _, body in outs}) == 1


def test_hit_skips_compute_and_foreign_or_broken_entries_are_replaced(tmp_path):
    calls = []

    def compute() -> Plan:
        calls.append(1)
        return _plan()

    assert cached_plan(tmp_path, FP, 0.5, compute)[1] is False
    assert cached_plan(tmp_path, FP, 0.5, compute)[1] is True
    assert len(calls) == 1
    assert cached_plan(tmp_path, FP, 0.25, compute)[1] is False  # another ratio, another key
    entry = next(p for p in tmp_path.glob("*.json"))
    entry.write_text("{broken")
    for e in tmp_path.glob("*.json"):
        e.write_text("{broken")
    assert cached_plan(tmp_path, FP, 0.5, compute)[1] is False
    assert len(calls) == 3
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_plan_cache_option():
    import pytest

    from vllm_aimer.errors import AimerError
    from vllm_aimer.options import parse_options

    assert parse_options({"prune_ratio": 0.5}).plan_cache is True
    assert parse_options({"prune_ratio": 0.5, "plan_cache": False}).plan_cache is False
    assert parse_options({"prune_ratio": 0.5, "plan_cache": "/c"}).plan_cache == "/c"
    with pytest.raises(AimerError, match="plan_cache must be a directory path or false"):
        parse_options({"prune_ratio": 0.5, "plan_cache": 3})
