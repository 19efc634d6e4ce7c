"""Expert-pruning criteria: AIMER and the calibration-free baselines it is compared with.

All of them score every routed expert of every MoE layer and feed the same uniform plan
(vllm_aimer.plan.make_plan: k experts per layer, group-balanced where the router needs
it), so every criterion writes the same plan files and any of them can be served with
`--model-loader-extra-config '{"plan": ...}'`.

- ``aimer`` (arXiv 2603.18492): mean(|w|) / sqrt(mean(w^2)) over the expert's
  concatenated gate, up and down weights; the HIGHEST scores are pruned.
- ``magnitude``: the expert's weight magnitude, the L2 (Frobenius) norm
  sqrt(sum w^2) of the same concatenated weights; the LOWEST norms are pruned (small
  weights, small contribution). The AIMER paper evaluates a calibration-free "Magnitude"
  baseline, but only its abstract and introduction were readable here (arXiv HTML v2
  and its mirrors, as stored), so its exact formula could not be checked; this is the
  standard magnitude criterion (Han et al., "Learning both Weights and Connections for
  Efficient Neural Networks", NeurIPS 2015, arXiv 1506.02626: weights of small
  magnitude are the least important), applied to an expert's weights as one group.
- ``random``: each expert gets u ~ U[0, 1) from
  ``numpy.random.default_rng([seed, layer]).random(num_experts)`` and the k highest are
  pruned: a uniformly random k-subset per layer (per group), the same for the same seed.
  This is the usual random-pruning control; as for Magnitude, the paper's own wording
  was not readable here.

A calibration-based ``frequency`` criterion (least-routed experts) is not offered: see
the README ("Baselines") for what vLLM 0.32 gives access to and why.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from vllm_aimer.checkpoint import Checkpoint
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout
from vllm_aimer.plan import Plan, make_plan
from vllm_aimer.scoring import ScoringResult, score_checkpoint

__all__ = ["CRITERIA", "DEFAULT_SEED", "check_criteria", "random_scores", "criterion_scores",
           "criterion_plan"]

CRITERIA: tuple[str, ...] = ("aimer", "magnitude", "random")
DEFAULT_SEED = 0


def check_criteria(names: str | Iterable[str]) -> list[str]:
    """Parse `aimer,magnitude,...` (or a list): known names, in order, without repeats.

    Args:
        names: comma-separated names, or an iterable of names (case and surrounding
            spaces ignored, empty items skipped).

    Returns:
        The names, lower-cased, first occurrence first.

    Raises:
        AimerError: a name is not in CRITERIA, or no name is left.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in CRITERIA:
            hint = (" `frequency` would count vLLM's router choices, which vLLM 0.32 returns "
                    "only from its Triton-based Model Runner V2 (see the README, Baselines)."
                    if name == "frequency" else "")
            raise AimerError(f"unknown criterion {raw.strip()!r}.{hint}",
                             f"use one or more of {', '.join(CRITERIA)} (comma-separated).")
        if name not in out:
            out.append(name)
    if not out:
        raise AimerError("no criterion was given.",
                         f"pass one or more of {', '.join(CRITERIA)}, e.g. --criteria aimer.")
    return out


def random_scores(layers: Iterable[int], num_experts: int, seed: int) -> dict[int, list[float]]:
    """Seeded U[0, 1) scores per layer; the stream depends on (seed, layer) only."""
    return {layer: [float(u) for u in np.random.default_rng([seed, layer]).random(num_experts)]
            for layer in layers}


def criterion_scores(criterion: str, ckpt: Checkpoint, layout: ExpertLayout,
                     seed: int = DEFAULT_SEED, scored: ScoringResult | None = None,
                     progress: bool = True) -> dict[int, list[float]]:
    """Per MoE layer, each expert's score under `criterion`. AIMER and magnitude come
    from one pass over the expert weights (pass `scored` to reuse one); random reads
    no weights.

    Args:
        criterion: one name of CRITERIA.
        ckpt: the checkpoint `layout` was built from.
        layout: its expert layout (built with scoring, unless `scored` is given or the
            criterion is random).
        seed: the random criterion's seed.
        scored: a `score_checkpoint` result to reuse instead of scoring again.
        progress: show a progress bar while scoring.

    Returns:
        {layer: one score per expert}: the layers `scored` covers (every MoE layer, MTP
        included, when scored here); the trunk MoE layers for random.

    Raises:
        AimerError: `criterion` is unknown.
        RuntimeError: scoring is needed but `layout` was built with scoring=False for
            an encoding no scorer decodes.
    """
    check_criteria([criterion])
    if criterion == "random":
        return random_scores(layout.layers, layout.num_experts, seed)
    if scored is None:
        scored = score_checkpoint(ckpt, layout, progress=progress)
    if criterion == "aimer":
        return scored.scores
    assert scored.magnitudes is not None
    return scored.magnitudes


def criterion_plan(criterion: str, ckpt: Checkpoint, layout: ExpertLayout, ratio: float,
                   seed: int = DEFAULT_SEED, scored: ScoringResult | None = None,
                   progress: bool = True) -> Plan:
    """The uniform plan that `criterion` gives at `ratio` (scores kept in the plan).

    Args:
        ratio: the share of routed experts to prune.
        criterion, ckpt, layout, seed, scored, progress: as for `criterion_scores`.

    Raises:
        AimerError: `criterion` is unknown, or `ratio` is outside [0, 1) or prunes a
            count the router does not allow.
    """
    scores = criterion_scores(criterion, ckpt, layout, seed, scored, progress)
    return make_plan(layout, scores, ratio, ckpt.fingerprint, criterion=criterion)
