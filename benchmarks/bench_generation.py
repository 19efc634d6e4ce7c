"""Figure 4: generation throughput (tokens/s) of the 50 % pruned model vs the dense one
at equal batch: concurrent completions with a fixed length, after a warm-up request."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from openai import OpenAI

from benchmarks.common import Figure, Result, Served, aimer_args, serve

RATIO = 0.5
WORDS = ("mixture of experts models route each token to a few experts so the quick brown "
         "fox jumps over the lazy dog while pruning removes the least useful").split()
PROMPT_WORDS = 4
"""The generated checkpoints' tokenizer is byte-level (vocab 256), so 4 words are about
25 tokens: decoding, not prefill, dominates the rounds."""


def prompt(i: int) -> str:
    """A different prompt per request: with one prompt for all, greedy decoding gives
    every sequence the same tokens, so all would be routed to the same experts."""
    r = random.Random(i)
    return " ".join(r.choice(WORDS) for _ in range(PROMPT_WORDS))


class Client:
    def __init__(self, served: Served) -> None:
        self.served = served
        self.client = OpenAI(base_url=served.server.base_url + "/v1", api_key="unused",
                             max_retries=0, timeout=1800)
        self.model = self.client.models.list().data[0].id

    def complete(self, seed: int, max_tokens: int) -> int:
        r = self.client.completions.create(model=self.model, prompt=prompt(seed),
                                           max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.usage is not None
        return r.usage.completion_tokens

    def round(self, pool: ThreadPoolExecutor, seeds: range, max_tokens: int) -> dict[str, Any]:
        cpu = self.served.cpu_seconds()
        start = time.perf_counter()
        tokens = sum(pool.map(lambda s: self.complete(s, max_tokens), seeds))
        seconds = time.perf_counter() - start
        cpu = self.served.cpu_seconds() - cpu
        assert tokens == len(seeds) * max_tokens, tokens
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "server_cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu}


def run(model: Path, work: Path, concurrency: int, max_tokens: int, rounds: int) -> Result:
    with ExitStack() as stack, ThreadPoolExecutor(concurrency) as pool:
        clients = {}
        for name, args in (("dense", []), ("pruned", aimer_args(RATIO, work / "plans"))):
            clients[name] = Client(stack.enter_context(serve(model, work / name, args)))
            clients[name].complete(-1, 8)  # warm-up: first-request set-up is not throughput
        runs: dict[str, dict[str, Any]] = {name: {"rounds": []} for name in clients}
        for i in range(rounds):  # ABBA order, so both see the same phases of a shared machine
            seeds = range(i * concurrency, (i + 1) * concurrency)  # same prompts for both
            for name, client in sorted(clients.items(), reverse=bool(i % 2)):
                runs[name]["rounds"].append(client.round(pool, seeds, max_tokens))
    for r in runs.values():
        r["best_tokens_per_s"] = max(x["tokens_per_s"] for x in r["rounds"])
        r["tokens_per_cpu_s"] = (sum(x["tokens"] for x in r["rounds"])
                                 / sum(x["server_cpu_seconds"] for x in r["rounds"]))
    dense, pruned = runs["dense"]["best_tokens_per_s"], runs["pruned"]["best_tokens_per_s"]
    ratio = pruned / dense

    def rates(name: str) -> str:
        return "/".join(f"{r['tokens_per_s']:.1f}" for r in runs[name]["rounds"])

    per_cpu = {name: r["tokens_per_cpu_s"] for name, r in runs.items()}
    figures = [Figure(
        f"4. generation throughput, {RATIO:.0%} pruned / dense ({concurrency} concurrent)",
        ">= 1.0x", ratio, ratio >= 1.0,
        f"pruned {rates('pruned')} tok/s, dense {rates('dense')} tok/s "
        f"({concurrency} x {max_tokens} tokens per round); per server CPU second: pruned "
        f"{per_cpu['pruned']:.1f}, dense {per_cpu['dense']:.1f} tokens "
        f"({per_cpu['pruned'] / per_cpu['dense']:.3f}x)")]
    method = (
        f"Two servers up at once: stock vLLM on the dense checkpoint and `--load-format aimer` "
        f"with prune_ratio {RATIO}, each --dtype float32 --enforce-eager --max-model-len 512, "
        "VLLM_CPU_KVCACHE_SPACE=1. Each gets one warm-up completion (8 tokens), then "
        f"rounds per server: {rounds}, alternating dense/pruned in ABBA order (one server "
        "busy at a time), of "
        f"{concurrency} concurrent /v1/completions requests (openai client, one thread each) "
        f"of exactly {max_tokens} tokens (temperature 0, ignore_eos; a different random "
        f"{PROMPT_WORDS}-word prompt per request, about 25 tokens, the same set for both "
        "servers in a round); tokens/s = "
        "completion tokens / wall time of the round; the figure compares the best round of "
        "each server. Also reported: completion tokens per CPU second used by the server's "
        "processes over all rounds, which other jobs on the machine hardly change.")
    return Result("generation", figures, method, {"runs": runs, "concurrency": concurrency,
                                                   "max_tokens": max_tokens,
                                                   "example_prompt": prompt(0)})
