"""`vllm-aimer`: score, plan, export and inspect checkpoints offline (no vLLM engine needed)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout, expert_layout
from vllm_aimer.files import atomic_write_text, ensure_writable_dir
from vllm_aimer.options import number, positive_int
from vllm_aimer.outputs import write_plan_outputs
from vllm_aimer.constraints import (Deployment, Gpu, allowed_ratios, check_ratio,
                                   prune_count, ratio_text)
from vllm_aimer.plan import Plan
from vllm_aimer.provenance import PROVENANCE_DIR, PROVENANCE_FILE, read_provenance
from vllm_aimer.plan_formats import (FORMATS, WRITABLE_FORMATS, ascend_ratio, file_format,
                                     read_plan_file, write_plan_as)
from vllm_aimer.scoring import DEVICES, score_checkpoint, scoring_device
from vllm_aimer.units import human_bytes

__all__ = ["main", "build_parser", "build_convert_parser"]


def _safe_ratios(layout: ExpertLayout, ep_size: int) -> dict[str, list[float]]:
    """Per GPU kind, the prune ratios the loader accepts there with `ep_size` EP ranks."""
    return {gpu.value: allowed_ratios(layout.router, Deployment(ep_size, gpu)) for gpu in Gpu}


def _layout_facts(layout: ExpertLayout, fingerprint: str, ep_size: int = 1) -> dict:
    expert_bytes = sum(sum(layout.expert_bytes[layer]) for layer in layout.layers)
    safe = _safe_ratios(layout, ep_size)
    return {"family": layout.arch.family, "moe_layers": list(layout.layers),
            **({"mtp_layers": list(layout.mtp_layers)} if layout.mtp_layers else {}),
            "experts_per_layer": layout.num_experts, "top_k": layout.top_k,
            "routed_expert_bytes": expert_bytes,
            # Group-limited routers also need k to split over their groups.
            "max_prune_ratio": safe[Gpu.ANY.value][-1],
            **({"expert_groups": layout.n_group, "topk_group": layout.topk_group}
               if layout.n_group > 1 else {}),
            "expert_parallel_size": ep_size,
            "safe_prune_ratios": safe,
            "checkpoint": fingerprint}


def _print_plan(plan: Plan, expert_bytes: int | None = None) -> None:
    print(f"family {plan.family}: {len(plan.layers)} MoE layers, experts per layer "
          f"{plan.num_experts} -> {plan.kept_per_layer} (top_k {plan.top_k}), "
          f"ratio {plan.ratio:g}, {plan.total_pruned} experts pruned")
    if expert_bytes is not None:
        saved = expert_bytes * plan.pruned_per_layer // max(1, plan.num_experts)
        print(f"routed expert bytes {human_bytes(expert_bytes)}, about {human_bytes(saved)} "
              "never loaded")
    print(f"plan {plan.plan_hash}, checkpoint {plan.checkpoint[:16]}")


def cmd_score(args: argparse.Namespace) -> int:
    from vllm_aimer.criteria import check_criteria, criterion_plan

    [criterion] = check_criteria([args.criterion])
    threads = _threads_arg(args.threads)
    ckpt = open_checkpoint(args.model)
    layout = expert_layout(ckpt)
    prune_count(len(layout.layers), layout.router, args.ratio)
    out = ensure_writable_dir(args.output, "output")
    device, _ = scoring_device(args.device)
    # Random reads no weights, unless the plot needs the weight-based scores.
    result = (score_checkpoint(ckpt, layout, progress=not args.quiet, threads=threads,
                               device=device)
              if criterion != "random" or args.plot else None)
    plan = criterion_plan(criterion, ckpt, layout, args.ratio, args.seed, result)
    written = write_plan_outputs(plan, out, model=str(args.model))
    _print_plan(plan, _layout_facts(layout, ckpt.fingerprint)["routed_expert_bytes"])
    if result is not None:
        print(f"scored {human_bytes(result.bytes_read)} of expert weights in "
              f"{result.seconds:.2f} s ({human_bytes(result.bytes_per_second)}/s, "
              f"{result.where()})")
    if args.plot:
        from vllm_aimer.plots import panel_from_plan, save_png, scores_figure

        # AIMER and magnitude side by side (the paper's Figure 2), plus the chosen one.
        shown = ["aimer", "magnitude"] + ([criterion] if criterion == "random" else [])
        plans = [plan if c == criterion else
                 criterion_plan(c, ckpt, layout, args.ratio, args.seed, result) for c in shown]
        written.append(save_png(scores_figure([panel_from_plan(p) for p in plans]),
                                out / "scores.png"))
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """scores.csv files side by side as one heatmap PNG, or an eval.json as eval.png."""
    from vllm_aimer.plots import eval_figure, read_scores_csv, save_png, scores_figure

    first = Path(args.files[0])
    if first.suffix == ".json":
        from vllm_aimer.evaluate import EvalReport

        try:
            report = EvalReport.model_validate_json(first.read_bytes())
        except (OSError, ValueError) as e:
            raise AimerError(f"{first} is not an eval.json written by `vllm-aimer eval` ({e}).",
                             "pass an eval.json, or scores.csv files.") from None
        fig, default = eval_figure(report), first.with_name("eval.png")
    else:
        fig = scores_figure([read_scores_csv(f) for f in args.files])
        default = first.with_name("scores.png")
    out = Path(args.output) if args.output else default
    ensure_writable_dir(out.parent, "output")
    print(f"wrote {save_png(fig, out)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vllm_aimer.evaluate import render_table, run_eval

    report = run_eval(args.model, args.data, args.output, ratios=args.ratios,
                      criteria=args.criteria, max_model_len=args.max_model_len,
                      limit=args.limit, seed=args.seed, dtype=args.dtype,
                      progress=not args.quiet)
    print(render_table(report))
    out = Path(args.output)
    for name in ("eval.json", "eval.csv", "eval.png"):
        print(f"wrote {out / name}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Check an external plan (any known format) against a checkpoint and write it in
    our formats."""
    ratio = _ratio_arg(args.ratio)
    ckpt = open_checkpoint(args.model)
    layout = expert_layout(ckpt, scoring=False)
    plan = read_plan_file(args.plan, layout, ckpt, ratio)
    print(f"format {FORMATS[file_format(args.plan, ratio is not None)]}")
    _print_plan(plan)
    if args.output:
        out = ensure_writable_dir(args.output, "output")
        for path in write_plan_outputs(plan, out, model=str(args.model)):
            print(f"wrote {path}")
    return 0


def cmd_plan_convert(args: argparse.Namespace) -> int:
    """A plan file in another format, checked against the checkpoint it is for."""
    ratio = _ratio_arg(args.ratio)
    ckpt = open_checkpoint(args.checkpoint)
    layout = expert_layout(ckpt)
    plan = read_plan_file(args.input, layout, ckpt, ratio)
    text = write_plan_as(plan, args.to, model=str(args.checkpoint), ckpt=ckpt, layout=layout)
    if args.output:
        path = Path(args.output)
        ensure_writable_dir(path.parent, "output")
        atomic_write_text(path, text)
        print(f"wrote {path} ({FORMATS[args.to]})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.to == "vllm-ascend" and plan.total_pruned:
        print(f"vllm-ascend: pass expert_prune_ratio {ascend_ratio(plan)!r} with this file "
              f"(it keeps int({plan.num_experts} x (1 - ratio)) = {plan.kept_per_layer} experts "
              "per layer)", file=sys.stderr)
    return 0


def _threads_arg(value: str | None) -> int | None:
    if value is None:
        return None
    return positive_int(value, "--threads",
                        "pass e.g. --threads 8, or leave it out (one per CPU, at least 4).")


def _ratio_arg(value: str | None) -> float | None:
    if value is None:
        return None
    return check_ratio(number(value, "--ratio", "pass e.g. --ratio 0.5."))


def cmd_export(args: argparse.Namespace) -> int:
    """Write the pruned checkpoint (streamed, bounded memory)."""
    from vllm_aimer.export import check_output_dir, export_checkpoint, export_plan, parse_size

    ratio = _ratio_arg(args.ratio)
    if args.plan is None and ratio is None:
        raise AimerError("export needs --ratio R or --plan FILE.",
                         "pass --ratio 0.5 to prune half of the experts by AIMER, or --plan "
                         "with a plan file.")
    ckpt = open_checkpoint(args.model)
    layout = expert_layout(ckpt)
    parse_size(args.max_shard_size)
    # Everything that can be refused is refused before scoring or writing.
    check_output_dir(Path(args.output), ckpt.directory, args.force)
    plan, criterion, source = export_plan(ckpt, layout, ratio=ratio, plan_path=args.plan,
                                          progress=not args.quiet)
    result = export_checkpoint(ckpt, layout, plan, args.output,
                               max_shard_size=args.max_shard_size, force=args.force,
                               criterion=criterion, requested_ratio=ratio, plan_source=source)
    _print_plan(plan)
    print(f"exported {result.tensors} tensors ({human_bytes(result.total_bytes)}, source "
          f"{human_bytes(ckpt.total_bytes)}) in {len(result.shards)} shard(s) to {result.output}")
    print(f"copied {len(result.copied)} other file(s); provenance in "
          f"{result.output / PROVENANCE_DIR / PROVENANCE_FILE}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    ep_size = _ep_size(args.ep_size)
    ckpt = open_checkpoint(args.model)
    layout = expert_layout(ckpt, scoring=False)
    facts = _layout_facts(layout, ckpt.fingerprint, ep_size)
    facts["total_bytes"] = ckpt.total_bytes
    facts["quantization"] = {
        "method": layout.quant.method, "description": layout.quant.describe(),
        "expert_encodings": list(layout.encodings), "scorable": layout.scorable,
        **({"why_not": layout.unscorable} if layout.unscorable else {})}
    provenance = read_provenance(ckpt.directory)
    if provenance:
        facts["provenance"] = provenance
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    print(f"family            {facts['family']}")
    print(f"MoE layers        {len(layout.layers)} ({layout.layers[0]}..{layout.layers[-1]})")
    print(f"experts per layer {layout.num_experts}, top_k {layout.top_k}")
    print(f"weights           {human_bytes(ckpt.total_bytes)}, of which routed experts "
          f"{human_bytes(facts['routed_expert_bytes'])}")
    if layout.mtp_layers:
        print(f"MTP layers        {', '.join(map(str, layout.mtp_layers))} (pruned like a "
              "trunk layer, not counted in the ratio)")
    print(f"quantization      {layout.quant.describe()}; experts stored as "
          f"{', '.join(layout.encodings) or 'an unknown encoding'}")
    if layout.scorable:
        print("AIMER scoring     yes (scores dequantized weights)")
    else:
        print("AIMER scoring     no: prune with a plan file (`plan`), which needs no scores")
        print(f"                  {str(layout.unscorable).removeprefix('vllm-aimer: ')}")
    print(f"max prune ratio   {facts['max_prune_ratio']:.4g}")
    where = f", {ep_size} expert-parallel ranks" if ep_size > 1 else ""
    print(f"safe prune ratios (the loader refuses others{where}):")
    for gpu in Gpu:
        ratios = facts["safe_prune_ratios"][gpu.value]
        print(f"  {gpu.label}: {', '.join(ratio_text(r) for r in ratios)}")
    print(f"checkpoint        {ckpt.fingerprint}")
    if provenance:
        src = provenance.get("source", {})
        print(f"exported by       vllm-aimer {provenance.get('vllm_aimer_version')} on "
              f"{provenance.get('created')}")
        print(f"  from            {src.get('path')} ({src.get('experts_per_layer')} experts per "
              f"layer, checkpoint {str(src.get('fingerprint'))[:16]})")
        print(f"  plan            {provenance.get('plan_source')}, ratio "
              f"{provenance.get('ratio'):g}, plan {provenance.get('plan_hash')}")
        print(f"  criterion       {provenance.get('criterion')}")
    return 0


def _ep_size(value: str | None) -> int:
    if value is None:
        return 1
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise AimerError(f"--ep-size must be a positive integer, got {value!r}.",
                         "pass the expert-parallel size you serve with (data x tensor "
                         "parallel size with --enable-expert-parallel), e.g. --ep-size 8.")
    return size


def cmd_demo(args: argparse.Namespace) -> int:
    from vllm_aimer.demo import run_demo

    return run_demo(Path(args.workdir), args.ratio, Path(args.model) if args.model else None)


def cmd_fit(args: argparse.Namespace) -> int:
    """Size a model against N GPUs from headers or config.json alone (reads no weights)."""
    from vllm_aimer.fit import fit_json, fit_options, load_model_facts, plan_fit, render_fit

    # Values arrive as strings and are checked by fit_options: one-line errors.
    opts = fit_options(gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       overhead_gib=args.overhead_gib, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, kv_cache_dtype=args.kv_cache_dtype,
                       ratio=args.ratio, expert_parallel=args.expert_parallel, gpu=args.gpu)
    facts, model_dir = load_model_facts(args.model)
    report = plan_fit(facts, opts, model_dir)
    print(json.dumps(fit_json(report), indent=1) if args.json else render_fit(report))
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    """The `vllm-aimer` parser: one subcommand each, its handler in `func`."""
    parser = argparse.ArgumentParser(
        prog="vllm-aimer",
        description="Calibration-free AIMER expert pruning for vLLM: score, plan, inspect, eval.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score every routed expert and write a pruning plan")
    p.add_argument("model", help="local Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--ratio", type=float, required=True,
                   help="fraction of routed experts to prune, in [0, 1)")
    p.add_argument("--output", required=True,
                   help="directory for pruned_experts.json, plan.json and scores.csv")
    p.add_argument("--criterion", default="aimer",
                   help="aimer (default), or a baseline: magnitude, random (see README)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    p.add_argument("--plot", action="store_true",
                   help="also write scores.png: AIMER and magnitude heatmaps side by side")
    p.add_argument("--threads", help="CPU threads reducing the weights (default: one per "
                                      "CPU, at least 4; scores do not depend on it)")
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="where plain float weights are reduced: cpu (default), cuda (a GPU; "
                        "imports torch, a few seconds), or auto (cuda only if torch is loaded "
                        "already, i.e. never from this command)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("plot", help="draw scores.csv heatmaps (side by side) or an eval.json")
    p.add_argument("files", nargs="+", help="scores.csv files, or one eval.json")
    p.add_argument("--output", help="PNG path (default: scores.png / eval.png beside the "
                                    "first file)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "eval", help="perplexity and top-1 agreement at several prune ratios, on vLLM",
        description="For each criterion and ratio, serve MODEL pruned with vLLM offline "
                    "(--load-format aimer), score every document token through "
                    "prompt_logprobs and write eval.json, eval.csv and eval.png to --output. "
                    "Ratio 0 is the dense model. Rerun the same command to resume.")
    p.add_argument("model", help="local checkpoint directory")
    p.add_argument("--data", required=True,
                   help=".txt (one document per line) or .jsonl ({\"text\": ...}, or OpenAI "
                        "completion/chat request bodies)")
    p.add_argument("--ratios", default="0,0.25,0.5", help="comma-separated, each in [0, 1)")
    p.add_argument("--output", required=True, help="directory for eval.json/csv/png, plans, logs")
    p.add_argument("--criteria", default="aimer,magnitude,random",
                   help="comma-separated: aimer, magnitude, random")
    p.add_argument("--max-model-len", type=int,
                   help="truncate documents to this many tokens (default: the model's)")
    p.add_argument("--limit", type=int, help="use only the first N documents")
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    p.add_argument("--dtype", default="auto",
                   help="vLLM --dtype (default auto; float32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "plan", help="check a plan file (any known format) against a checkpoint; "
                     "`plan convert` converts between formats",
        epilog="Formats (detected from the content): " + "; ".join(
            f"{k}: {v}" for k, v in FORMATS.items()) + ". To convert: `vllm-aimer plan "
            "convert IN --to FORMAT --checkpoint MODEL [--output FILE]`.")
    p.add_argument("model", help="local checkpoint directory")
    p.add_argument("plan", help="a plan file, or a directory holding plan.json, "
                                "pruned_experts.json or vllm_profile.json")
    p.add_argument("--ratio", help="expert_prune_ratio for vllm-ascend ordered expert lists "
                                   "(the only format that takes one)")
    p.add_argument("--output", help="also write it as pruned_experts.json, plan.json and "
                                    "vllm_profile.json here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "export", help="write the pruned checkpoint (streamed: the dense model is never held)",
        description="Stream the checkpoint's tensors through the same pruning the loader "
                    "applies into new safetensors shards: pruned experts are never read, "
                    "kept ones renumbered, routers sliced, quantized bytes kept. config.json "
                    "gets the kept expert count; tokenizer and other files are copied; "
                    f"{PROVENANCE_DIR}/ holds the plan files and {PROVENANCE_FILE}. Written "
                    "to a temporary directory and renamed: a failure leaves nothing.")
    p.add_argument("model", help="local checkpoint directory")
    p.add_argument("--ratio", help="prune this fraction of routed experts by AIMER (with "
                                   "--plan: the ratio of a vllm-ascend ordered list)")
    p.add_argument("--plan", help="a plan file in any known format (see `plan --help`)")
    p.add_argument("--output", required=True, help="new or empty directory for the export")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest shard, e.g. 5GB (10^9 bytes) or 2GiB (default 5GB)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --output (only once the export is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="show a checkpoint's MoE layout (reads headers only)")
    p.add_argument("model", help="local checkpoint directory")
    p.add_argument("--ep-size", help="expert-parallel size to list safe ratios for "
                                     "(default 1: no expert parallelism)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="serve the small demo MoE pruned by AIMER and query it "
                                    "(no downloads)")
    p.add_argument("--workdir", default=".demo", help="where the model, plan and logs go")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of experts to prune")
    p.add_argument("--model", help="serve this checkpoint instead of the embedded demo MoE")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "fit", help="smallest prune ratio that fits the model on N GPUs (reads no weights)",
        description="Size a MoE model's weights and KV cache against GPU memory and print the "
                    "smallest uniform prune ratio that fits, a table for 1/2/4/8 GPUs and the "
                    "`vllm serve` command. Exits 1 when --gpus is given and nothing fits.")
    p.add_argument("model", help="checkpoint directory (sizes from safetensors headers) or "
                                 "config.json (sizes from the architecture table)")
    p.add_argument("--gpus", help="tensor-parallel GPU count to plan for")
    p.add_argument("--gpu-memory-gib", help="memory of one GPU in GiB (default 80)")
    p.add_argument("--gpu-memory-utilization",
                   help="fraction of GPU memory vLLM may use, in (0, 1] (default 0.9)")
    p.add_argument("--overhead-gib",
                   help="per-GPU runtime overhead: activations, CUDA graphs (default 1.5)")
    p.add_argument("--max-model-len",
                   help="tokens per sequence (default: the model's max_position_embeddings)")
    p.add_argument("--max-num-seqs",
                   help="full-length sequences the KV cache must hold (default 1)")
    p.add_argument("--kv-cache-dtype", help="auto (model dtype), fp8, bfloat16, ... (default auto)")
    p.add_argument("--ratio", help="prune ratio to report pruned weights at (default 0.5)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="serve with --enable-expert-parallel: only ratios whose kept count "
                        "splits evenly over the GPUs are offered")
    p.add_argument("--gpu", help="GPU kind whose MoE kernel limits apply: any (default) or "
                                 "blackwell (kept count a multiple of 4, above top_k)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_fit)
    return parser


def build_convert_parser() -> argparse.ArgumentParser:
    """The parser of `vllm-aimer plan convert` (its arguments follow those two words)."""
    p = argparse.ArgumentParser(
        prog="vllm-aimer plan convert",
        description="Convert a plan file between formats, checked against the checkpoint it "
                    "is for. Input formats (detected): " + "; ".join(FORMATS.values()) + ".")
    p.add_argument("input", help="plan file (or a directory holding one)")
    p.add_argument("--to", required=True, choices=WRITABLE_FORMATS, help="output format")
    p.add_argument("--checkpoint", required=True, help="the checkpoint the plan is for")
    p.add_argument("--ratio", help="expert_prune_ratio of a vllm-ascend input")
    p.add_argument("--output", help="file to write (default: standard output)")
    p.set_defaults(func=cmd_plan_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `vllm-aimer` command (the console script).

    Args:
        argv: the arguments after the program name; None for sys.argv[1:].

    Returns:
        The exit status: 0 on success, 2 after printing an AimerError as one
        `vllm-aimer: error: ...` line on stderr, `fit`'s own status for `fit`.

    Raises:
        SystemExit: argparse rejected the arguments or printed help.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["plan", "convert"]:
        # `plan MODEL PLAN` keeps its positional form; `plan convert` is routed here
        # (a checkpoint directory literally named "convert" can be passed as ./convert).
        args = build_convert_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AimerError as e:
        print(f"vllm-aimer: error: {str(e).removeprefix('vllm-aimer: ')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
