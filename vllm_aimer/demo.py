"""The main job, end to end: build a tiny MoE, serve it pruned, query it, show /metrics."""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

from vllm_aimer.testing.server import ServerProcess

__all__ = ["DEMO_MODEL", "run_demo"]

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
"""The embedded default: a 4-layer, 16-expert, top-2 Qwen3-MoE trained by
scripts/train_demo_model.py on the Python standard library's sources."""
PROMPTS = ["def __init__(self, ", "import os\nimport sys\n\n\ndef main(", "    for line in "]


def _say(title: str, body: str = "") -> None:
    print(f"\n== {title}", flush=True)
    if body:
        print(textwrap.indent(body.rstrip(), "   "), flush=True)


def run_demo(workdir: Path, ratio: float = 0.5, model: Path | None = None,
             extra_args: list[str] | None = None) -> int:
    """Serve a model pruned at load, query it and print what happens (`vllm-aimer demo`).

    Args:
        workdir: where the plan files and the server's log go (`plan/` is replaced).
        ratio: the prune ratio passed as `prune_ratio`.
        model: the checkpoint to serve; None for the embedded DEMO_MODEL.
        extra_args: more `vllm serve` arguments.

    Returns:
        0 (the server is stopped before returning).

    Raises:
        RuntimeError: the server exited before it was ready (the log's tail is in the
            message).
        TimeoutError: the server was not ready within 300 s.
    """
    from openai import OpenAI

    workdir = workdir.resolve()
    if model is None:
        model = DEMO_MODEL
        _say("The embedded default model",
             f"{model}\na 4-layer Qwen3-MoE (16 experts per layer, top-2, about 5 MB) trained "
             "by this project\non the Python standard library's own sources "
             "(scripts/train_demo_model.py); nothing is downloaded.")
    plan_dir = workdir / "plan"
    shutil.rmtree(plan_dir, ignore_errors=True)
    extra = {"prune_ratio": ratio, "plan_out": str(plan_dir)}
    args = ["--load-format", "aimer", "--model-loader-extra-config", json.dumps(extra),
            "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
            "--served-model-name", "demo-moe", *(extra_args or [])]
    server = ServerProcess(model, args, workdir / "server")
    _say("Starting vLLM's OpenAI-compatible server with AIMER pruning",
         "$ vllm serve " + " ".join([str(model), "--host", "127.0.0.1", "--port",
                                     str(server.port), *[a if " " not in a and "{" not in a
                                                         else f"'{a}'" for a in args]]))
    start = time.monotonic()
    with server:
        server.wait_ready()
        _say(f"Server ready in {time.monotonic() - start:.0f} s", f"log: {server.log_path}")
        summary = [line.split("] ", 1)[-1] for line in server.log().splitlines()
                   if "[loader.py" in line]
        _say("What the loader did (from the server log)", "\n".join(summary) or "(not found)")

        client = OpenAI(base_url=server.base_url + "/v1", api_key="demo")
        done = client.completions.create(model="demo-moe", prompt=PROMPTS, max_tokens=48,
                                         temperature=0)
        shown = []
        for prompt, choice in zip(PROMPTS, sorted(done.choices, key=lambda c: c.index)):
            shown.append(f"--- prompt {prompt!r}, greedy completion:\n{prompt}{choice.text}")
        _say(f"Completions of the pruned model (ratio {ratio:g}; it writes Python as it read "
             "it, mistakes and all)", "\n".join(shown))

        print("\n== Streaming (a plain completion, token by token)\n   ", end="", flush=True)
        stream = client.completions.create(model="demo-moe", prompt="    def read(self", max_tokens=32,
                                           temperature=0, stream=True)
        print("    def read(self", end="", flush=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                print(chunk.choices[0].text, end="", flush=True)
        print(" [stream complete]")

        lines = [l for l in server.get("/metrics").splitlines()
                 if l.startswith("vllm_aimer_")]
        _say("Pruning metrics on the same /metrics as vLLM's own", "\n".join(lines))
    _say("Plan files written by the loader",
         "\n".join(f"{p}  ({p.stat().st_size} bytes)" for p in sorted(plan_dir.iterdir())))
    _say("What did pruning cost? Measure it on vLLM (perplexity, top-1 agreement, 7 engines):",
         "vllm-aimer eval vllm_aimer/demo_model --data benchmarks/data/stdlib-heldout.jsonl \\\n"
         "    --ratios 0,0.25,0.5 --criteria aimer,magnitude,random --output eval/   "
         "# or: make demo-eval")
    _say("Server stopped. To do the same with a real checkpoint on a GPU machine:",
         "pip install vllm-aimer\n"
         "vllm-aimer score /models/Qwen3-30B-A3B --ratio 0.5 --output plan/   # optional preview\n"
         "vllm serve /models/Qwen3-30B-A3B --load-format aimer \\\n"
         "    --model-loader-extra-config '{\"prune_ratio\": 0.5}'")
    return 0
