"""The fit itself: the smallest uniform prune count whose weights, KV cache and
overhead fit one GPU's budget, for each GPU count, and the `vllm serve` line for it.

The memory model is vLLM's: with tensor parallelism over N GPUs each GPU holds
1/N of the weights and the KV cache of its share of the KV heads (heads are
replicated when there are fewer than N), and vLLM may use
`--gpu-memory-utilization` x the GPU's memory in all. A fixed per-GPU runtime
overhead (activations, CUDA graphs, NCCL buffers, the CUDA context) is set aside
first. Pruning is uniform (k experts per MoE layer, k = 0 .. E - top_k), so the
ratios tried are k / E and each maps back to exactly k through `prune_count`.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from vllm_aimer.constraints import ANYWHERE, Deployment
from vllm_aimer.errors import AimerError
from vllm_aimer.fit.options import DEFAULT_MAX_NUM_SEQS, FitOptions
from vllm_aimer.fit.sizing import ModelFacts, kv_cache_bytes_per_token
from vllm_aimer.units import human_bytes

__all__ = ["Fit", "FitReport", "TABLE_GPU_COUNTS", "fit_on", "plan_fit", "kv_heads_per_gpu",
           "tensor_parallel_problem", "ratio_text", "serve_command", "gib"]

TABLE_GPU_COUNTS: tuple[int, ...] = (1, 2, 4, 8)


def kv_heads_per_gpu(num_kv_heads: int, gpus: int) -> int:
    """vLLM shards KV heads over tensor-parallel ranks and replicates them when there
    are fewer heads than ranks, so a GPU never holds less than one head."""
    return max(1, num_kv_heads // gpus)


def tensor_parallel_problem(facts: ModelFacts, gpus: int) -> str | None:
    """Why vLLM cannot shard this model over `gpus` ranks, or None."""
    if facts.num_attention_heads % gpus:
        return (f"{facts.num_attention_heads} attention heads are not divisible by "
                f"tensor parallel size {gpus}")
    kv = facts.num_kv_heads
    if (gpus < kv and kv % gpus) or (gpus > kv and gpus % kv):
        return f"{kv} KV heads cannot be split or replicated evenly over {gpus} GPUs"
    if facts.moe_intermediate_size and facts.moe_intermediate_size % gpus:
        return (f"expert intermediate size {facts.moe_intermediate_size} is not divisible "
                f"by tensor parallel size {gpus}")
    return None


@dataclass(frozen=True)
class Fit:
    """The outcome for one GPU count: the smallest k that fits, or why none does."""
    gpus: int
    pruned_per_layer: int | None
    """Smallest per-layer prune count that fits; None when nothing fits."""
    ratio: str | None
    """That k as a prune_ratio (exact decimal text that `prune_count` maps back to k)."""
    budget_bytes: int
    overhead_bytes: int
    kv_cache_bytes: int
    """Per GPU."""
    weight_bytes: int
    """Per GPU, at the chosen k (or at the max ratio when nothing fits)."""
    non_expert_bytes: int
    """Per GPU: the part of weight_bytes pruning cannot remove."""
    reason: str | None = None
    """Why nothing fits, with the numbers."""
    why: str | None = None
    """The short form of reason, for the table."""

    @property
    def fits(self) -> bool:
        return self.pruned_per_layer is not None

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.overhead_bytes


def ratio_text(facts: ModelFacts, k: int, deployment: Deployment = ANYWHERE) -> str:
    """k/E as decimal text that the loader's `prune_count` turns back into exactly k."""
    text = f"{k / facts.num_experts:.10g}"
    if facts.prune_count(float(text), deployment) == k:
        return text
    return repr(k / facts.num_experts)


def gib(n: float) -> str:
    """Bytes as GiB with 2 decimals, as fit prints every size."""
    return human_bytes(n, "GiB")


def fit_on(facts: ModelFacts, opts: FitOptions, gpus: int, max_model_len: int) -> Fit:
    """Smallest uniform prune count whose weights/N + KV + overhead fit one GPU's budget.

    Weights shrink with k and nothing else does, so the first k that fits is the answer;
    when even k = E - top_k does not fit, the reason names the part that is too big.

    Args:
        facts: the model's sizes.
        opts: the checked options (budget, overhead, KV dtype, sequences, EP, GPU kind).
        gpus: the tensor-parallel size.
        max_model_len: tokens per sequence the KV cache must hold.

    Returns:
        The fit: its k and ratio, or None and the reason (also when vLLM cannot shard
        the model over `gpus`).
    """
    budget, overhead = opts.budget_bytes, opts.overhead_bytes
    kv_token = kv_cache_bytes_per_token(facts, opts.kv_cache_dtype)
    kv = (max_model_len * opts.max_num_seqs * kv_token
          * kv_heads_per_gpu(facts.num_kv_heads, gpus) // facts.num_kv_heads)
    non_expert = math.ceil(facts.non_expert_bytes / gpus)
    common = dict(gpus=gpus, budget_bytes=budget, overhead_bytes=overhead, kv_cache_bytes=kv,
                  non_expert_bytes=non_expert)
    problem = tensor_parallel_problem(facts, gpus)
    if problem:
        return Fit(pruned_per_layer=None, ratio=None,
                   weight_bytes=math.ceil(facts.weight_bytes(0) / gpus),
                   reason=f"vLLM cannot use tensor parallel size {gpus}: {problem}",
                   why=problem, **common)
    deployment = opts.deployment(gpus)
    counts = facts.prune_counts(deployment)
    for k in counts:
        weights = math.ceil(facts.weight_bytes(k) / gpus)
        if weights + kv + overhead <= budget:
            return Fit(pruned_per_layer=k, ratio=ratio_text(facts, k, deployment),
                       weight_bytes=weights, **common)
    k_max = counts[-1]
    weights = math.ceil(facts.weight_bytes(k_max) / gpus)
    kept = weights - non_expert
    total = weights + kv + overhead
    max_r = k_max / facts.num_experts
    head = (f"does not fit on {gpus} GPU{'s' if gpus > 1 else ''} even at the max ratio "
            f"{max_r:.4g} ({facts.num_experts - k_max} of {facts.num_experts} experts kept per layer): per GPU "
            f"non-expert weights {gib(non_expert)} + kept experts {gib(kept)} + KV cache "
            f"{gib(kv)} + overhead {gib(overhead)} = {gib(total)} > {gib(budget)} "
            f"({opts.gpu_memory_gib:g} GiB x {opts.gpu_memory_utilization:g})")
    if overhead >= budget:
        why = "the overhead alone exceeds the budget"
    elif non_expert + overhead > budget:
        why = "the non-expert weights alone exceed the budget (pruning cannot help)"
    elif kv + overhead > budget:
        why = (f"the KV cache alone ({max_model_len} tokens x {opts.max_num_seqs} sequences) "
               "exceeds the budget")
    elif non_expert + kv + overhead > budget:
        why = "non-expert weights and KV cache together exceed the budget"
    elif k_max < facts.num_experts - facts.top_k:
        why = (f"the {facts.num_experts - k_max} experts per layer this deployment needs at "
               "least (router groups, expert-parallel split, GPU kernels) do not fit next to "
               "the rest")
    else:
        why = "the top_k experts every layer must keep do not fit next to the rest"
    return Fit(pruned_per_layer=None, ratio=None, weight_bytes=weights,
               reason=f"{head}; {why}", why=why, **common)


def serve_command(model_dir: Path, facts: ModelFacts, opts: FitOptions, fit: Fit,
                  max_model_len: int) -> str:
    """The `vllm serve` line for a fit (no aimer flags when nothing needs pruning)."""
    parts = ["vllm", "serve", shlex.quote(str(model_dir)),
             "--tensor-parallel-size", str(fit.gpus)]
    if opts.expert_parallel:
        parts.append("--enable-expert-parallel")
    if fit.pruned_per_layer:
        extra = json.dumps({"prune_ratio": json.loads(fit.ratio or "0")})
        parts += ["--load-format", "aimer", "--model-loader-extra-config", shlex.quote(extra)]
    parts += ["--max-model-len", str(max_model_len),
              "--gpu-memory-utilization", f"{opts.gpu_memory_utilization:g}"]
    if opts.max_num_seqs != DEFAULT_MAX_NUM_SEQS:
        parts += ["--max-num-seqs", str(opts.max_num_seqs)]
    if opts.kv_cache_dtype != "auto":
        parts += ["--kv-cache-dtype", opts.kv_cache_dtype]
    return " ".join(parts)


@dataclass(frozen=True)
class FitReport:
    model_dir: Path
    """The directory `vllm serve` is pointed at (a config.json's own directory)."""
    facts: ModelFacts
    options: FitOptions
    max_model_len: int
    ratio_pruned_per_layer: int
    """k for --ratio (the loader's prune_count)."""
    table: tuple[Fit, ...]
    requested: Fit | None
    """The row for --gpus, None without it."""
    notes: tuple[str, ...] = field(default=())

    @property
    def chosen(self) -> Fit | None:
        """The fit the serve command is for: --gpus's, else the smallest count that fits."""
        if self.requested is not None:
            return self.requested if self.requested.fits else None
        return next((f for f in self.table if f.fits), None)

    @property
    def command(self) -> str | None:
        chosen = self.chosen
        return (serve_command(self.model_dir, self.facts, self.options, chosen,
                              self.max_model_len) if chosen else None)

    @property
    def exit_code(self) -> int:
        """1 when --gpus was given and nothing fits (like grep finding nothing), else 0."""
        return 1 if self.requested is not None and not self.requested.fits else 0


def plan_fit(facts: ModelFacts, opts: FitOptions, model_dir: Path) -> FitReport:
    """The whole answer: sizes, the --ratio figure, the table and the --gpus row.

    Args:
        facts: the model's sizes (`load_model_facts`).
        opts: the checked options (`fit_options`).
        model_dir: the directory the serve command points `vllm serve` at.

    Returns:
        The report, with one `Fit` per GPU count of the table (and --gpus).

    Raises:
        AimerError: no --max-model-len and no max_position_embeddings to default it to,
            or a --ratio the router cannot take.
    """
    max_model_len = opts.max_model_len or facts.max_position_embeddings
    if max_model_len is None:
        raise AimerError("config.json has no max_position_embeddings to default "
                         "--max-model-len to.", "pass --max-model-len, e.g. 32768.")
    k_ratio = facts.prune_count(opts.ratio)
    counts = sorted(set(TABLE_GPU_COUNTS) | ({opts.gpus} if opts.gpus else set()))
    table = tuple(fit_on(facts, opts, n, max_model_len) for n in counts)
    requested = next((row for row in table if row.gpus == opts.gpus), None)
    notes = []
    if facts.source == "config.json":
        notes.append("sizes come from config.json alone: point `vllm serve` at the full "
                     "checkpoint directory if it is not the config's own directory.")
    if not facts.scorable:
        notes.append(f"AIMER cannot score this checkpoint's expert encoding ({facts.quantization}): "
                     "prune it with a plan file (`plan` in --model-loader-extra-config) instead "
                     "of prune_ratio.")
    if facts.dtype_bytes == 4:
        notes.append("config dtype is float32: vLLM's --dtype auto serves float32 checkpoints "
                     "in 16 bits on GPUs, so these weight and KV figures are about twice what "
                     "vLLM will allocate (conservative).")
    if facts.max_position_embeddings and max_model_len > facts.max_position_embeddings:
        notes.append(f"--max-model-len {max_model_len} exceeds max_position_embeddings "
                     f"{facts.max_position_embeddings}; vLLM rejects that unless rope "
                     "scaling extends the context.")
    return FitReport(model_dir, facts, opts, max_model_len, k_ratio, table, requested,
                     tuple(notes))
