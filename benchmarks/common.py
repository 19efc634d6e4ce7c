"""Shared pieces of the benchmarks: machine description, `vllm serve` runs with memory
sampling, and result files (generated checkpoints and page-cache control: checkpoints.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from vllm_aimer.testing.server import ServerProcess
from vllm_aimer.units import human_bytes

from benchmarks.checkpoints import (  # noqa: F401 (re-exported for the benchmarks)
    BF16, FULL, GIB, QUICK, QUICK_BF16, ModelSpec, build_checkpoint, evict_page_cache,
    shard_files, warm_page_cache)

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "work"
SERVE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]


# --------------------------------------------------------------------------- machine

def machine_info() -> dict[str, Any]:
    import safetensors
    import torch
    import transformers
    import vllm

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kib / (1 << 20), 2),
        "os": platform.platform(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- results

@dataclass
class Figure:
    """One row of summary.md: a ratio measured side by side, against its goal."""
    figure: str
    goal: str
    ratio: float
    met: bool
    raw: str

    def row(self) -> str:
        return (f"| {self.figure} | {self.goal} | {self.ratio:.3f} | "
                f"{'yes' if self.met else '**no**'} | {self.raw} |")


@dataclass
class Result:
    benchmark: str
    figures: list[Figure]
    method: str
    raw: dict[str, Any] = field(default_factory=dict)


def write_result(out: Path, result: Result, context: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.benchmark}.json"
    data = {"benchmark": result.benchmark, **context,
            "figures": [asdict(f) for f in result.figures],
            "method": result.method, "raw": result.raw}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def gib(n: float) -> str:
    """Bytes in GiB to 3 decimals (the package's formatter)."""
    return human_bytes(n, "GiB", 3)


# --------------------------------------------------------------------------- servers

_STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int) -> dict[str, int]:
    """Memory fields of /proc/<pid>/status, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS_KEYS:
                out[key] = int(value.split()[0]) * 1024
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process and its living descendants:
    unlike wall time, it hardly changes when other jobs share the cores."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return total
    for p in family:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


@dataclass
class ProcessMemory:
    name: str
    hwm: int = 0
    """VmHWM: the kernel's peak resident set (anonymous + file-backed + shared)."""
    peak_anon: int = 0
    """Highest RssAnon seen by the sampler (anonymous memory: what was materialised)."""
    anon: int = 0
    """RssAnon at the last sample."""


class MemorySampler(threading.Thread):
    """Samples /proc/<pid>/status of a process and all its descendants every
    `interval` seconds; VmHWM is the kernel's own peak, so nothing is missed there."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.procs: dict[int, ProcessMemory] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in family:
            try:
                status = proc_status(p.pid)
                mem = self.procs.get(p.pid)
                if mem is None:
                    mem = self.procs[p.pid] = ProcessMemory(p.name())
                mem.name = p.name()  # vLLM renames its processes after the fork
            except (OSError, psutil.Error):
                continue
            mem.hwm = max(mem.hwm, status.get("VmHWM", 0))
            mem.anon = status.get("RssAnon", 0)
            mem.peak_anon = max(mem.peak_anon, mem.anon)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def loader(self) -> ProcessMemory:
        """The worker process (it loads the weights); else the largest process."""
        workers = [m for m in self.procs.values() if "worker" in m.name.lower()]
        return max(workers or list(self.procs.values()), key=lambda m: m.hwm)


LOAD_STARTED = "Starting to load model"
LOAD_DONE = "for KV cache"
"""The worker logs these right before building the model and right after loading it
(and repacking weights), whatever the load format: their arrival times bound the load."""


class LogWatcher(threading.Thread):
    """Records when lines containing each of `patterns` first reach the server log."""

    def __init__(self, path: Path, start: float, patterns: Sequence[str]) -> None:
        super().__init__(daemon=True)
        self.path, self.t0, self.patterns = path, start, list(patterns)
        self.seen: dict[str, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        pos, pending = 0, ""
        while not self._halt.is_set():
            now = time.perf_counter() - self.t0
            try:
                with open(self.path, errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
            except OSError:
                chunk = ""
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                for p in self.patterns:
                    if p in line and p not in self.seen:
                        self.seen[p] = now
            time.sleep(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass
class Served:
    server: ServerProcess
    ready_seconds: float
    """From starting `vllm serve` to the first 200 from /health."""
    state_dir: Path
    sampler: MemorySampler | None
    log_times: dict[str, float]
    """Seconds from start to the first log line containing LOAD_STARTED / LOAD_DONE."""
    cpu_seconds_to_ready: float
    """CPU seconds the server's processes used until ready (see tree_cpu_seconds)."""

    def cpu_seconds(self) -> float:
        assert self.server.proc is not None
        return tree_cpu_seconds(self.server.proc.pid)

    @property
    def load_seconds(self) -> float | None:
        """The worker's model load, scoring and repacking included (+- 0.05 s)."""
        t = self.log_times
        return t[LOAD_DONE] - t[LOAD_STARTED] if LOAD_DONE in t and LOAD_STARTED in t else None

    def report(self) -> dict[str, Any] | None:
        """The aimer loader's report (None for a stock start)."""
        path = self.state_dir / "report-rank0.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def rpc(self, method: str) -> list[Any]:
        """Call a method of the worker extension (vllm_probe.py) on every worker."""
        req = urllib.request.Request(self.server.base_url + "/collective_rpc",
                                     data=json.dumps({"method": method}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["results"]

    def log_seconds(self, pattern: str) -> float | None:
        """A number of seconds from the server log, e.g. 'Loading weights took'."""
        m = re.search(re.escape(pattern) + r" ([\d.]+) s", self.server.log())
        return float(m.group(1)) if m else None


def aimer_args(ratio: float, plan_cache: Path | None = None, **options: Any) -> list[str]:
    extra: dict[str, Any] = {"prune_ratio": ratio,
                             "plan_cache": str(plan_cache) if plan_cache else False, **options}
    return ["--load-format", "aimer", "--model-loader-extra-config", json.dumps(extra)]


PROBE_ARGS = ["--worker-extension-cls", "benchmarks.vllm_probe.WeightProbe"]
PROBE_ENV = {"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": str(REPO)}


@contextmanager
def serve(model: Path, workdir: Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
          sample_memory: bool = False) -> Iterator[Served]:
    """`vllm serve model` with SERVE_ARGS + args, timed from start to /health 200."""
    if workdir.exists():
        subprocess.run(["rm", "-rf", str(workdir)], check=True)
    state = workdir / "state"
    state.mkdir(parents=True)
    server = ServerProcess(model, [*SERVE_ARGS, *args], workdir,
                           env={"AIMER_STATE_DIR": str(state), **(env or {})})
    sampler: MemorySampler | None = None
    start = time.perf_counter()
    watcher = LogWatcher(server.log_path, start, [LOAD_STARTED, LOAD_DONE])
    try:
        server.start()
        watcher.start()
        assert server.proc is not None
        if sample_memory:
            sampler = MemorySampler(server.proc.pid)
            sampler.start()
        server.wait_ready(timeout=900, poll_interval=0.1)
        ready = time.perf_counter() - start
        time.sleep(0.1)  # let the watcher read the last lines
        cpu = tree_cpu_seconds(server.proc.pid)
        yield Served(server, ready, state, sampler, watcher.seen, cpu)
    finally:
        if watcher.is_alive():
            watcher.stop()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        server.close()
