"""Start and stop a real `vllm serve` process on 127.0.0.1 (for the demo and tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from vllm_aimer.channel import engine_env

__all__ = ["ServerProcess", "free_port", "vllm_command"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_command() -> list[str]:
    """The `vllm` console script next to this Python, else the module."""
    script = Path(sys.executable).with_name("vllm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class ServerProcess:
    """`vllm serve MODEL ARGS...` with its output in `log_path`; a context manager
    (`with` starts it and `close`s it).

    Args:
        model: the model to serve.
        args: more `vllm serve` arguments (host and port are set here).
        workdir: where server.log goes (created if missing).
        env: variables to add or override; the base is this process's environment
            without its state directory, with a TMPDIR of its own (channel.engine_env).
        port: the port; None for a free one.
    """

    def __init__(self, model: str | Path, args: Sequence[str], workdir: Path,
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        self.cmd = [*vllm_command(), "serve", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        # Each server sets up its own state (the plugin does, in its first process) and
        # TMPDIR (removed by `close`).
        self.env = {**engine_env(), "VLLM_CPU_KVCACHE_SPACE": os.environ.get(
            "VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServerProcess":
        """Start the server in its own process group; returns self (not yet ready)."""
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        return self

    def log(self) -> str:
        """The server's output so far ("" before it starts)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 300, poll_interval: float = 0.5) -> None:
        """Until /health answers 200 (asked every `poll_interval` s; the benchmarks time
        start-up with a short one).

        Raises:
            RuntimeError: the server exited first (the log's tail is in the message).
            TimeoutError: it did not answer within `timeout` seconds.
        """
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
        """The server's exit status, once it exits.

        Raises:
            subprocess.TimeoutExpired: it still runs after `timeout` seconds.
        """
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def get(self, path: str) -> str:
        """The body of GET `path` (e.g. "/metrics") as text.

        Raises:
            urllib.error.URLError: the request failed (HTTPError for a status >= 400).
        """
        with urllib.request.urlopen(self.base_url + path, timeout=30) as r:
            return r.read().decode()

    def stop(self, timeout: float = 60) -> None:
        """SIGINT to the server's process group, SIGKILL after `timeout` seconds; nothing
        if it is not running."""
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
        """Stop the server, close its log and remove its TMPDIR."""
        self.stop()
        if hasattr(self, "_log"):
            self._log.close()
        shutil.rmtree(self.env["TMPDIR"], ignore_errors=True)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
