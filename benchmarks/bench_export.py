"""Figure 5: memory of `vllm-aimer export` on the generated checkpoint, next to its
largest shard and the dense model: the export streams tensor by tensor, so its peak
resident set should stay below one shard whatever the model size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import GIB, Figure, Result, gib, shard_files, warm_page_cache
from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.export import READ_WINDOW

# The CLI in a fresh interpreter that reports its own VmHWM when it exits. (ru_maxrss
# from wait4 would not do: Linux carries the forking parent's peak over exec, and the
# benchmark runner holds vLLM and torch.)
_WRAPPER = """
import atexit, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("PEAK-RSS", int(line.split()[1]) * 1024, file=sys.stderr, flush=True)
atexit.register(peak)
import vllm_aimer.cli, vllm_aimer.export, vllm_aimer.scoring, torch, safetensors
if len(sys.argv) > 1:
    code = vllm_aimer.cli.main(sys.argv[1:])
    sys.stdout.flush()
    if code:
        sys.exit(code)
"""
CLI = [sys.executable, "-c", _WRAPPER]


def measure(cmd: list[str]) -> dict[str, Any]:
    """Run `cmd` (CLI + arguments); its peak resident set (VmHWM: anonymous memory plus
    the file pages safetensors maps), wall and CPU time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    output = proc.stdout.read().decode() if proc.stdout else ""
    code = os.waitstatus_to_exitcode(status)
    peaks = [int(line.split()[1]) for line in output.splitlines() if line.startswith("PEAK-RSS ")]
    if code != 0 or not peaks:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed ({code}):\n{output[-3000:]}")
    return {"peak_rss": peaks[-1], "seconds": seconds,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "output": output[-2000:]}


def run(model: Path, work: Path, ratio: float = 0.5) -> Result:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = open_checkpoint(model)
    shard_bytes = max(p.stat().st_size for p in shard_files(model))
    dense = ckpt.total_bytes
    # The interpreter with everything the export imports: the fixed part of any peak.
    baseline = measure(CLI)
    plan_dir = work / "plan"
    scored = measure([*CLI, "score", str(model), "--ratio", str(ratio), "--output",
                      str(plan_dir), "--quiet"])
    warm_page_cache(shard_files(model))
    runs = {
        "plan": measure([*CLI, "export", str(model), "--plan", str(plan_dir / "plan.json"),
                         "--output", str(work / "out-plan"), "--quiet"]),
        "ratio": measure([*CLI, "export", str(model), "--ratio", str(ratio), "--output",
                          str(work / "out-ratio"), "--quiet"]),
    }
    written = {}
    for name in runs:
        out = work / f"out-{name}"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        written[name] = index["metadata"]["total_size"]
        open_checkpoint(out)  # every shard's header and data section are complete
    if written["plan"] != written["ratio"]:
        raise AssertionError(f"the two exports differ in size: {written}")

    figures = []
    for name, label in (("plan", "export --plan"), ("ratio", "export --ratio (scores first)")):
        r = runs[name]
        figures.append(Figure(
            f"5. peak RSS of `{label}` / largest source shard", "<= 1.0",
            r["peak_rss"] / shard_bytes, r["peak_rss"] <= shard_bytes,
            f"peak {gib(r['peak_rss'])} (interpreter + imports alone {gib(baseline['peak_rss'])})"
            f", largest shard {gib(shard_bytes)}, dense model {gib(dense)} "
            f"({r['peak_rss'] / dense:.2f}x); wrote {gib(written[name])} in {r['seconds']:.1f} s "
            f"({written[name] / r['seconds'] / 1e9:.2f} GB/s, {r['cpu_seconds']:.1f} CPU s)"))
    largest = max(t.nbytes for t in ckpt.tensors.values())
    over = runs["plan"]["peak_rss"] - baseline["peak_rss"]
    figures.append(Figure(
        "5. export's own memory: (peak RSS - interpreter) / (largest tensor + read window)",
        "<= 1.1", over / (largest + READ_WINDOW), over <= 1.1 * (largest + READ_WINDOW),
        f"{gib(over)} above the interpreter's {gib(baseline['peak_rss'])}; largest tensor "
        f"{gib(largest)}, read window {gib(READ_WINDOW)}"))
    method = (
        f"`vllm-aimer export` of the generated checkpoint ({gib(dense)} float32 in "
        f"{len(ckpt.files)} shards of <= {gib(shard_bytes)}) at ratio {ratio}, run as a child "
        "process: once from the plan.json that `vllm-aimer score` wrote (export alone), once "
        "with --ratio (AIMER scoring, then the export). Shards in the page cache. Peak RSS is "
        "the kernel's VmHWM of the child, read from /proc/self/status as it exits (not "
        "ru_maxrss, which Linux carries over exec from the forking parent): anonymous memory "
        "plus file pages mapped while reading (safetensors maps each shard; the export "
        f"reopens a shard every {READ_WINDOW >> 20} MiB read so those pages are let go, and "
        "scores one MoE layer per pass). The fixed part is measured too: the same "
        "interpreter importing vllm_aimer, torch and safetensors and doing nothing else. Both exports are opened again as checkpoints (headers and "
        "data sections complete) and must hold the same bytes. For comparison, `vllm-aimer "
        "score` alone (one pass over all layers) peaked at "
        f"{gib(scored['peak_rss'])}.")
    raw = {"shard_bytes": shard_bytes, "largest_tensor": largest, "dense_bytes": dense, "written_bytes": written,
           "baseline": baseline["peak_rss"], "score": {k: v for k, v in scored.items()
                                                        if k != "output"},
           "runs": {k: {kk: vv for kk, vv in v.items() if kk != "output"} for k, v in runs.items()},
           "read_window": READ_WINDOW, "gib": GIB}
    shutil.rmtree(work, ignore_errors=True)
    return Result("export", figures, method, raw)
