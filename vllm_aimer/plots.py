"""PNG plots: the eval sweep (perplexity against ratio) and per-layer expert-score heatmaps.

matplotlib's object API with the Agg canvas: no display, no pyplot state, safe in any
process.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_aimer.errors import AimerError
from vllm_aimer.files import atomic_write_bytes
from vllm_aimer.plan import PRUNES_LOWEST, Plan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vllm_aimer.evaluate import EvalReport

__all__ = ["ScorePanel", "save_png", "eval_figure", "panel_from_plan", "read_scores_csv",
           "ranked_rescaled", "scores_figure"]


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: "Figure", path: Path, dpi: int = 120) -> Path:
    """Write `fig` to `path` as a PNG, atomically: a reader never sees half a PNG.

    Args:
        fig: the figure (from `eval_figure` or `scores_figure`).
        path: the PNG file; its directory must exist.
        dpi: dots per inch.

    Returns:
        `path`.

    Raises:
        OSError: the file cannot be written (the temporary file is removed).
    """
    png = io.BytesIO()
    fig.savefig(png, dpi=dpi, format="png")
    atomic_write_bytes(path, png.getvalue())
    return path


def eval_figure(report: "EvalReport") -> "Figure":
    """Perplexity against prune ratio: one line per criterion (starting at the dense
    point), the dense model as a dashed reference line; a log scale when the
    perplexities span more than 20x. Imports matplotlib."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    dense = next((r for r in report.runs if r.criterion == "dense"), None)
    criteria = [c for c in dict.fromkeys(r.criterion for r in report.runs) if c != "dense"]
    markers = "osD^v<>"
    for i, name in enumerate(criteria):
        runs = sorted((r for r in report.runs if r.criterion == name), key=lambda r: r.ratio)
        xs = ([0.0] if dense else []) + [r.ratio for r in runs]
        ys = ([dense.perplexity] if dense else []) + [r.perplexity for r in runs]
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=name)
    if dense is not None:
        ax.axhline(dense.perplexity, linestyle="--", color="0.45", linewidth=1,
                   label=f"dense ({dense.perplexity:.3g})")
    values = [r.perplexity for r in report.runs]
    if values and max(values) / max(min(values), 1e-12) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("prune ratio (share of routed experts removed)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"{Path(report.model).name}: {report.documents} documents, "
                 f"{report.runs[0].tokens if report.runs else 0} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


@dataclass(frozen=True)
class ScorePanel:
    """One criterion's scores: per MoE layer, each expert's score and the pruned ids."""
    criterion: str
    layers: list[int]
    scores: list[list[float]]
    pruned: list[set[int]]

    @property
    def prunes_lowest(self) -> bool:
        """Whether the criterion prunes its lowest scores (plan.PRUNES_LOWEST)."""
        return self.criterion in PRUNES_LOWEST


def panel_from_plan(plan: Plan) -> ScorePanel:
    """The scores and pruned experts a plan carries, per MoE layer.

    Raises:
        ValueError: a layer of the plan carries no scores.
    """
    layers = plan.layer_ids
    if any(plan.layer(l).scores is None for l in layers):
        raise ValueError("this plan carries no scores")
    return ScorePanel(plan.criterion, layers, [list(plan.layer(l).scores or []) for l in layers],
                      [set(plan.layer(l).pruned) for l in layers])


def read_scores_csv(path: str | Path) -> ScorePanel:
    """A scores.csv written by `vllm-aimer score` (layer,expert_id,<criterion>_score,...).

    Raises:
        AimerError: the file cannot be read, or lacks the columns layer, expert_id,
            is_pruned and one ending in `_score`, or has no rows.
    """
    p = Path(path)
    try:
        rows = list(csv.DictReader(p.read_text().splitlines()))
    except OSError as e:
        raise AimerError(f"scores file {str(path)!r} cannot be read ({e.strerror or e}).",
                         "pass a scores.csv written by `vllm-aimer score`.") from None
    header = rows[0].keys() if rows else []
    score_col = next((c for c in header if c.endswith("_score")), None)
    if not rows or score_col is None or not {"layer", "expert_id", "is_pruned"} <= set(header):
        raise AimerError(f"{str(path)!r} is not a scores.csv (layer,expert_id,<criterion>_score,"
                         "rank_in_layer,is_pruned).",
                         "pass a scores.csv written by `vllm-aimer score`.")
    table: dict[int, dict[int, tuple[float, bool]]] = {}
    for r in rows:
        table.setdefault(int(r["layer"]), {})[int(r["expert_id"])] = (
            float(r[score_col]), r["is_pruned"] == "True")
    layers = sorted(table)
    return ScorePanel(score_col.removesuffix("_score"), layers,
                      [[table[l][e][0] for e in sorted(table[l])] for l in layers],
                      [{e for e, (_, p) in table[l].items() if p} for l in layers])


def ranked_rescaled(scores: Sequence[float]) -> tuple[list[int], list[float]]:
    """Expert ids from highest to lowest score (ties: lower id first) and their scores
    min-max rescaled to [0, 1] within the layer (all 0 when every score is equal)."""
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    lo, hi = min(scores), max(scores)
    span = hi - lo
    return order, [(scores[e] - lo) / span if span > 0 else 0.0 for e in order]


def scores_figure(panels: Sequence[ScorePanel]) -> "Figure":
    """Side by side, one heatmap per criterion in the style of the AIMER paper's Figure 2:
    a row per MoE layer, experts ranked by score (highest left), colour = score min-max
    rescaled within the layer, pruned experts marked with a cross. Imports matplotlib.

    Raises:
        ValueError: `panels` is empty.
    """
    if not panels:
        raise ValueError("nothing to plot")
    layers = len(panels[0].layers)
    fig = _figure(4.2 * len(panels) + 0.8, 1.2 + 0.28 * max(layers, 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, panel in zip(axes, panels):
        grid, xs, ys = [], [], []
        for row, (scores, pruned) in enumerate(zip(panel.scores, panel.pruned)):
            order, values = ranked_rescaled(scores)
            grid.append(values)
            for rank, e in enumerate(order):
                if e in pruned:
                    xs.append(rank)
                    ys.append(row)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        ax.scatter(xs, ys, marker="x", s=18, linewidths=1.0, color="white",
                   label="pruned")
        end = "lowest" if panel.prunes_lowest else "highest"
        ax.set_title(f"{panel.criterion}: {len(xs)} pruned (x, the {end})", fontsize=10)
        ax.set_xlabel("experts ranked by score (high → low)")
        ax.set_ylabel("MoE layer")
        ticks = list(range(0, layers, max(1, layers // 8)))
        ax.set_yticks(ticks, [str(panel.layers[t]) for t in ticks])
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="score, min-max per layer",
                     shrink=0.9)
    return fig
