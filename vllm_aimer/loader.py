"""vLLM glue: the `aimer` load format. Everything vLLM-specific lives here.

Before the model is built, the loader scores the checkpoint's routed experts
(or reads a plan), rewrites the config's expert count so vLLM allocates only
the kept experts, and then feeds vLLM a weight stream in which pruned experts
are never read, kept ones are renumbered and routers are sliced.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Generator
from pathlib import Path

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight

from vllm_aimer.checkpoint import Checkpoint, open_checkpoint
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout, expert_layout
from vllm_aimer.metrics import publish
from vllm_aimer.options import AimerOptions, parse_options
from vllm_aimer.outputs import ensure_writable_dir, write_plan_outputs
from vllm_aimer.plan import (Plan, check_expert_parallel, identity_plan, make_plan,
                              prune_count, read_plan)
from vllm_aimer.plan_cache import cached_plan, default_cache_dir
from vllm_aimer.report import PruningReport, rank as _rank, write_error, write_report
from vllm_aimer.scoring import score_checkpoint
from vllm_aimer.weights import PrunedWeights

logger = init_logger("vllm.aimer")

LOAD_FORMAT = "aimer"


class AimerModelLoader(DefaultModelLoader):
    """DefaultModelLoader reading safetensors, with AIMER pruning applied."""

    def __init__(self, load_config: LoadConfig) -> None:
        try:
            self.options: AimerOptions = parse_options(load_config.model_loader_extra_config)
        except AimerError as e:
            write_error(str(e))
            raise
        parent_config = copy.copy(load_config)
        parent_config.load_format = "safetensors"
        parent_config.model_loader_extra_config = dict(self.options.parent)
        super().__init__(parent_config)
        self._weights: PrunedWeights | None = None

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig,
                   prefix: str = "") -> nn.Module:
        try:
            return self._load_model(vllm_config, model_config, prefix)
        except AimerError as e:
            write_error(str(e))
            raise

    def _load_model(self, vllm_config: VllmConfig, model_config: ModelConfig,
                    prefix: str) -> nn.Module:
        folder = model_config.model
        if not os.path.isdir(folder):  # a hub id: vLLM downloads it (safetensors) as usual
            folder, _, _, _ = self._prepare_weights(folder, None, model_config.revision,
                                                    False, None)
        ckpt = open_checkpoint(folder)
        # A plan file (or ratio 0) needs no scores: any encoding the stream can rename
        # or slice loads; scoring needs a decoder for every expert projection.
        needs_scores = self.options.plan is None and bool(self.options.prune_ratio)
        layout = expert_layout(ckpt, scoring=needs_scores)
        plan_out = (ensure_writable_dir(self.options.plan_out, "plan_out")
                    if self.options.plan_out else None)
        plan, source, seconds = self._make_plan(ckpt, layout)
        _check_expert_parallel(vllm_config, plan)
        if plan.total_pruned:
            _set_expert_count(model_config, layout, plan.kept_per_layer)
            self._weights = PrunedWeights(ckpt, layout, plan)
        written = write_plan_outputs(plan, plan_out) if plan_out else []

        model = super().load_model(vllm_config, model_config, prefix)

        report = PruningReport.build(
            model_name=model_config.served_model_name or model_config.model,
            plan=plan, layout=layout, source=source, scoring_seconds=seconds,
            stats=self._weights.stats if self._weights else None,
            expert_rows=_expert_rows(model), plan_files=[str(p) for p in written])
        write_report(report)
        if _rank() == 0:
            publish(report)
        logger.info("%s", report.summary())
        return model

    def _make_plan(self, ckpt: Checkpoint, layout: ExpertLayout) -> tuple[Plan, str, float]:
        if self.options.plan is not None:
            return read_plan(self.options.plan, layout, ckpt.fingerprint), "plan_file", 0.0
        ratio = self.options.prune_ratio or 0.0
        if ratio == 0.0:
            return identity_plan(layout, ckpt.fingerprint), "score", 0.0
        # Fails on a ratio that leaves fewer than top_k experts, before any weight is read.
        prune_count(len(layout.layers), layout.num_experts, layout.top_k, ratio,
                    layout.n_group, layout.topk_group)
        seconds = 0.0

        def score() -> Plan:
            nonlocal seconds
            result = score_checkpoint(ckpt, layout)
            seconds = result.seconds
            return make_plan(layout, result.scores, ratio, ckpt.fingerprint)

        cache = self.options.plan_cache
        if cache is False:
            return score(), "score", seconds
        cache_dir = default_cache_dir() if cache is True else Path(cache)
        try:
            plan, hit = cached_plan(cache_dir, ckpt.fingerprint, ratio, score)
        except OSError as e:  # e.g. a read-only home: pruning must not depend on the cache
            logger.warning("vllm-aimer: plan cache %s unusable (%s); scoring without it",
                           cache_dir, e)
            return score(), "score", seconds
        return plan, ("cache" if hit else "score"), seconds

    def get_all_weights(self, model_config: ModelConfig,
                        model: nn.Module) -> Generator[tuple[str, torch.Tensor], None, None]:
        if self._weights is None:
            yield from super().get_all_weights(model_config, model)
            return
        local = self.local_expert_ids
        skip = (lambda name: should_skip_weight(name, local)) if local is not None else None
        if self.counter_before_loading_weights == 0.0:
            self.counter_before_loading_weights = time.perf_counter()
        yield from self._weights.iterate(skip)
        for source in getattr(model, "secondary_weights", ()):
            yield from self._get_weights_iterator(source)


def _check_expert_parallel(vllm_config: VllmConfig, plan: Plan) -> None:
    """Kept experts are spread by vLLM's EP rules in the new id space; check they can be."""
    parallel = vllm_config.parallel_config
    if not parallel.enable_expert_parallel:
        return
    # The EP group is DP x PCP x TP, as in vLLM's FusedMoEParallelConfig.
    ep_size = (parallel.data_parallel_size * parallel.prefill_context_parallel_size
               * parallel.tensor_parallel_size)
    warning = check_expert_parallel(plan.num_experts, plan.kept_per_layer, plan.top_k, ep_size)
    if warning:
        logger.warning("vllm-aimer: %s", warning)


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
