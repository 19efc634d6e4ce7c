"""`vllm-aimer fit`'s options: defaults, and the checks that turn raw values (strings
from the command line, or numbers) into a `FitOptions`, one AimerError per bad value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_aimer.constraints import Deployment, Gpu, check_ratio
from vllm_aimer.errors import AimerError
from vllm_aimer.options import number, positive_int
from vllm_aimer.units import GIB

__all__ = ["FitOptions", "fit_options", "KV_CACHE_DTYPE_BYTES", "DEFAULT_GPU_MEMORY_GIB",
           "DEFAULT_GPU_MEMORY_UTILIZATION", "DEFAULT_OVERHEAD_GIB", "DEFAULT_MAX_NUM_SEQS",
           "DEFAULT_RATIO"]

DEFAULT_GPU_MEMORY_GIB = 80.0
"""Nominal size of an 80 GB A100/H100. CUDA reports a little less (about 79.2 GiB
on an H100 80GB); pass the figure your GPUs report for a tight plan."""
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default --gpu-memory-utilization."""
DEFAULT_OVERHEAD_GIB = 1.5
"""Per-GPU memory vLLM uses besides weights and KV cache: peak activations of the
profiling run, CUDA graphs, NCCL buffers and non-torch allocations. 1.5 GiB is
a typical total for models of this size; raise it for very long prefills."""
DEFAULT_MAX_NUM_SEQS = 1
"""Full-length sequences the KV cache must hold. vLLM refuses to start unless at
least one max_model_len sequence fits; raise it to reserve room for concurrency."""
DEFAULT_RATIO = 0.5
# vLLM's --kv-cache-dtype values and their element size (None: the model dtype).
KV_CACHE_DTYPE_BYTES: Mapping[str, int | None] = {
    "auto": None, "bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1,
}


@dataclass(frozen=True)
class FitOptions:
    """What the user asked for; built by `fit_options`, which checks every value."""
    gpus: int | None = None
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    overhead_gib: float = DEFAULT_OVERHEAD_GIB
    max_model_len: int | None = None
    """None: the model's max_position_embeddings (vLLM's default)."""
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    kv_cache_dtype: str = "auto"
    ratio: float = DEFAULT_RATIO
    expert_parallel: bool = False
    """Serve with --enable-expert-parallel: the EP size is then the GPU count."""
    gpu: Gpu = Gpu.ANY
    """The GPU kind whose MoE kernel limits apply to the kept count."""

    def deployment(self, gpus: int) -> Deployment:
        """Where the kept count must be served on `gpus` GPUs (EP size, GPU kind)."""
        return Deployment(ep_size=gpus if self.expert_parallel else 1, gpu=self.gpu)

    @property
    def budget_bytes(self) -> int:
        """What vLLM may use per GPU: memory x utilization."""
        return int(self.gpu_memory_gib * self.gpu_memory_utilization * GIB)

    @property
    def overhead_bytes(self) -> int:
        """The per-GPU runtime overhead set aside first."""
        return int(self.overhead_gib * GIB)


def fit_options(*, gpus: Any = None, gpu_memory_gib: Any = None,
                gpu_memory_utilization: Any = None, overhead_gib: Any = None,
                max_model_len: Any = None, max_num_seqs: Any = None,
                kv_cache_dtype: Any = None, ratio: Any = None,
                expert_parallel: bool = False, gpu: Any = None) -> FitOptions:
    """Check raw option values (strings from the command line, or numbers).

    Args:
        gpus .. gpu: the CLI flags' values; None takes the default.
        expert_parallel: serve with --enable-expert-parallel over the GPUs.

    Returns:
        The checked options.

    Raises:
        AimerError: a bad value, naming the flag and the fix, so the CLI can answer
            with one line instead of argparse's usage dump.
    """
    opts: dict[str, Any] = {}
    if gpus is not None:
        opts["gpus"] = positive_int(
            gpus, "--gpus", "pass how many GPUs to shard the model over with tensor "
            "parallelism, e.g. --gpus 2 (at least 1).")
    if gpu_memory_gib is not None:
        g = number(gpu_memory_gib, "--gpu-memory-gib",
                    "pass one GPU's memory in GiB, e.g. --gpu-memory-gib 80.")
        if g <= 0:
            raise AimerError(f"--gpu-memory-gib must be positive, got {gpu_memory_gib!r}.",
                             "pass one GPU's memory in GiB, e.g. --gpu-memory-gib 80.")
        opts["gpu_memory_gib"] = g
    if gpu_memory_utilization is not None:
        u = number(gpu_memory_utilization, "--gpu-memory-utilization",
                    "pass the fraction of GPU memory vLLM may use, in (0, 1], e.g. 0.9.")
        if not 0.0 < u <= 1.0:
            raise AimerError(
                f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization!r}.",
                "pass the fraction of GPU memory vLLM may use, e.g. 0.9 (not a percentage).")
        opts["gpu_memory_utilization"] = u
    if overhead_gib is not None:
        o = number(overhead_gib, "--overhead-gib",
                    "pass the per-GPU runtime overhead in GiB, e.g. --overhead-gib 1.5.")
        if o < 0:
            raise AimerError(f"--overhead-gib must be 0 or more, got {overhead_gib!r}.",
                             "pass the per-GPU runtime overhead in GiB, e.g. 1.5.")
        opts["overhead_gib"] = o
    if max_model_len is not None:
        opts["max_model_len"] = positive_int(
            max_model_len, "--max-model-len",
            "pass the longest sequence (prompt + output) to serve, in tokens, e.g. 32768.")
    if max_num_seqs is not None:
        opts["max_num_seqs"] = positive_int(
            max_num_seqs, "--max-num-seqs",
            "pass how many full-length sequences the KV cache must hold at once, e.g. 8.")
    if kv_cache_dtype is not None:
        if kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
            raise AimerError(
                f"--kv-cache-dtype {kv_cache_dtype!r} is not a vLLM KV cache dtype.",
                f"use one of {', '.join(KV_CACHE_DTYPE_BYTES)} (auto: the model's dtype).")
        opts["kv_cache_dtype"] = kv_cache_dtype
    if ratio is not None:
        opts["ratio"] = check_ratio(number(
            ratio, "--ratio", "pass the fraction of routed experts to prune, e.g. 0.5."))
    if gpu is not None:
        kinds = [g.value for g in Gpu]
        if gpu not in kinds:
            raise AimerError(f"--gpu {gpu!r} is not a GPU kind vllm-aimer knows.",
                             f"use one of {', '.join(kinds)} (blackwell: NVIDIA B200/GB200/"
                             "B300, whose TRT-LLM MoE kernels limit the kept count).")
        opts["gpu"] = Gpu(gpu)
    return FitOptions(expert_parallel=bool(expert_parallel), **opts)
