"""Shared fixtures: tiny checkpoints built once per session, a private plan cache, and
one real `vllm serve` of the tiny model for the tests that query a server. Reference
computations (expected values) live in tests/helpers/reference.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


# --------------------------------------------------------------------------- checkpoints

def _key(family: str, kwargs: dict) -> tuple:
    return (family, tuple(sorted((k, str(v)) for k, v in kwargs.items())))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(family, **build_tiny_moe kwargs) -> Path`, built once per session.

    The returned directory is shared: tests that modify a checkpoint must copy it
    first (see `copy_checkpoint`).
    """
    from vllm_aimer.testing.tiny import build_tiny_moe

    cache: dict[tuple, Path] = {}

    def build(family: str = "qwen3_moe", **kwargs) -> Path:
        key = _key(family, kwargs)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = build_tiny_moe(root / "model", family, **kwargs)
        return cache[key]

    return build


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- real servers

SERVED_NAME = "tiny-moe"


def server_args(extra: dict, *more: str) -> list[str]:
    return ["--load-format", "aimer", "--model-loader-extra-config", json.dumps(extra),
            "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
            "--served-model-name", SERVED_NAME, "--max-logprobs", "20", *more]


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory):
    """Keep the default plan cache (and any other XDG cache) out of the real home."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def pruned_server(tiny_checkpoint, tmp_path_factory):
    """One real `vllm serve` of the tiny Qwen3-MoE pruned at ratio 0.5, for the session."""
    from vllm_aimer.testing.server import ServerProcess

    model = tiny_checkpoint("qwen3_moe")
    work = tmp_path_factory.mktemp("pruned-server")
    plan_out, plan_cache = work / "plan", work / "plan-cache"
    server = ServerProcess(model, server_args({"prune_ratio": 0.5, "plan_out": str(plan_out),
                                               "plan_cache": str(plan_cache)}), work)
    server.model, server.plan_out, server.plan_cache = model, plan_out, plan_cache
    with server:
        server.wait_ready()
        yield server
