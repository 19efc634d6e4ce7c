"""The main job, end to end: build a tiny MoE, serve it pruned, query it, show /metrics."""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

from vllm_aimer.server import ServerProcess
from vllm_aimer.tiny import build_tiny_moe


def _say(title: str, body: str = "") -> None:
    print(f"\n== {title}", flush=True)
    if body:
        print(textwrap.indent(body.rstrip(), "   "), flush=True)


def run_demo(workdir: Path, ratio: float = 0.5, model: Path | None = None,
             extra_args: list[str] | None = None) -> int:
    from openai import OpenAI

    workdir = workdir.resolve()
    if model is None:
        model = workdir / "tiny-qwen3-moe"
        if not (model / "config.json").exists():
            _say("Building the embedded default model",
                 f"A tiny random Qwen3-MoE (4 layers x 16 experts, top-2) in {model};\n"
                 "built locally, nothing is downloaded.")
            build_tiny_moe(model, "qwen3_moe")
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
        prompt = "the quick brown fox"
        done = client.completions.create(model="demo-moe", prompt=prompt, max_tokens=12,
                                         temperature=0)
        _say("Completion (the model is random, so the words are too)",
             f"prompt: {prompt!r}\nanswer: {done.choices[0].text!r}\n"
             f"tokens: {done.usage.prompt_tokens} in, {done.usage.completion_tokens} out")

        print("\n== Streaming chat\n   ", end="", flush=True)
        stream = client.chat.completions.create(
            model="demo-moe", messages=[{"role": "user", "content": "hello, how are you?"}],
            max_tokens=12, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print(" [stream complete]")

        lines = [l for l in server.get("/metrics").splitlines()
                 if l.startswith("vllm_aimer_")]
        _say("Pruning metrics on the same /metrics as vLLM's own", "\n".join(lines))
    _say("Plan files written by the loader",
         "\n".join(f"{p}  ({p.stat().st_size} bytes)" for p in sorted(plan_dir.iterdir())))
    _say("Server stopped. To do the same with a real checkpoint on a GPU machine:",
         "pip install vllm-aimer\n"
         "vllm-aimer score /models/Qwen3-30B-A3B --ratio 0.5 --output plan/   # optional preview\n"
         "vllm serve /models/Qwen3-30B-A3B --load-format aimer \\\n"
         "    --model-loader-extra-config '{\"prune_ratio\": 0.5}'")
    return 0
