"""`vllm-aimer fit`'s answer as text (the table and the command) and as JSON."""

from __future__ import annotations

from typing import Any

from vllm_aimer.constraints import Gpu
from vllm_aimer.fit.sizing import ModelFacts, kv_cache_bytes_per_token
from vllm_aimer.fit.solver import Fit, FitReport, gib

__all__ = ["render_fit", "fit_json"]


def fit_json(report: FitReport) -> dict[str, Any]:
    """The answer as one JSON object (`vllm-aimer fit --json`)."""
    f, opts = report.facts, report.options
    req = report.requested
    return {
        "model": str(report.model_dir),
        "family": f.family,
        "size_source": f.source,
        "dtype": f.dtype,
        "experts_per_layer": [f.num_experts, f.num_experts - report.ratio_pruned_per_layer],
        "top_k": f.top_k,
        "expert_parallel": opts.expert_parallel,
        "gpu": opts.gpu.value,
        "quantization": f.quantization,
        "aimer_scoring": f.scorable,
        "moe_layers": len(f.moe_layers),
        "max_ratio": f.max_pruned_per_layer / f.num_experts,
        "dense_weight_bytes": f.total_bytes,
        "non_expert_weight_bytes": f.non_expert_bytes,
        "routed_expert_bytes": f.routed_expert_bytes,
        "router_bytes": f.router_bytes,
        "ratio": opts.ratio,
        "pruned_experts_per_layer": report.ratio_pruned_per_layer,
        "pruned_weight_bytes": f.weight_bytes(report.ratio_pruned_per_layer),
        "kv_cache_dtype": opts.kv_cache_dtype,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(f, opts.kv_cache_dtype),
        "max_model_len": report.max_model_len,
        "max_num_seqs": opts.max_num_seqs,
        "gpu_memory_gib": opts.gpu_memory_gib,
        "gpu_memory_utilization": opts.gpu_memory_utilization,
        "overhead_gib": opts.overhead_gib,
        "budget_bytes_per_gpu": opts.budget_bytes,
        "gpus": opts.gpus,
        "min_ratio": _ratio_value(report.facts, req) if req is not None else None,
        "fits": req.fits if req is not None else None,
        "reason": req.reason if req is not None else None,
        "serve_command": report.command,
        "table": [_row_json(f, row) for row in report.table],
        "notes": list(report.notes),
    }


def _ratio_value(facts: ModelFacts, row: Fit) -> float | None:
    """k/E of a fit; None when nothing fits."""
    return None if row.pruned_per_layer is None else row.pruned_per_layer / facts.num_experts


def _row_json(facts: ModelFacts, row: Fit) -> dict[str, Any]:
    return {"gpus": row.gpus, "fits": row.fits,
            "min_ratio": _ratio_value(facts, row),
            "pruned_experts_per_layer": row.pruned_per_layer,
            "weight_bytes_per_gpu": row.weight_bytes,
            "kv_cache_bytes_per_gpu": row.kv_cache_bytes,
            "overhead_bytes_per_gpu": row.overhead_bytes,
            "total_bytes_per_gpu": row.total_bytes,
            "budget_bytes_per_gpu": row.budget_bytes,
            "reason": row.reason}


def render_fit(report: FitReport) -> str:
    """The human-readable answer: sizes, the table for each GPU count, and the
    `vllm serve` command (or why nothing fits)."""
    f, opts = report.facts, report.options
    k = report.ratio_pruned_per_layer
    kv_token = kv_cache_bytes_per_token(f, opts.kv_cache_dtype)
    kv_name = (f"auto ({f.dtype})" if opts.kv_cache_dtype == "auto" else opts.kv_cache_dtype)
    lines = [
        f"model     {report.model_dir} ({f.family}, sizes from {f.source})",
        f"experts   {f.num_experts} per layer x {len(f.moe_layers)} MoE layers, top_k {f.top_k}; "
        f"max ratio {f.max_pruned_per_layer / f.num_experts:.4g} "
        f"(keeps {f.num_experts - f.max_pruned_per_layer})",
        f"weights   dense {gib(f.total_bytes)} (non-expert {gib(f.non_expert_bytes)}, routed "
        f"experts + router {gib(f.prunable_bytes)}), {f.dtype}"
        + (f", stored {f.quantization}" if f.quantization != "unquantized" else ""),
        f"          at ratio {opts.ratio:g} ({k} of {f.num_experts} pruned per layer): "
        f"{gib(f.weight_bytes(k))}",
        f"KV cache  {kv_token} B/token ({kv_name}); budgeted {report.max_model_len} tokens x "
        f"{opts.max_num_seqs} sequence{'s' if opts.max_num_seqs > 1 else ''}",
        f"per GPU   {opts.gpu_memory_gib:g} GiB x {opts.gpu_memory_utilization:g} = "
        f"{gib(opts.budget_bytes)}, of which {gib(opts.overhead_bytes)} runtime overhead",
        *(["ratios    only those safe"
           + (" with expert parallelism over the GPUs (kept count a multiple of the GPU "
              "count)" if opts.expert_parallel else "") + f" on {opts.gpu.label}"]
          if opts.expert_parallel or opts.gpu is not Gpu.ANY else []),
        "",
        f"{'GPUs':>4}  {'min ratio':<10} {'weights/GPU':>12} {'KV/GPU':>11} {'total/GPU':>11}",
    ]
    for row in report.table:
        if row.fits:
            lines.append(f"{row.gpus:>4}  {row.ratio:<10} {gib(row.weight_bytes):>12} "
                         f"{gib(row.kv_cache_bytes):>11} {gib(row.total_bytes):>11}")
        else:
            lines.append(f"{row.gpus:>4}  does not fit: {row.why}")
    lines.append("")
    req, chosen = report.requested, report.chosen
    if req is not None and not req.fits:
        lines.append(f"No prune ratio fits: {req.reason}.")
        lines.append("Fix: more GPUs, a smaller --max-model-len or --max-num-seqs, "
                     "--kv-cache-dtype fp8, or GPUs with more memory.")
    elif chosen is None:
        lines.append("No prune ratio fits on any GPU count in the table; pass --gpus N "
                     "to see why for N GPUs.")
    else:
        where = f"On {chosen.gpus} GPU{'s' if chosen.gpus > 1 else ''}"
        if req is None:
            where = f"Smallest fit: {chosen.gpus} GPU{'s' if chosen.gpus > 1 else ''}"
        if chosen.pruned_per_layer:
            lines.append(f"{where}: prune ratio {chosen.ratio} ({chosen.pruned_per_layer} of "
                         f"{f.num_experts} experts pruned per layer).")
        else:
            lines.append(f"{where}: fits without pruning.")
        lines.append(report.command or "")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
