"""Start and stop a real `vllm serve` process on 127.0.0.1 (for the demo and tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmpdir() -> str:
    """A fresh directory for one server's TMPDIR, removed by `close`. vLLM binds its ZMQ
    IPC sockets there, and a Unix socket path holds at most 107 bytes, so it sits under
    a short system temp dir rather than the (possibly deep) work directory."""
    base = tempfile.gettempdir()
    if len(base) > 32 and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix="vllm-aimer-", dir=base)


def vllm_command() -> list[str]:
    """The `vllm` console script next to this Python, else the module."""
    script = Path(sys.executable).with_name("vllm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class ServerProcess:
    """`vllm serve MODEL ARGS...` with its output in `log_path`; a context manager."""

    def __init__(self, model: str | Path, args: Sequence[str], workdir: Path,
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        self.cmd = [*vllm_command(), "serve", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        # Each server sets up its own state (the plugin does, in its first process):
        # inheriting the caller's would mix reports of different servers.
        inherited = {k: v for k, v in os.environ.items()
                     if k not in ("AIMER_STATE_DIR", "PROMETHEUS_MULTIPROC_DIR")}
        self.env = {**inherited, "VLLM_CPU_KVCACHE_SPACE": os.environ.get(
            "VLLM_CPU_KVCACHE_SPACE", "1"), "TMPDIR": short_tmpdir(), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 300, poll_interval: float = 0.5) -> None:
        """Until /health answers 200 (asked every `poll_interval` s; the benchmarks time
        start-up with a short one); raises with the log's tail if the server dies."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-8000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(poll_interval)
        raise TimeoutError(f"vllm serve not ready after {timeout} s:\n{self.log()[-8000:]}")

    def wait_exit(self, timeout: float = 300) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=30) as r:
            return r.read().decode()

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGINT: vLLM's graceful path (engine and workers shut down first).
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.stop()
        if hasattr(self, "_log"):
            self._log.close()
        shutil.rmtree(self.env["TMPDIR"], ignore_errors=True)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
