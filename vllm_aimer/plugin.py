"""The `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core,
workers), possibly more than once, so it must be idempotent and cheap: it only
registers the loader class and sets up the state directory that the worker's
report and the API server's /metrics collector share.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from vllm_aimer import metrics
    from vllm_aimer.loader import LOAD_FORMAT, AimerModelLoader
    from vllm_aimer.report import state_dir

    register_model_loader(LOAD_FORMAT)(AimerModelLoader)
    # The first vLLM process creates the directory; processes it spawns inherit it.
    state_dir(create=True)
    metrics.install()
    _registered = True
