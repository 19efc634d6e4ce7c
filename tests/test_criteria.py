"""The baseline criteria give the plans their definitions give.

Expected plans come from numpy computations written here from the definitions
(magnitude: the L2 norm of an expert's concatenated gate/up/down weights, lowest
pruned; random: U[0,1) draws of numpy.random.default_rng([seed, layer]), highest
pruned), never from vllm_aimer.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess

import numpy as np
import pytest

from tests.helpers.reference import expert_vectors, load_tensors, reference_k, reference_pruned
from tests.test_cli import console_script
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.criteria import CRITERIA, check_criteria, criterion_plan
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import expert_layout
from vllm_aimer.plan import read_plan


def numpy_norms(model) -> dict[int, list[float]]:
    vectors = expert_vectors(load_tensors(model))
    layers = sorted({l for l, _ in vectors})
    experts = sorted({e for _, e in vectors})
    return {l: [float(np.sqrt(np.sum(vectors[(l, e)] ** 2))) for e in experts] for l in layers}


def lowest_k(scores: dict[int, list[float]], k: int, groups: int = 1) -> dict[int, list[int]]:
    """Per layer (and per contiguous group) the k lowest scores, ties to the lower id."""
    out = {}
    for layer, s in scores.items():
        size = len(s) // groups
        pruned: list[int] = []
        for g in range(groups):
            ids = np.arange(g * size, (g + 1) * size)
            arr = np.asarray(s)[ids]
            pruned += [int(ids[i]) for i in np.lexsort((ids, arr))[:k // groups]]
        out[layer] = sorted(pruned)
    return out


def numpy_random(layers, experts: int, seed: int) -> dict[int, list[float]]:
    return {l: list(np.random.default_rng([seed, l]).random(experts)) for l in layers}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe")
    ckpt = open_checkpoint(model)
    return model, ckpt, expert_layout(ckpt)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_magnitude_prunes_the_smallest_l2_norms(tiny, ratio):
    model, ckpt, layout = tiny
    plan = criterion_plan("magnitude", ckpt, layout, ratio, progress=False)
    norms = numpy_norms(model)
    k = reference_k(4, 16, ratio)
    assert plan.pruned_experts() == {str(l): v for l, v in lowest_k(norms, k).items()}
    assert plan.criterion == "magnitude"
    for layer in plan.layer_ids:
        np.testing.assert_allclose(plan.layer(layer).scores, norms[layer], rtol=1e-6)


def test_magnitude_and_aimer_disagree_here(tiny):
    """Sharpness: on this checkpoint the two criteria pick different experts, so the test
    above could not pass by selecting AIMER's plan."""
    _, ckpt, layout = tiny
    a = criterion_plan("aimer", ckpt, layout, 0.5, progress=False).pruned_experts()
    m = criterion_plan("magnitude", ckpt, layout, 0.5, progress=False).pruned_experts()
    assert a != m


@pytest.mark.parametrize("seed", [0, 7])
def test_random_is_the_seeded_uniform_draw(tiny, seed):
    _, ckpt, layout = tiny
    plan = criterion_plan("random", ckpt, layout, 0.5, seed=seed)
    draws = numpy_random(range(4), 16, seed)
    assert plan.pruned_experts() == {str(l): v for l, v in reference_pruned(draws, k=8).items()}
    assert all(plan.layer(l).scores == draws[l] for l in range(4))


def test_random_depends_on_the_seed_and_layer(tiny):
    _, ckpt, layout = tiny
    a = criterion_plan("random", ckpt, layout, 0.5, seed=0).pruned_experts()
    b = criterion_plan("random", ckpt, layout, 0.5, seed=1).pruned_experts()
    assert a != b
    assert len({tuple(v) for v in a.values()}) > 1  # layers are not all pruned alike
    assert a == criterion_plan("random", ckpt, layout, 0.5, seed=0).pruned_experts()


def test_group_limited_router_balances_every_criterion(tiny_checkpoint):
    """DeepSeek-V3 style router (4 groups of 4): each group loses the same count."""
    model = tiny_checkpoint("deepseek_v3")
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    plan = criterion_plan("magnitude", ckpt, layout, 0.5, progress=False)
    norms = numpy_norms(model)
    assert plan.pruned_experts() == {str(l): v for l, v in lowest_k(norms, 8, 4).items()}
    rand = criterion_plan("random", ckpt, layout, 0.5, seed=3)
    for layer, ids in rand.pruned_experts().items():
        assert [sum(1 for e in ids if e // 4 == g) for g in range(4)] == [2, 2, 2, 2]


def test_every_criterion_plan_reads_back_as_a_servable_plan(tiny, tmp_path):
    """The loader serves any criterion's plan.json through `plan` (read_plan checks it)."""
    from vllm_aimer.outputs import write_plan_outputs

    _, ckpt, layout = tiny
    for name in CRITERIA:
        plan = criterion_plan(name, ckpt, layout, 0.25, progress=False)
        d = tmp_path / name
        d.mkdir()
        write_plan_outputs(plan, d)
        back = read_plan(d / "plan.json", layout, ckpt.fingerprint)
        assert back.pruned_experts() == plan.pruned_experts()
        assert back.criterion == name
        authors = read_plan(d / "pruned_experts.json", layout, ckpt.fingerprint)
        assert authors.pruned_experts() == plan.pruned_experts()


def test_check_criteria():
    assert check_criteria("aimer, magnitude,aimer") == ["aimer", "magnitude"]
    with pytest.raises(AimerError, match="unknown criterion 'frequency'.*Fix: use one or more"):
        check_criteria("aimer,frequency")
    with pytest.raises(AimerError, match="no criterion"):
        check_criteria(" , ")


def test_score_cli_criteria_and_plot(tiny, tmp_path):
    model, _, _ = tiny
    env = dict(os.environ, TQDM_DISABLE="1")
    procs = {c: subprocess.Popen([*console_script(), "score", str(model), "--ratio", "0.5",
                                  "--criterion", c, "--output", str(tmp_path / c), "--plot",
                                  "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for c in CRITERIA}
    bad = subprocess.run([*console_script(), "score", str(model), "--ratio", "0.5",
                          "--criterion", "frequency", "--output", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Fix: use one or more of aimer, magnitude, random" in bad.stderr
    assert not (tmp_path / "bad").exists()
    norms = numpy_norms(model)
    for c, p in procs.items():
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        d = tmp_path / c
        assert sorted(f.name for f in d.iterdir()) == ["plan.json", "pruned_experts.json",
                                                      "scores.csv", "scores.png",
                                                      "vllm_profile.json"]
        assert (d / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = list(csv.DictReader(io.StringIO((d / "scores.csv").read_text())))
        assert list(rows[0]) == ["layer", "expert_id", f"{c}_score", "rank_in_layer", "is_pruned"]
        pruned = json.loads((d / "pruned_experts.json").read_text())
        for layer in range(4):
            mine = [r for r in rows if int(r["layer"]) == layer]
            # rank 0 is the first to prune: all pruned ones hold the 8 first ranks.
            assert sorted(int(r["rank_in_layer"]) for r in mine if r["is_pruned"] == "True") \
                == list(range(8))
            assert [int(r["expert_id"]) for r in mine if r["is_pruned"] == "True"] \
                == pruned[str(layer)]
        if c == "magnitude":
            assert pruned == {str(l): v for l, v in lowest_k(norms, 8).items()}
