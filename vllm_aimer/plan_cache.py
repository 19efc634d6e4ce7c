"""A plan cache keyed by checkpoint fingerprint and ratio.

Every tensor-parallel rank loads weights in its own process; with the cache,
the first rank to take the key's lock scores and stores the plan, and the others
(and later restarts) read it instead of scoring again, so all ranks prune the
same experts. Writes are atomic; the lock is an flock on a file next to the entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vllm_aimer.files import atomic_write_text
from vllm_aimer.plan import Plan

__all__ = ["default_cache_dir", "cache_key", "cached_plan"]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vllm-aimer/plans, or ~/.cache/vllm-aimer/plans (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-aimer" / "plans"


def cache_key(fingerprint: str, ratio: float) -> str:
    """The entry name for a checkpoint fingerprint and ratio: 32 hex digits of sha256."""
    return hashlib.sha256(f"{fingerprint}:{ratio!r}".encode()).hexdigest()[:32]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_plan(cache_dir: Path, fingerprint: str, ratio: float,
                compute: Callable[[], Plan]) -> tuple[Plan, bool]:
    """(plan, hit): the cached plan for this checkpoint and ratio, else compute and store.

    Concurrent callers for one key serialise on its lock, so `compute` runs once.
    An unreadable or foreign entry is recomputed and replaced.

    Args:
        cache_dir: the cache directory (created if missing).
        fingerprint: the checkpoint's `Checkpoint.fingerprint`.
        ratio: the prune ratio, part of the key.
        compute: makes the plan on a miss (what it raises propagates; nothing is
            stored then).

    Returns:
        The plan, and whether it came from the cache.

    Raises:
        OSError: the directory, its lock or the entry cannot be written.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(fingerprint, ratio)
    entry = cache_dir / f"{key}.json"
    with _locked(cache_dir / f"{key}.lock"):
        if entry.is_file():
            try:
                plan = Plan.model_validate_json(entry.read_bytes())
                if plan.checkpoint == fingerprint:
                    return plan, True
            except (OSError, ValueError):
                pass
        plan = compute()
        atomic_write_text(entry, plan.to_json())
        return plan, False
