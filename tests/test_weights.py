"""`PrunedWeights`, the weight stream vLLM is fed, against a slice computed here."""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers.reference import (EXPERT_ANY_RE, FUSED_RE, ROUTER_RE, header_bytes, load_tensors,
                                     shard_names, sliced_tensors)
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.layout import expert_layout
from vllm_aimer.plan import make_plan, plan_from_pruned_experts
from vllm_aimer.scoring import score_checkpoint
from vllm_aimer.weights import PrunedWeights

NEW_ID_RE = re.compile(r"\.experts\.(\d+)\.")


def scored_plan(model, ratio=0.5):
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    scores = score_checkpoint(ckpt, layout, progress=False).scores
    return ckpt, layout, make_plan(layout, scores, ratio, ckpt.fingerprint)


def collect(iterator) -> dict[str, torch.Tensor]:
    items = list(iterator)
    names = [n for n, _ in items]
    assert len(names) == len(set(names)), "a name was yielded twice"
    return dict(items)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert tuple(got[name].shape) == tuple(t.shape), name
        assert torch.equal(got[name], t), name


def pruned_ids(plan) -> dict[int, list[int]]:
    return {int(k): v for k, v in plan.pruned_experts().items()}


@pytest.mark.parametrize("family, kwargs", [
    ("qwen3_moe", {}), ("olmoe", {}), ("mixtral", {}), ("qwen2_moe", {}),
    ("qwen3_moe", {"dtype": torch.bfloat16, "max_shard_size": "1MB"}),
    ("mixtral", {"max_shard_size": "1MB"}), ("qwen2_moe", {"fused": True}),
], ids=["qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "qwen3_moe-bf16-sharded",
        "mixtral-sharded", "qwen2_moe-fused"])
def test_stream_equals_reference_slice(tiny_checkpoint, family, kwargs):
    model = tiny_checkpoint(family, **kwargs)
    ckpt, layout, plan = scored_plan(model)
    pruned = pruned_ids(plan)
    assert all(len(ids) == 8 for ids in pruned.values())
    weights = PrunedWeights(ckpt, layout, plan)
    got = collect(weights)
    want = sliced_tensors(model, pruned)
    assert_same_tensors(got, want)
    # Routers have K rows, experts are numbered 0..K-1 in every MoE layer.
    for name, t in got.items():
        if ROUTER_RE.search(name):
            assert t.shape[0] == 8
        m = EXPERT_ANY_RE.search(name)
        if m:
            assert int(m["expert"]) < 8


def test_pruned_experts_are_never_read(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe", max_shard_size="1MB")
    ckpt, layout, plan = scored_plan(model)
    pruned = pruned_ids(plan)
    weights = PrunedWeights(ckpt, layout, plan)
    collect(weights)
    sizes = header_bytes(model)
    pruned_names = {n for n in sizes if (m := EXPERT_ANY_RE.search(n))
                    and int(m["expert"]) in pruned[int(m["layer"])]}
    assert len(pruned_names) == 4 * 8 * 3
    assert not pruned_names & weights.stats.tensors_read
    # Everything else was read exactly as needed.
    assert weights.stats.tensors_read == set(sizes) - pruned_names


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_expert_byte_accounting(tiny_checkpoint, family):
    model = tiny_checkpoint(family, dtype=torch.float16)
    ckpt, layout, plan = scored_plan(model, ratio=0.25)
    pruned = pruned_ids(plan)
    weights = PrunedWeights(ckpt, layout, plan)
    collect(weights)
    sizes = header_bytes(model)
    all_expert = sum(b for n, b in sizes.items() if EXPERT_ANY_RE.search(n))
    pruned_bytes = sum(b for n, b in sizes.items() if (m := EXPERT_ANY_RE.search(n))
                       and int(m["expert"]) in pruned[int(m["layer"])])
    assert all_expert == 4 * 16 * 3 * 64 * 64 * 2
    assert pruned_bytes == 4 * 4 * 3 * 64 * 64 * 2
    assert weights.stats.expert_bytes_skipped == pruned_bytes
    assert weights.stats.expert_bytes_loaded + weights.stats.expert_bytes_skipped == all_expert


def test_skip_callback_sees_new_names(tiny_checkpoint):
    model = tiny_checkpoint("olmoe")
    ckpt, layout, plan = scored_plan(model)
    pruned = pruned_ids(plan)
    # The plan keeps some old ids >= 2 among the first two kept ones, so the
    # callback gives a different result on old and new names.
    kept = {layer: [e for e in range(16) if e not in ids] for layer, ids in pruned.items()}
    assert any(k[1] >= 2 for k in kept.values())

    seen: list[str] = []

    def skip(name: str) -> bool:
        seen.append(name)
        m = NEW_ID_RE.search(name)
        return m is not None and int(m[1]) >= 2

    weights = PrunedWeights(ckpt, layout, plan)
    got = collect(weights.iterate(skip))
    want = {n: t for n, t in sliced_tensors(model, pruned).items()
            if not ((m := NEW_ID_RE.search(n)) and int(m[1]) >= 2)}
    assert_same_tensors(got, want)
    expert_names = [n for n in got if EXPERT_ANY_RE.search(n)]
    assert len(expert_names) == 4 * 2 * 3
    # The callback was asked about new names only (ids 0..7), never pruned or old ones.
    for name in seen:
        m = NEW_ID_RE.search(name)
        if m:
            assert int(m[1]) < 8
    # Skipped tensors are not read either.
    read_experts = {n for n in weights.stats.tensors_read if EXPERT_ANY_RE.search(n)}
    want_read = set()
    for layer, ks in kept.items():
        for old in ks[:2]:
            want_read |= {n for n in ckpt.tensors if (m := EXPERT_ANY_RE.search(n))
                          and int(m["layer"]) == layer and int(m["expert"]) == old}
    assert read_experts == want_read


def test_skip_callback_drops_other_tensors_by_name(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe")
    ckpt, layout, plan = scored_plan(model)
    weights = PrunedWeights(ckpt, layout, plan)
    got = collect(weights.iterate(lambda n: n == "lm_head.weight"))
    want = sliced_tensors(model, pruned_ids(plan))
    del want["lm_head.weight"]
    assert_same_tensors(got, want)
    assert "lm_head.weight" not in weights.stats.tensors_read


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_tensors_are_sliced_to_kept_rows(tiny_checkpoint, family):
    model = tiny_checkpoint(family, fused=True)
    ckpt, layout, plan = scored_plan(model)
    pruned = pruned_ids(plan)
    weights = PrunedWeights(ckpt, layout, plan)
    got = collect(weights)
    assert_same_tensors(got, sliced_tensors(model, pruned))
    fused = [n for n in got if FUSED_RE.search(n)]
    assert len(fused) == 8
    for name in fused:
        assert got[name].shape[0] == 8
    sizes = header_bytes(model)
    fused_bytes = sum(b for n, b in sizes.items() if FUSED_RE.search(n))
    assert weights.stats.expert_bytes_skipped == fused_bytes // 2
    assert weights.stats.expert_bytes_loaded + weights.stats.expert_bytes_skipped == fused_bytes


def test_fused_slicing_with_scattered_kept_ids(tiny_checkpoint):
    """Kept ids in several separate runs (and the first and last experts pruned)."""
    model = tiny_checkpoint("qwen3_moe", fused=True)
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    pruned = {0: [0, 5, 6, 15], 1: [1, 3, 5, 7], 2: [12, 13, 14, 15], 3: [0, 1, 2, 3]}
    plan = plan_from_pruned_experts(layout, {str(k): v for k, v in pruned.items()},
                                    ckpt.fingerprint, "test")
    weights = PrunedWeights(ckpt, layout, plan)
    got = collect(weights)
    want = sliced_tensors(model, pruned)
    assert_same_tensors(got, want)
    full = load_tensors(model)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(got[name][0], full[name][0])
    assert torch.equal(got[name][1], full[name][2])
    assert torch.equal(got[name][-1], full[name][15])


def test_checkpoint_order_is_kept(tiny_checkpoint):
    """Tensors come shard by shard, in the checkpoint's file order."""
    model = tiny_checkpoint("qwen3_moe", max_shard_size="1MB")
    ckpt, layout, plan = scored_plan(model)
    index_file = {n: t.file for n, t in ckpt.tensors.items()}
    names = [n for n, _ in PrunedWeights(ckpt, layout, plan)]
    files = []
    for n in names:
        m = EXPERT_ANY_RE.search(n)
        if m:
            old = plan.layer(int(m["layer"])).kept[int(m["expert"])]
            n = n.replace(f".experts.{m['expert']}.", f".experts.{old}.")
        files.append(index_file[n])
    assert files == sorted(files, key=shard_names(model).index)


@pytest.mark.parametrize("family, kwargs", [
    ("qwen3_moe", {"dtype": torch.bfloat16, "max_shard_size": "1MB"}),
    ("qwen2_moe", {"fused": True}),
], ids=["qwen3_moe-bf16-sharded", "qwen2_moe-fused"])
@pytest.mark.parametrize("threads", [2, 8])
def test_threaded_stream_equals_the_sequential_one(tiny_checkpoint, family, kwargs, threads):
    """vLLM's enable_multithread_load / num_threads: reader threads ahead of the stream,
    the same tensors in the same order, the same bytes read and skipped, no pruned
    expert read, and a skip callback still applied."""
    model = tiny_checkpoint(family, **kwargs)
    ckpt, layout, plan = scored_plan(model)
    sequential = PrunedWeights(ckpt, layout, plan)
    threaded = PrunedWeights(ckpt, layout, plan)
    want = list(sequential.iterate())
    got = list(threaded.iterate(threads=threads))
    assert [n for n, _ in got] == [n for n, _ in want]
    assert_same_tensors(dict(got), sliced_tensors(model, pruned_ids(plan)))
    assert threaded.stats == sequential.stats
    odd = lambda name: (m := NEW_ID_RE.search(name)) is not None and int(m[1]) % 2 == 1  # noqa: E731
    assert ([n for n, _ in PrunedWeights(ckpt, layout, plan).iterate(odd, threads=threads)]
            == [n for n, _ in PrunedWeights(ckpt, layout, plan).iterate(odd)])
