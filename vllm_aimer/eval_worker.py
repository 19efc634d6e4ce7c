"""One `vllm-aimer eval` run: a vLLM offline engine in its own process.

    python -m vllm_aimer.eval_worker SPEC.json

SPEC: {"model", "extra" (the aimer loader's options), "documents" (a JSON file of
texts), "max_model_len" (or null: the model's), "dtype", "result" (where to write)}.
Each run gets a fresh process because vLLM does not free an engine cleanly in-process.
The result holds, per document, the number of predicted tokens, the sum of their
negative log-likelihoods and the top-1 token at each predicted position.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from vllm_aimer.files import atomic_write_text

__all__ = ["main"]


def main(spec_path: str) -> int:
    """Run one engine on the spec's documents and write its result file.

    Args:
        spec_path: the SPEC JSON file described above.

    Returns:
        0 once the result is written (atomically, through a `.tmp` file).

    Raises:
        KeyError: the spec lacks "model", "extra", "documents" or "result".
        OSError: the spec, the documents or the result cannot be read or written.
    """
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The engine core in this process: the same engine code, ~20 s sooner to start.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    dtype = spec.get("dtype") or "auto"
    if dtype == "auto" and current_platform.is_cpu():
        dtype = "float32"  # bf16 kernels crash on CPUs without AVX512-BF16
    kwargs = dict(model=spec["model"], load_format="aimer",
                  model_loader_extra_config=spec["extra"], dtype=dtype, seed=0,
                  enforce_eager=True, enable_prefix_caching=False)
    if spec.get("max_model_len"):
        kwargs["max_model_len"] = int(spec["max_model_len"])
    started = time.perf_counter()
    llm = LLM(**kwargs)
    load_seconds = time.perf_counter() - started
    max_len = int(llm.llm_engine.model_config.max_model_len)
    tokenizer = llm.get_tokenizer()
    texts = json.loads(Path(spec["documents"]).read_text())
    # Tokenized as vLLM tokenizes a text prompt (special tokens added), keeping the first
    # max_model_len - 1 tokens: vLLM needs one position for the generated token.
    prompts = [tokenizer.encode(t, add_special_tokens=True)[: max_len - 1] for t in texts]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params,
                           use_tqdm=False)
    seconds = time.perf_counter() - started
    docs = []
    for ids, out in zip(prompts, outputs):
        nll, top1 = 0.0, []
        # Position 0 has no prediction (None); position i holds log p(ids[i] | ids[:i]).
        for tok, entry in zip(ids[1:], out.prompt_logprobs[1:]):
            nll -= entry[tok].logprob
            top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
        docs.append({"tokens": len(ids) - 1, "nll": nll, "top1": top1})
    result = {"docs": docs, "max_model_len": max_len, "dtype": dtype,
              "prompt_tokens": sum(len(ids) for ids in prompts), "seconds": seconds,
              "load_seconds": load_seconds}
    atomic_write_text(Path(spec["result"]), json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
