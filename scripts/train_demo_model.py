"""Train the demo model: a small Qwen3-MoE on the Python standard library's own sources.

    .venv/bin/python scripts/train_demo_model.py            # what `make train-demo-model` runs

Every Python installation carries its standard library, so the corpus needs no download:
the top-level `*.py` modules of `sysconfig.get_paths()["stdlib"]`, sorted by name. Every
tenth module is held out: the held-out ones become the eval data set
(benchmarks/data/stdlib-heldout.jsonl), the rest train a byte-level BPE tokenizer (with
`tokenizers`) and the model (transformers' Qwen3MoeForCausalLM, with its router
load-balancing loss so that all experts get work). Everything is seeded and runs on a fixed
number of threads, so the same Python (its stdlib is the corpus) and torch give the same
bytes; the corpus's sha256 is recorded in the model's training.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "vllm_aimer" / "demo_model"
HELDOUT = ROOT / "benchmarks" / "data" / "stdlib-heldout.jsonl"

# A qwen3_moe small enough to commit (about 5 MB in bfloat16) and to train in minutes on
# two CPU cores, shaped like the real family: every layer MoE, top-2 of 16 experts.
ARCH = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16,
            num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
            norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False,
            router_aux_loss_coef=0.01, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
HELDOUT_CHARS = 1200  # one eval document: a slice of a held-out module


def corpus() -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    """(train modules, held-out modules, sha256 of all text): (name, source) pairs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"), key=lambda p: p.name)
    digest = hashlib.sha256()
    train, held = [], []
    for i, f in enumerate(files):
        text = f.read_text(encoding="utf-8", errors="replace")
        digest.update(f.name.encode() + b"\0" + text.encode() + b"\0")
        (held if i % 10 == 0 else train).append((f.name, text))
    return train, held, digest.hexdigest()


def heldout_documents(held: list[tuple[str, str]], count: int) -> list[dict]:
    """Consecutive slices of the held-out modules, cut at line ends, round-robin over files."""
    per_file: list[list[str]] = []
    for _, text in held:
        docs, cur = [], ""
        for line in text.splitlines(keepends=True):
            cur += line
            if len(cur) >= HELDOUT_CHARS:
                docs.append(cur)
                cur = ""
        per_file.append(docs)
    out: list[dict] = []
    for round_ in range(max(len(d) for d in per_file)):
        for (name, _), docs in zip(held, per_file):
            if round_ < len(docs) and len(out) < count:
                out.append({"text": docs[round_], "source": f"{name}#{round_}"})
    return out


def train_tokenizer(texts: list[str], vocab: int, directory: Path) -> "object":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=MODEL_DIR)
    p.add_argument("--heldout", type=Path, default=HELDOUT,
                   help="where the held-out eval documents go (.jsonl)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heldout-docs", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)

    import transformers

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    train, held, digest = corpus()
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    tok = train_tokenizer([t for _, t in train], ARCH["vocab_size"], out)
    ids: list[int] = []
    for _, text in train:  # documents joined by </s>, as a causal LM sees a stream
        ids += tok(text, add_special_tokens=False)["input_ids"] + [ARCH["eos_token_id"]]
    stream = torch.tensor(ids, dtype=torch.long)
    print(f"corpus: {len(train)} training modules, {len(held)} held out, "
          f"{len(stream)} training tokens, sha256 {digest[:16]}", flush=True)

    config = transformers.Qwen3MoeConfig(**ARCH, output_router_logits=True)
    model = transformers.Qwen3MoeForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    for step in range(args.steps):
        starts = torch.randint(0, len(stream) - args.seq - 1, (args.batch,), generator=g)
        batch = torch.stack([stream[s:s + args.seq] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        outputs = model(input_ids=batch, labels=batch)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(outputs.loss.detach()))
        if step % 50 == 0 or step == args.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step:5d}  loss {recent:.3f}  {time.perf_counter() - started:.0f} s",
                  flush=True)

    model.config.output_router_logits = False
    model = model.to(getattr(torch, args.dtype))
    model.save_pretrained(out)
    docs = heldout_documents(held, args.heldout_docs)
    args.heldout.parent.mkdir(parents=True, exist_ok=True)
    args.heldout.write_text("".join(json.dumps(d) + "\n" for d in docs))
    record = {"corpus": "top-level *.py modules of the Python standard library, sorted; "
                        "every tenth held out",
              "python": sys.version.split()[0], "torch": torch.__version__,
              "transformers": transformers.__version__, "corpus_sha256": digest,
              "train_modules": len(train), "heldout_modules": [n for n, _ in held],
              "train_tokens": len(stream), "steps": args.steps, "batch": args.batch,
              "seq": args.seq, "lr": args.lr, "seed": args.seed, "threads": args.threads,
              "dtype": args.dtype, "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.2f} MiB) and "
          f"{args.heldout} ({len(docs)} documents) in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
