"""`vllm-aimer eval`: what pruning costs in quality, measured on vLLM with the loader that serves.

For each (criterion, ratio) the plan is made here and served by a vLLM offline engine
with `--load-format aimer` in its own process (vllm_aimer.eval_worker); the engine's
`prompt_logprobs` give the log-probability of every document token. Ratio 0 is one dense
run (`prune_ratio` 0, loaded exactly as stock vLLM), shared by every criterion and the
reference for top-1 agreement. Every input is checked before the first engine starts;
`eval.json` is rewritten after each run, and runs already in it are skipped, so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from tqdm.auto import tqdm

from vllm_aimer.channel import engine_env
from vllm_aimer.checkpoint import Checkpoint, open_checkpoint
from vllm_aimer.criteria import DEFAULT_SEED, check_criteria, criterion_plan
from vllm_aimer.errors import AimerError
from vllm_aimer.eval_data import load_documents
from vllm_aimer.layout import ExpertLayout, expert_layout
from vllm_aimer.files import atomic_write_text, ensure_writable_dir
from vllm_aimer.outputs import write_plan_outputs
from vllm_aimer.constraints import check_ratio, prune_count
from vllm_aimer.plan import PLAN_FILE, Plan
from vllm_aimer.scoring import ScoringResult, score_checkpoint
from vllm_aimer.units import human_bytes

__all__ = ["EVAL_FILE", "CSV_FILE", "PNG_FILE", "DENSE", "DEFAULT_RATIOS", "CSV_COLUMNS",
           "EvalRun", "EvalReport", "RunSpec", "parse_ratios", "run_specs", "weight_bytes",
           "eval_csv", "render_table", "run_eval"]

EVAL_FILE, CSV_FILE, PNG_FILE = "eval.json", "eval.csv", "eval.png"
DENSE = "dense"
DEFAULT_RATIOS = "0,0.25,0.5"
CSV_COLUMNS = ["criterion", "ratio", "experts", "kept_experts", "tokens", "nll_mean",
               "perplexity", "top1_agreement_vs_dense", "weight_bytes", "tokens_per_s"]


class EvalRun(BaseModel):
    """One engine's measurements: a row of eval.json and eval.csv."""
    criterion: str
    """A pruning criterion, or "dense" for ratio 0 (shared by all criteria)."""
    ratio: float
    """The requested ratio; experts_per_layer gives what was actually pruned."""
    experts_per_layer: list[int]
    """[experts in the checkpoint, experts the engine kept] per MoE layer."""
    tokens: int
    """Predicted tokens: every document token after the first."""
    nll_mean: float
    """Mean negative log-likelihood per predicted token (nats)."""
    perplexity: float
    """exp(total NLL / total predicted tokens)."""
    top1_agreement_vs_dense: float
    """Share of predicted positions whose most likely token equals the dense model's."""
    weight_bytes: int
    """Checkpoint bytes the engine loads: every tensor but the pruned experts'."""
    tokens_per_s: float
    """Prompt tokens per second of the engine's generate call (prompt_logprobs on)."""


class EvalReport(BaseModel):
    """eval.json: the inputs of a sweep and its runs (dense first, then by ratio)."""
    model: str
    """The checkpoint directory, resolved."""
    data: str
    """The documents file, resolved."""
    data_sha256: str = ""
    documents: int = 0
    """Documents used (after --limit)."""
    seed: int = DEFAULT_SEED
    max_model_len: int | None = None
    runs: list[EvalRun] = []

    def run(self, criterion: str, ratio: float) -> EvalRun | None:
        """The run of `criterion` at `ratio` (compared with math.isclose), or None."""
        return next((r for r in self.runs if r.criterion == criterion
                     and math.isclose(r.ratio, ratio)), None)


@dataclass(frozen=True)
class RunSpec:
    """One engine run to do: a criterion at a ratio, or DENSE at 0."""
    criterion: str
    ratio: float

    @property
    def name(self) -> str:
        """The run's file and log name: "dense", or "<criterion>-<ratio>"."""
        return DENSE if self.criterion == DENSE else f"{self.criterion}-{self.ratio:g}"


def parse_ratios(text: str | Sequence[float]) -> list[float]:
    """`0,0.25,0.5` -> [0.0, 0.25, 0.5]: each in [0, 1), sorted, without repeats.

    Args:
        text: comma-separated ratios (empty items skipped), or a sequence of numbers.

    Returns:
        The ratios, ascending.

    Raises:
        AimerError: an item is not a number or is outside [0, 1), or none is given.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    ratios: list[float] = []
    for raw in items:
        if isinstance(raw, str):
            if not raw.strip():
                continue
            try:
                value = float(raw)
            except ValueError:
                raise AimerError(f"ratio {raw.strip()!r} is not a number.",
                                 f"pass ratios in [0, 1) separated by commas, e.g. "
                                 f"--ratios {DEFAULT_RATIOS}.") from None
        else:
            value = raw
        try:
            value = check_ratio(value)
        except AimerError as e:
            raise AimerError(f"ratio {raw!s} is out of range: {e.problem}",
                             f"pass ratios in [0, 1), e.g. --ratios {DEFAULT_RATIOS}.") from None
        if value not in ratios:
            ratios.append(value)
    if not ratios:
        raise AimerError("no ratio was given.", f"pass e.g. --ratios {DEFAULT_RATIOS}.")
    return sorted(ratios)


def run_specs(ratios: Sequence[float], criteria: Sequence[str]) -> list[RunSpec]:
    """The dense run first (always: it is the reference for top-1 agreement), then every
    criterion at every non-zero ratio, ratio by ratio."""
    return [RunSpec(DENSE, 0.0)] + [RunSpec(c, r) for r in ratios if r > 0 for c in criteria]


def weight_bytes(ckpt: Checkpoint, layout: ExpertLayout, plan: Plan | None) -> int:
    """Bytes of every checkpoint tensor except those of the pruned experts (router rows of
    pruned experts, a few KiB, are not subtracted)."""
    if plan is None:
        return ckpt.total_bytes
    pruned = sum(layout.expert_bytes[layer][e] for layer in layout.layers
                 for e in plan.layer(layer).pruned)
    return ckpt.total_bytes - pruned


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_existing(path: Path, fresh: EvalReport) -> EvalReport:
    """The report to resume, or `fresh` when there is none; fails when it was made with
    other inputs (mixing them would compare apples with pears)."""
    if not path.is_file():
        return fresh
    try:
        old = EvalReport.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as e:
        raise AimerError(f"{path} exists but is not a readable eval report ({e}).",
                         "pass a new --output directory, or delete that file.") from None
    same = ("model", "data_sha256", "documents", "seed", "max_model_len")
    diff = [k for k in same if getattr(old, k) != getattr(fresh, k)]
    if diff:
        raise AimerError(
            f"{path} holds runs made with a different {', '.join(diff)} "
            f"({', '.join(f'{k}={getattr(old, k)!r}' for k in diff)}).",
            "pass a new --output directory, or the same model, data, --limit, --seed and "
            "--max-model-len to resume.")
    return old.model_copy(update={"data": fresh.data})


def eval_csv(report: EvalReport) -> str:
    """eval.csv's text: a CSV_COLUMNS header, then a row per run."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in report.runs:
        w.writerow([r.criterion, r.ratio, r.experts_per_layer[0], r.experts_per_layer[1],
                    r.tokens, f"{r.nll_mean:.6f}", f"{r.perplexity:.6f}",
                    f"{r.top1_agreement_vs_dense:.6f}", r.weight_bytes, f"{r.tokens_per_s:.1f}"])
    return buf.getvalue()


def render_table(report: EvalReport) -> str:
    """A Markdown table of the runs (the README shows one)."""
    dense = report.run(DENSE, 0.0)
    lines = ["| criterion | ratio | experts/layer | perplexity | Δ vs dense | top-1 agreement "
             "| weights | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in report.runs:
        delta = f"{(r.perplexity / dense.perplexity - 1) * 100:+.1f} %" if dense else "-"
        lines.append(f"| {r.criterion} | {r.ratio:g} | {r.experts_per_layer[0]} → "
                     f"{r.experts_per_layer[1]} | {r.perplexity:.3f} | {delta} | "
                     f"{r.top1_agreement_vs_dense:.3f} | {human_bytes(r.weight_bytes)} | "
                     f"{r.tokens_per_s:.0f} |")
    return "\n".join(lines)


def _run_engine(model: str, extra: dict, out: Path, spec: RunSpec, max_model_len: int | None,
                dtype: str) -> dict:
    """Start one engine in a fresh process; its output goes to logs/<run>.log."""
    (out / "logs").mkdir(exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    result = out / "runs" / f"{spec.name}.json"
    spec_file = out / "runs" / f".{spec.name}.spec.json"
    spec_file.write_text(json.dumps({"model": model, "extra": extra,
                                     "documents": str(out / "documents.json"),
                                     "max_model_len": max_model_len, "dtype": dtype,
                                     "result": str(result)}))
    log_path = out / "logs" / f"{spec.name}.log"
    # Each engine gets its own temp dir (vLLM leaves sockets there) and loader state.
    env = engine_env()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.run([sys.executable, "-m", "vllm_aimer.eval_worker",
                                   str(spec_file)], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, check=False)
    finally:
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)
    if proc.returncode != 0 or not result.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise AimerError(
            f"the vLLM engine of run {spec.name!r} failed (exit {proc.returncode}); the end of "
            f"its log {log_path}:\n  " + "\n  ".join(tail) + "\n",
            "fix what the log names, then rerun the same command: runs already done are "
            "kept and skipped.")
    spec_file.unlink(missing_ok=True)
    return json.loads(result.read_text())


def _metrics(spec: RunSpec, raw: dict, dense_top1: list[list[int]] | None, experts: int,
             kept: int, wbytes: int) -> EvalRun:
    docs = raw["docs"]
    tokens = sum(d["tokens"] for d in docs)
    if tokens == 0:
        raise AimerError("no document has two or more tokens, so nothing is predicted.",
                         "pass longer documents.")
    nll = sum(d["nll"] for d in docs)
    if dense_top1 is None:
        agree = 1.0
    else:
        same = sum(a == b for d, ref in zip(docs, dense_top1) for a, b in zip(d["top1"], ref))
        agree = same / tokens
    return EvalRun(criterion=spec.criterion, ratio=spec.ratio, experts_per_layer=[experts, kept],
                   tokens=tokens, nll_mean=nll / tokens, perplexity=math.exp(nll / tokens),
                   top1_agreement_vs_dense=agree, weight_bytes=wbytes,
                   tokens_per_s=raw["prompt_tokens"] / max(raw["seconds"], 1e-9))


def run_eval(model: str | Path, data: str | Path, output: str | Path,
             ratios: str | Sequence[float] = DEFAULT_RATIOS,
             criteria: str | Sequence[str] = "aimer,magnitude,random",
             max_model_len: int | None = None, limit: int | None = None,
             seed: int = DEFAULT_SEED, dtype: str = "auto", progress: bool = True,
             plot: bool = True) -> EvalReport:
    """Measure perplexity and top-1 agreement with the dense model at each ratio and
    criterion, one vLLM engine per run. Writes eval.json, eval.csv and eval.png (with
    plans/, runs/ and logs/) to `output` after every run, and resumes from an eval.json
    found there.

    Args:
        model: a local checkpoint directory.
        data: the documents (see vllm_aimer.eval_data).
        output: the output directory (created if needed).
        ratios: comma-separated or a sequence, each in [0, 1); the dense run (ratio 0)
            is always done.
        criteria: comma-separated or a sequence of CRITERIA names.
        max_model_len: the engines' max_model_len (longer documents are cut to fit);
            None for the model's.
        limit: use only the first `limit` documents.
        seed: the random criterion's seed.
        dtype: vLLM's --dtype ("auto": float32 on a CPU).
        progress: show a progress bar.
        plot: also write eval.png.

    Returns:
        The report, as written to eval.json.

    Raises:
        AimerError: an input is invalid (criteria, ratios, a ratio the router does not
            allow, limit < 1, max_model_len < 2, the documents, the checkpoint), the
            output directory is not writable, its eval.json was made with other inputs,
            an engine fails (the end of its log is quoted) or no document has two tokens.
    """
    # Everything the user typed is checked before the first (slow) engine starts.
    names = check_criteria(criteria)
    wanted = parse_ratios(ratios)
    if limit is not None and limit < 1:
        raise AimerError(f"--limit must be a positive number of documents, got {limit}.",
                         "pass e.g. --limit 100, or leave it out to use every document.")
    if max_model_len is not None and max_model_len < 2:
        raise AimerError(f"--max-model-len must be at least 2 tokens, got {max_model_len}.",
                         "pass e.g. --max-model-len 2048, or leave it out for the model's.")
    docs = load_documents(data, limit)
    ckpt = open_checkpoint(model)
    layout = expert_layout(ckpt)
    for r in wanted:
        if r > 0:
            prune_count(len(layout.layers), layout.router, r)
    out = ensure_writable_dir(output, "output")
    model_dir = str(Path(model).resolve())
    fresh = EvalReport(model=model_dir, data=str(Path(data).resolve()),
                       data_sha256=_sha256(Path(data)), documents=len(docs), seed=seed,
                       max_model_len=max_model_len)
    report = _load_existing(out / EVAL_FILE, fresh)
    atomic_write_text(out / "documents.json", json.dumps(docs))

    specs = run_specs(wanted, names)
    todo = [s for s in specs if report.run(s.criterion, s.ratio) is None]
    dense_file = out / "runs" / f"{DENSE}.json"
    if report.run(DENSE, 0.0) is not None and not dense_file.is_file():
        # The dense run's per-token data is the agreement reference: redo it if lost.
        report = report.model_copy(update={"runs": [r for r in report.runs
                                                    if r.criterion != DENSE]})
        todo.insert(0, RunSpec(DENSE, 0.0))
    scored: ScoringResult | None = None
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), unit="run",
               desc="vllm-aimer eval", disable=not progress)
    try:
        for spec in todo:
            bar.set_postfix_str(spec.name)
            if spec.criterion == DENSE:
                plan, extra = None, {"prune_ratio": 0.0, "plan_cache": False}
            else:
                if scored is None and spec.criterion in ("aimer", "magnitude"):
                    scored = score_checkpoint(ckpt, layout, progress=False)
                plan = criterion_plan(spec.criterion, ckpt, layout, spec.ratio, seed, scored)
                plan_dir = out / "plans" / spec.name
                plan_dir.mkdir(parents=True, exist_ok=True)
                write_plan_outputs(plan, plan_dir)
                extra = {"plan": str(plan_dir / PLAN_FILE)}
            raw = _run_engine(model_dir, extra, out, spec, max_model_len, dtype)
            dense_top1 = (None if spec.criterion == DENSE else
                          [d["top1"] for d in json.loads(dense_file.read_text())["docs"]])
            kept = plan.kept_per_layer if plan else layout.num_experts
            run = _metrics(spec, raw, dense_top1, layout.num_experts, kept,
                           weight_bytes(ckpt, layout, plan))
            report = report.model_copy(update={"runs": sorted(
                [*report.runs, run], key=lambda r: (r.ratio, r.criterion != DENSE,
                                                    r.criterion))})
            _write(report, out, plot)
            dense = report.run(DENSE, 0.0)
            bar.write(f"{spec.name:>16}: perplexity {run.perplexity:.4g}"
                      + (f" ({(run.perplexity / dense.perplexity - 1) * 100:+.1f} % vs dense)"
                         if dense and spec.criterion != DENSE else "")
                      + f", top-1 agreement {run.top1_agreement_vs_dense:.3f}, "
                      f"weights {human_bytes(run.weight_bytes)}, {run.tokens_per_s:.0f} tokens/s")
            bar.update(1)
    finally:
        bar.close()
    _write(report, out, plot)
    return report


def _write(report: EvalReport, out: Path, plot: bool) -> None:
    atomic_write_text(out / EVAL_FILE, report.model_dump_json(indent=1) + "\n")
    atomic_write_text(out / CSV_FILE, eval_csv(report))
    if plot and report.runs:
        from vllm_aimer.plots import eval_figure, save_png

        save_png(eval_figure(report), out / PNG_FILE)
