"""vLLM glue: the `aimer` load format. Everything vLLM-specific lives here.

Before the model is built, the loader scores the checkpoint's routed experts
(or reads a plan), rewrites the config's expert count so vLLM allocates only
the kept experts, and then feeds vLLM a weight stream in which pruned experts
are never read, kept ones are renumbered and routers are sliced.

Where a deployment could make a pruned model answer wrongly, the load is refused
before any weight is read: uneven expert-parallel splits and kernel limits on the
kept count (see `constraints`), EPLB, weight-transfer backends that bypass the
model's `load_weights`, and ranks that disagree on the plan. A speculative-decoding
draft with its own checkpoint loads exactly as stock vLLM loads it; one that shares
the target's checkpoint (MTP) gets the target's plan. Later weight loads into the
pruned model (reload_weights, RL weight sync) are pruned with the same plan.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight

from vllm_aimer.channel import rank, write_error, write_report
from vllm_aimer.checkpoint import Checkpoint, open_checkpoint
from vllm_aimer.constraints import Deployment, Gpu, check_prune_count, prune_count
from vllm_aimer.errors import AimerError
from vllm_aimer.files import ensure_writable_dir
from vllm_aimer.layout import ExpertLayout, expert_layout
from vllm_aimer.metrics import publish
from vllm_aimer.options import AimerOptions, parse_options
from vllm_aimer.outputs import write_plan_outputs
from vllm_aimer.plan import Plan, conform, identity_plan, make_plan, with_mtp_layers
from vllm_aimer.plan_cache import cached_plan, default_cache_dir
from vllm_aimer.plan_formats import read_plan_file
from vllm_aimer.plugin import LOAD_FORMAT
from vllm_aimer.report import PruningReport, ReportSource
from vllm_aimer.scoring import ScoringResult, score_checkpoint, scoring_device
from vllm_aimer.units import human_bytes
from vllm_aimer.weights import LoadStats, PlanMap, PrunedWeights

__all__ = ["AimerModelLoader", "PlanDecision", "PlanSource", "TRACE_READS_ENV"]

logger = init_logger("vllm.aimer")

# Weight-transfer backends (RL weight sync) that hand every chunk to the model's
# `load_weights` (vllm/distributed/weight_transfer/{nccl,ipc}_engine.py), where the
# plan is applied; the others may write into parameters directly.
PLAN_AWARE_TRANSFER_BACKENDS = ("nccl", "ipc")
# A conservative reading speed for the start-up estimate: scoring read 1.1-2.3 GB/s
# from a cold page cache on a shared 2-core machine here (benchmarks/results/scoring.json).
ESTIMATE_BYTES_PER_S = 0.5e9
TRACE_READS_ENV = "AIMER_TRACE_READS"
"""Set to 1, the report lists every checkpoint tensor read (the tests' proof that no
pruned tensor was)."""

# Plans this process used, by checkpoint fingerprint: a draft model that shares the
# target's checkpoint (MTP) loads in the same worker right after the target, and must
# prune exactly what the target pruned.
_PLANS: dict[str, Plan] = {}

PlanSource = Literal[ReportSource, "target"]
"""Where a plan came from: scored now, the plan cache, the user's plan file (what the
report names), or the target model's plan (an MTP draft sharing its checkpoint, which
writes no report)."""


@dataclass(frozen=True)
class PlanDecision:
    """The outcome of deciding the plan."""
    plan: Plan
    source: PlanSource
    seconds: float
    """Time spent scoring experts for it (0 when nothing was scored)."""


class AimerModelLoader(DefaultModelLoader):
    """DefaultModelLoader reading safetensors, with AIMER pruning applied.

    `load_model` runs in named phases: open the checkpoint, decide the plan, rewrite
    the config, stream the pruned weights into the model vLLM builds, report.
    """

    def __init__(self, load_config: LoadConfig) -> None:
        """Raises AimerError (also recorded for the top process) on bad options."""
        try:
            self.options: AimerOptions = parse_options(load_config.model_loader_extra_config)
        except AimerError as e:
            write_error(str(e))
            raise
        self._stock_config = copy.copy(load_config)
        self._stock_config.load_format = "auto"
        self._stock_config.model_loader_extra_config = dict(self.options.parent)
        parent_config = copy.copy(self._stock_config)
        parent_config.load_format = "safetensors"
        super().__init__(parent_config)
        self._weights: PrunedWeights | None = None

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig,
                   prefix: str = "") -> nn.Module:
        """vLLM's entry point: the model, built with the kept expert count and loaded
        with the pruned weights.

        Raises:
            AimerError: a refused input or deployment, before any weight is read
                (also recorded, so that `vllm serve` ends with it).
        """
        if _is_separate_draft(vllm_config, model_config):
            # An EAGLE head or draft model of its own: not ours to prune.
            logger.info("vllm-aimer: draft model %s has its own checkpoint; loading it "
                        "unpruned, as stock vLLM does", model_config.model)
            return DefaultModelLoader(self._stock_config).load_model(
                vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        try:
            return self._load_model(vllm_config, model_config, prefix)
        except AimerError as e:
            write_error(str(e))
            raise

    def _load_model(self, vllm_config: VllmConfig, model_config: ModelConfig,
                    prefix: str) -> nn.Module:
        is_draft = model_config.runner_type == "draft"
        ckpt, layout = self._open_checkpoint(model_config)
        if self.options.plan is not None or self.options.prune_ratio:
            _refuse_unproven(vllm_config)
        plan_out = (ensure_writable_dir(self.options.plan_out, "plan_out")
                    if self.options.plan_out and not is_draft else None)
        decision = self._decide_plan(vllm_config, ckpt, layout, is_draft)
        plan = decision.plan
        self._rewrite_config(model_config, layout, plan)
        written = (write_plan_outputs(plan, plan_out, model=model_config.model) if plan_out
                   else [])
        model = self._stream(vllm_config, model_config, prefix, ckpt, layout, plan)
        if is_draft:
            logger.info("vllm-aimer: draft model (shares the target's checkpoint) pruned "
                        "with the target's plan %s", plan.plan_hash)
            return model
        self._report(model_config, model, layout, decision, written)
        return model

    # ----------------------------------------------------------------- phase 1: open

    def _open_checkpoint(self, model_config: ModelConfig) -> tuple[Checkpoint, ExpertLayout]:
        """The checkpoint's headers and where its experts are (no tensor is read)."""
        folder = model_config.model
        if not os.path.isdir(folder):  # a hub id: vLLM downloads it (safetensors) as usual
            folder, _, _, _ = self._prepare_weights(
                model_name_or_path=folder, subfolder=None, revision=model_config.revision,
                fall_back_to_pt=False, allow_patterns_overrides=None)
        ckpt = open_checkpoint(folder)
        # A plan file (or ratio 0) needs no scores: any encoding the stream can rename
        # or slice loads; scoring needs a decoder for every expert projection.
        needs_scores = self.options.plan is None and bool(self.options.prune_ratio)
        return ckpt, expert_layout(ckpt, scoring=needs_scores)

    # ----------------------------------------------------------------- phase 2: decide

    def _decide_plan(self, vllm_config: VllmConfig, ckpt: Checkpoint, layout: ExpertLayout,
                     is_draft: bool) -> PlanDecision:
        """The plan every rank applies: the target's (an MTP draft), the plan file's,
        ratio 0's identity, or AIMER's at the ratio (from the cache or scored now).
        A kept count the deployment cannot serve is refused before any weight is read."""
        deployment = _deployment(vllm_config)
        if is_draft and ckpt.fingerprint in _PLANS:
            decision = PlanDecision(_PLANS[ckpt.fingerprint], "target", 0.0)
        elif self.options.plan is not None:
            decision = self._plan_from_file(self.options.plan, ckpt, layout, deployment)
        else:
            decision = self._plan_from_ratio(self.options.prune_ratio or 0.0, ckpt, layout,
                                             deployment)
        _check_ranks_agree(decision.plan)
        _PLANS[ckpt.fingerprint] = decision.plan
        return decision

    def _plan_from_file(self, path: str, ckpt: Checkpoint, layout: ExpertLayout,
                        deployment: Deployment) -> PlanDecision:
        # Any known plan format; prune_ratio only with vllm-ascend's ordered lists.
        plan = read_plan_file(path, layout, ckpt, self.options.prune_ratio)
        check_prune_count(plan.router, plan.pruned_per_layer, f"plan {path}", deployment)
        if not (layout.mtp_layers and not plan.mtp_layers and plan.total_pruned):
            return PlanDecision(plan, "plan_file", 0.0)
        # The authors' format never names MTP layers: choose theirs by AIMER.
        if not layout.scorable:
            raise AimerError(
                f"plan {path} does not name the checkpoint's MTP layers "
                f"{list(layout.mtp_layers)}, and AIMER cannot score them in this format "
                f"({layout.unscorable}).",
                "add the MTP layers' pruned ids to the plan (same count as the other "
                "layers).")
        result = self._score(ckpt, layout, layout.mtp_layers)
        return PlanDecision(with_mtp_layers(plan, layout, result.scores), "plan_file",
                            result.seconds)

    def _plan_from_ratio(self, ratio: float, ckpt: Checkpoint, layout: ExpertLayout,
                         deployment: Deployment) -> PlanDecision:
        if ratio == 0.0:
            return PlanDecision(identity_plan(layout, ckpt.fingerprint), "score", 0.0)
        # Fails on a ratio the router, EP split or kernels cannot take, before any
        # weight is read.
        prune_count(len(layout.layers), layout.router, ratio, deployment)
        scored: list[ScoringResult] = []  # filled when the cache (or no cache) scores

        def score() -> Plan:
            result = self._score(ckpt, layout, layout.all_layers)
            scored.append(result)
            return make_plan(layout, result.scores, ratio, ckpt.fingerprint)

        def scored_now(plan: Plan) -> PlanDecision:
            return PlanDecision(plan, "score", sum(r.seconds for r in scored))

        cache = self.options.plan_cache
        if cache is False:
            return scored_now(score())
        cache_dir = default_cache_dir() if cache is True else Path(cache)
        try:
            plan, hit = cached_plan(cache_dir, ckpt.fingerprint, ratio, score)
        except OSError as e:  # e.g. a read-only home: pruning must not depend on the cache
            logger.warning("vllm-aimer: plan cache %s unusable (%s); scoring without it",
                           cache_dir, e)
            return scored_now(score())
        if not hit:
            return scored_now(plan)
        # Written by another version or rank: check it as strictly as a plan file,
        # this deployment's rules (EP split, GPU kernels) included.
        where = f"cached plan in {cache_dir}"
        plan = conform(plan, layout, where)
        check_prune_count(plan.router, plan.pruned_per_layer, where, deployment)
        return PlanDecision(plan, "cache", 0.0)

    def _score(self, ckpt: Checkpoint, layout: ExpertLayout,
               layers: tuple[int, ...]) -> ScoringResult:
        """Score `layers`, before vLLM allocates the model: on this worker's GPU when it
        has one (scoring_device auto), else on the CPU's threads."""
        _log_estimate(layout, layers, ckpt)
        device, why = scoring_device(self.options.scoring_device)
        if device == "cpu":
            logger.info("vllm-aimer: scoring on the CPU (GPU scoring skipped: %s)", why)
        result = score_checkpoint(ckpt, layout, layers=layers, device=device)
        logger.info("vllm-aimer: scored %s of expert weights in %.2f s (%s/s, %s)",
                    human_bytes(result.bytes_read), result.seconds,
                    human_bytes(result.bytes_per_second), result.where())
        return result

    # ----------------------------------------------------------------- phase 3: config

    def _rewrite_config(self, model_config: ModelConfig, layout: ExpertLayout,
                        plan: Plan) -> None:
        """Make vLLM build every MoE layer with the kept expert count (nothing to do when
        nothing is pruned)."""
        if plan.total_pruned:
            _set_expert_count(model_config, layout, plan.kept_per_layer)

    # ----------------------------------------------------------------- phase 4: stream

    def _stream(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str,
                ckpt: Checkpoint, layout: ExpertLayout, plan: Plan) -> nn.Module:
        """vLLM builds the model and loads it through `get_all_weights`, which yields the
        pruned stream; later weight loads into the model are pruned with the same plan."""
        self._weights = PrunedWeights(ckpt, layout, plan) if plan.total_pruned else None
        model = super().load_model(vllm_config=vllm_config, model_config=model_config,
                                   prefix=prefix)
        if plan.total_pruned:
            _prune_later_loads(model, PlanMap(layout, plan))
        return model

    def get_all_weights(self, model_config: ModelConfig,
                        model: nn.Module) -> Generator[tuple[str, torch.Tensor], None, None]:
        """The weights vLLM loads: the pruned stream (pruned experts never read, kept
        ones renumbered, routers sliced, vLLM's EP filter applied in the new numbering),
        or vLLM's own stream when nothing is pruned."""
        if self._weights is None:
            # Nothing pruned, or a fresh loader reloading weights into a pruned model:
            # that model's load_weights applies its plan (see _prune_later_loads).
            yield from super().get_all_weights(model_config=model_config, model=model)
            return
        local = self.local_expert_ids
        skip = (lambda name: should_skip_weight(name, local)) if local is not None else None
        if self.counter_before_loading_weights == 0.0:
            self.counter_before_loading_weights = time.perf_counter()
        threads = self._load_threads()
        if threads > 1:
            logger.info("vllm-aimer: reading the pruned checkpoint with %d threads "
                        "(enable_multithread_load)", threads)
        yield from self._weights.iterate(skip, threads=threads)
        for source in getattr(model, "secondary_weights", ()):
            yield from self._get_weights_iterator(source=source)

    def _load_threads(self) -> int:
        """Reader threads for the pruned stream: vLLM's enable_multithread_load and
        num_threads, as its DefaultModelLoader applies them (default 8 threads)."""
        parent = self.options.parent
        if not parent.get("enable_multithread_load"):
            return 1
        return int(parent.get("num_threads") or self.DEFAULT_NUM_THREADS)

    # ----------------------------------------------------------------- phase 5: report

    def _report(self, model_config: ModelConfig, model: nn.Module, layout: ExpertLayout,
                decision: PlanDecision, written: list[Path]) -> PruningReport:
        """What was done, for the log and for /metrics (through the channel)."""
        plan = decision.plan
        stats = self._weights.stats if self._weights is not None else None
        report = PruningReport(
            model_name=model_config.served_model_name or model_config.model,
            family=layout.arch.family, checkpoint=plan.checkpoint, plan_hash=plan.plan_hash,
            ratio=plan.ratio, source=decision.source, top_k=layout.top_k,
            layers=list(layout.layers), experts_before=layout.num_experts,
            experts_after=plan.kept_per_layer, experts_pruned=plan.total_pruned,
            **_expert_bytes(layout, stats), scoring_seconds=decision.seconds,
            expert_rows=_expert_rows(model), plan_files=[str(p) for p in written],
            criterion=plan.criterion)
        write_report(report)
        if rank() == 0:
            publish(report)
        logger.info("%s", report.summary())
        return report


def _expert_bytes(layout: ExpertLayout, stats: LoadStats | None) -> dict:
    """The report's byte counts and (AIMER_TRACE_READS=1) the tensors read."""
    if stats is None:  # nothing pruned: vLLM's own loader read every expert
        loaded = sum(sum(layout.expert_bytes[layer]) for layer in layout.layers)
        return {"expert_bytes_loaded": loaded, "expert_bytes_skipped": 0, "tensors_read": None}
    reads = sorted(stats.tensors_read) if os.environ.get(TRACE_READS_ENV) == "1" else None
    return {"expert_bytes_loaded": stats.expert_bytes_loaded,
            "expert_bytes_skipped": stats.expert_bytes_skipped, "tensors_read": reads}


def _is_separate_draft(vllm_config: VllmConfig, model_config: ModelConfig) -> bool:
    """A speculative-decoding draft whose weights are not the target's checkpoint."""
    if model_config.runner_type != "draft":
        return False
    spec = vllm_config.speculative_config
    target = spec.target_model_config if spec is not None else None
    if target is None:
        return True
    return not _same_checkpoint(model_config.model, target.model)


def _same_checkpoint(a: str, b: str) -> bool:
    return a == b or (os.path.isdir(a) and os.path.isdir(b)
                      and os.path.realpath(a) == os.path.realpath(b))


def _deployment(vllm_config: VllmConfig) -> Deployment:
    from vllm.platforms import current_platform

    parallel = vllm_config.parallel_config
    # The EP group is DP x PCP x TP, as in vLLM's FusedMoEParallelConfig.
    ep_size = (parallel.data_parallel_size * parallel.prefill_context_parallel_size
               * parallel.tensor_parallel_size) if parallel.enable_expert_parallel else 1
    blackwell = current_platform.is_cuda() and current_platform.is_device_capability_family(100)
    return Deployment(ep_size=ep_size, gpu=Gpu.BLACKWELL if blackwell else Gpu.ANY)


def _refuse_unproven(vllm_config: VllmConfig) -> None:
    """Refuse, before anything is read, what a pruned model cannot be proven to serve
    correctly (the kept count itself is checked against `_deployment` in _decide_plan)."""
    parallel = vllm_config.parallel_config
    if parallel.enable_eplb:
        raise AimerError(
            "--enable-eplb with a pruned model is not supported: EPLB moves and replicates "
            "experts at run time, which vllm-aimer has not been able to verify with a "
            "pruned expert set (it needs NVIDIA GPUs).",
            "serve the pruned model without --enable-eplb (expert parallelism alone works "
            "with a kept count that splits evenly), or serve without pruning.")
    transfer = vllm_config.weight_transfer_config
    if transfer is not None and transfer.backend not in PLAN_AWARE_TRANSFER_BACKENDS:
        raise AimerError(
            f"weight transfer backend {transfer.backend!r} may write trainer weights straight "
            "into the pruned model's parameters, bypassing its plan.",
            f"use backend {' or '.join(map(repr, PLAN_AWARE_TRANSFER_BACKENDS))} (their "
            "weights are pruned with the same plan), or serve without pruning.")
    spec = vllm_config.speculative_config
    draft_config = spec.draft_load_config if spec is not None else None
    if (draft_config is not None and draft_config.load_format != LOAD_FORMAT
            and spec.draft_model_config is not None
            and _same_checkpoint(spec.draft_model_config.model, vllm_config.model_config.model)):
        raise AimerError(
            f"the MTP draft shares the pruned target's checkpoint but is loaded with "
            f"load format {draft_config.load_format!r}: it would be built with the pruned "
            "expert count and fed every expert.",
            "leave the draft's load config unset (it then uses --load-format aimer and the "
            "target's plan).")


def _check_ranks_agree(plan: Plan) -> None:
    """All ranks must prune the same experts: a TP rank holding a shard of another
    expert set would silently mix experts. Ranks that share no plan cache score on
    their own, where float rounding may order near-ties differently."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from vllm.distributed.parallel_state import get_world_group

    group = get_world_group()
    if group.world_size <= 1:
        return
    hashes: list[str | None] = [None] * group.world_size
    dist.all_gather_object(hashes, plan.plan_hash, group=group.cpu_group)
    if len(set(hashes)) > 1:
        by_rank = ", ".join(f"rank {r}: {h}" for r, h in enumerate(hashes))
        raise AimerError(
            f"ranks chose different experts to prune ({by_rank}); serving would mix "
            "experts across ranks.",
            "score once (`vllm-aimer score MODEL --ratio R --output DIR`) and pass "
            '{"plan": "DIR"} to every rank, or point plan_cache at a directory all ranks '
            "share.")


def _log_estimate(layout: ExpertLayout, layers: Iterable[int], ckpt: Checkpoint) -> None:
    """Scoring runs inside engine start-up, which vLLM's API server bounds."""
    from vllm import envs

    scored = sum(t.nbytes for layer in layers for st in layout.scored[layer]
                 for t in st.scorer.reads)
    seconds = (scored + ckpt.total_bytes) / ESTIMATE_BYTES_PER_S
    timeout = envs.VLLM_ENGINE_READY_TIMEOUT_S
    logger.info("vllm-aimer: scoring %s of expert weights before loading %s; start-up "
                "estimate %.0f s at %s/s (the API server waits "
                "VLLM_ENGINE_READY_TIMEOUT_S=%d s)", human_bytes(scored),
                human_bytes(ckpt.total_bytes), seconds, human_bytes(ESTIMATE_BYTES_PER_S),
                timeout)
    if seconds > 0.5 * timeout:
        logger.warning(
            "vllm-aimer: scoring and loading may take about %.0f s, close to or over "
            "VLLM_ENGINE_READY_TIMEOUT_S=%d s. Raise VLLM_ENGINE_READY_TIMEOUT_S (the Helm "
            "chart sets it from its startup probe), or score once offline with `vllm-aimer "
            "score` and pass plan.", seconds, timeout)


class _PlannedLoadWeights:
    """A pruned model's `load_weights`: weights in the checkpoint's numbering, from a
    reload or an RL weight sync, pass through the plan the model was built with."""

    def __init__(self, load_weights, plan_map: PlanMap) -> None:
        self.load_weights = load_weights
        self.plan_map = plan_map

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]], *args, **kwargs):
        return self.load_weights(self.plan_map.apply(weights), *args, **kwargs)


def _prune_later_loads(model: nn.Module, plan_map: PlanMap) -> None:
    # An instance attribute shadows the class's method for every later caller.
    model.load_weights = _PlannedLoadWeights(model.load_weights, plan_map)


def _set_expert_count(model_config: ModelConfig, layout: ExpertLayout, kept: int) -> None:
    """Make vLLM build layers with `kept` experts: every alias, then its cached view."""
    configs = {id(c): c for c in (model_config.hf_config, model_config.hf_text_config)}
    for cfg in configs.values():
        for key in layout.arch.expert_count_keys:
            setattr(cfg, key, kept)
    model_config.model_arch_config = model_config.get_model_arch_config()
    if model_config.get_num_experts() != kept:
        raise RuntimeError(f"vLLM still sees {model_config.get_num_experts()} experts after "
                           f"setting {kept}; this vLLM version is not supported by vllm-aimer.")


def _expert_rows(model: nn.Module) -> list[int]:
    """Leading dimension (local experts) of each MoE layer's fused expert weights."""
    return [int(p.shape[0]) for name, p in model.named_parameters()
            if name.endswith("experts.w13_weight")]
