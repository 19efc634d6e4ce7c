"""The plots are valid PNGs holding the expected series, drawn from the right numbers."""

from __future__ import annotations

import os
import subprocess

import numpy as np
from PIL import Image

from tests.test_cli import console_script
from vllm_aimer.evaluate import EvalReport, EvalRun
from vllm_aimer.plots import (ScorePanel, eval_figure, read_scores_csv, save_png,
                              scores_figure)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def valid_png(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def run(criterion: str, ratio: float, ppl: float) -> EvalRun:
    return EvalRun(criterion=criterion, ratio=ratio, experts_per_layer=[16, 16 - int(16 * ratio)],
                   tokens=100, nll_mean=float(np.log(ppl)), perplexity=ppl,
                   top1_agreement_vs_dense=1.0 if ratio == 0 else 0.5, weight_bytes=1000,
                   tokens_per_s=10.0)


def sweep() -> EvalReport:
    runs = [run("dense", 0.0, 10.0)]
    for i, c in enumerate(["aimer", "magnitude", "random"]):
        runs += [run(c, 0.25, 11.0 + i), run(c, 0.5, 13.0 + 2 * i)]
    return EvalReport(model="/m/demo", data="/d.txt", documents=3, runs=runs)


def test_eval_figure_has_one_line_per_criterion_and_a_dense_line(tmp_path):
    fig = eval_figure(sweep())
    [ax] = fig.axes
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["aimer", "magnitude", "random", "dense (10)"]
    by = {line.get_label(): line for line in ax.lines}
    # Each criterion's line starts at the dense point and follows its runs.
    assert list(by["magnitude"].get_xdata()) == [0.0, 0.25, 0.5]
    assert list(by["magnitude"].get_ydata()) == [10.0, 12.0, 15.0]
    assert list(by["dense (10)"].get_ydata()) == [10.0, 10.0]
    w, h = valid_png(save_png(fig, tmp_path / "eval.png"))
    assert w > 300 and h > 200


def panel(criterion: str, scores: list[list[float]], k: int, lowest: bool) -> ScorePanel:
    pruned = []
    for s in scores:
        order = np.argsort(np.asarray(s) if lowest else -np.asarray(s), kind="stable")
        pruned.append({int(e) for e in order[:k]})
    return ScorePanel(criterion, list(range(len(scores))), scores, pruned)


def test_scores_figure_ranks_rescales_and_marks_pruned(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.random((3, 8)).tolist()
    m = (rng.random((3, 8)) * 5 + 1).tolist()
    fig = scores_figure([panel("aimer", a, 2, False), panel("magnitude", m, 3, True)])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2  # the colour bar is the third axes
    for ax, scores, k, lowest in ((panels[0], a, 2, False), (panels[1], m, 3, True)):
        [image] = ax.images
        grid = np.asarray(image.get_array())
        assert grid.shape == (3, 8)
        for row, s in zip(grid, scores):
            # Ranked high to low, min-max rescaled within the layer.
            want = np.sort((np.asarray(s) - min(s)) / (max(s) - min(s)))[::-1]
            np.testing.assert_allclose(row, want)
        [marks] = ax.collections
        xy = np.asarray(marks.get_offsets())
        assert len(xy) == 3 * k
        # AIMER prunes the highest (left), magnitude the lowest (right end).
        ranks = sorted(set(xy[:, 0].astype(int)))
        assert ranks == (list(range(8 - k, 8)) if lowest else list(range(k)))
    valid_png(save_png(fig, tmp_path / "scores.png"))


def test_plot_command_draws_scores_csv_and_eval_json(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3_moe")
    env = dict(os.environ, TQDM_DISABLE="1")
    for c in ("aimer", "magnitude"):
        subprocess.run([*console_script(), "score", str(model), "--ratio", "0.25", "--criterion",
                        c, "--output", str(tmp_path / c), "--quiet"], check=True, env=env,
                       capture_output=True)
    csvs = [str(tmp_path / c / "scores.csv") for c in ("aimer", "magnitude")]
    r = subprocess.run([*console_script(), "plot", *csvs, "--output", str(tmp_path / "s.png")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    valid_png(tmp_path / "s.png")
    panels = [read_scores_csv(p) for p in csvs]
    assert [p.criterion for p in panels] == ["aimer", "magnitude"]
    assert all(len(s) == 4 for s in panels[0].pruned) and len(panels[0].scores) == 4
    (tmp_path / "eval.json").write_text(sweep().model_dump_json())
    r = subprocess.run([*console_script(), "plot", str(tmp_path / "eval.json")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    valid_png(tmp_path / "eval.png")
    r = subprocess.run([*console_script(), "plot", str(tmp_path / "nope.csv")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Fix: pass a scores.csv" in r.stderr
