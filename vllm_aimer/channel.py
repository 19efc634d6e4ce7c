"""The channel from the loading worker to the API server.

Model loading runs in a worker process and /metrics is served by the API server;
they share a state directory named in the environment (created by the plugin in the
first vLLM process, inherited by the processes it starts). The worker writes its
report there atomically, one file per rank, and records a load failure so that the
top process can repeat it as its last line. Nothing here imports torch or the
worker-side modules: the API server reads reports through this module alone.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from vllm_aimer.files import atomic_write_text
from vllm_aimer.report import PruningReport

__all__ = ["STATE_DIR_ENV", "ERROR_FILE", "state_dir", "write_error", "rank", "write_report",
           "read_reports", "engine_env", "short_tmpdir"]

STATE_DIR_ENV = "AIMER_STATE_DIR"
ERROR_FILE = "error.txt"
REPORT_GLOB = "report-rank*.json"
# vLLM's multiprocess /metrics directory: set by the vLLM process tree that owns it.
PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def state_dir(create: bool = False) -> Path | None:
    """The directory shared with the API server.

    Args:
        create: when none is set up yet, make one, name it in this process's
            environment (children inherit it) and remove it when this process exits,
            after repeating a recorded load error.

    Returns:
        The directory (created if missing), or None when none was set up and
        `create` is False.
    """
    value = os.environ.get(STATE_DIR_ENV)
    if not value:
        if not create:
            return None
        value = tempfile.mkdtemp(prefix="vllm-aimer-")
        os.environ[STATE_DIR_ENV] = value
        # The creating process is the top of the process tree: it has the last word.
        atexit.register(_at_exit, Path(value))
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_error(message: str) -> None:
    """Record a load failure so the top process repeats it as its last line (nothing
    happens outside a vLLM process tree, where no state directory is set up)."""
    directory = state_dir()
    if directory is not None:
        atomic_write_text(directory / ERROR_FILE, message)


def _at_exit(directory: Path) -> None:
    # vLLM ends a failed start with its own "Engine core initialization failed";
    # the user should see what to fix as the very last line instead.
    error = directory / ERROR_FILE
    if error.is_file():
        print(error.read_text().strip(), file=sys.stderr, flush=True)
    shutil.rmtree(directory, ignore_errors=True)


def rank() -> int:
    """This process's global rank (0 outside torch.distributed). Worker side only:
    it imports torch.distributed."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_report(report: PruningReport) -> Path:
    """Write `report` as `report-rank{rank()}.json` in the state directory (created when
    this process has none), atomically. Worker side: the rank comes from torch.distributed.

    Returns:
        The file written.

    Raises:
        OSError: the state directory cannot be written.
    """
    directory = state_dir(create=True)
    assert directory is not None
    path = directory / f"report-rank{rank()}.json"
    atomic_write_text(path, report.model_dump_json(indent=1))
    return path


def read_reports(directory: Path | None = None) -> list[PruningReport]:
    """Reports of this server's workers, lowest rank first.

    Args:
        directory: where to look; None for this process's state directory.

    Returns:
        The readable reports (unreadable or partial ones are skipped); [] when there
        is no directory.
    """
    directory = directory or state_dir()
    if directory is None or not directory.is_dir():
        return []
    reports = []
    for path in sorted(directory.glob(REPORT_GLOB), key=lambda p: int(p.stem.split("rank")[-1])):
        try:
            reports.append(PruningReport.model_validate_json(path.read_bytes()))
        except (OSError, ValueError):
            continue
    return reports


def short_tmpdir() -> str:
    """A fresh directory for one vLLM process tree's TMPDIR (the caller removes it).
    vLLM binds its ZMQ IPC sockets there, and a Unix socket path holds at most 107
    bytes, so it sits under a short system temp dir rather than a deep work directory."""
    base = tempfile.gettempdir()
    if len(base) > 32 and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix="vllm-aimer-", dir=base)


def engine_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a separate vLLM process tree (a server, an eval engine):
    `environ` (default: this process's) without this tree's state directory and
    Prometheus directory, so that the new tree sets up its own and reports of two
    servers never mix, and with its own TMPDIR from `short_tmpdir` (the caller
    removes it)."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k not in (STATE_DIR_ENV, PROMETHEUS_DIR_ENV)}
    env["TMPDIR"] = short_tmpdir()
    return env
