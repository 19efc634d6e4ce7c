"""The `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core,
workers), possibly more than once, so it must be idempotent and cheap: it registers
the `aimer` load format, sets up the state directory that the worker's report and the
API server's /metrics collector share, and installs that collector. The loader class
registered here imports the worker-side modules (loader, weights, scoring) only when
vLLM builds a loader, in the worker: the API server never imports them.
"""

from __future__ import annotations

__all__ = ["LOAD_FORMAT", "register"]

LOAD_FORMAT = "aimer"
_registered = False


def register() -> None:
    """Register the `aimer` load format with vLLM and set up the worker channel (once
    per process; later calls do nothing)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from vllm_aimer import metrics
    from vllm_aimer.channel import state_dir

    class AimerLoader(BaseModelLoader):
        """Stands for `vllm_aimer.loader.AimerModelLoader` in vLLM's registry (which
        takes only BaseModelLoader subclasses): building one builds the real loader,
        whose module is imported then, in the process that loads the model."""

        def __new__(cls, load_config):  # type: ignore[no-untyped-def]
            from vllm_aimer.loader import AimerModelLoader

            return AimerModelLoader(load_config)

    register_model_loader(LOAD_FORMAT)(AimerLoader)
    # The first vLLM process creates the directory; processes it spawns inherit it.
    state_dir(create=True)
    metrics.install()
    _registered = True
