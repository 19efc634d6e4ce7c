"""Pruning facts on vLLM's /metrics (filled in by the serving issue)."""


def install() -> None:
    return None
