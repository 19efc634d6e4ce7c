"""`vllm-aimer`: score, plan and inspect checkpoints offline (no vLLM engine needed)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_aimer.checkpoint import open_checkpoint
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout, expert_layout
from vllm_aimer.outputs import ensure_writable_dir, write_plan_outputs
from vllm_aimer.plan import Plan, group_ratios, make_plan, prune_count, read_plan
from vllm_aimer.report import human_bytes
from vllm_aimer.scoring import score_checkpoint


def _layout_facts(layout: ExpertLayout, fingerprint: str) -> dict:
    expert_bytes = sum(sum(layout.expert_bytes[layer]) for layer in layout.layers)
    return {"family": layout.arch.family, "moe_layers": list(layout.layers),
            "experts_per_layer": layout.num_experts, "top_k": layout.top_k,
            "routed_expert_bytes": expert_bytes,
            # Group-limited routers also need k to split over their groups.
            "max_prune_ratio": group_ratios(layout.num_experts, layout.top_k,
                                            layout.n_group, layout.topk_group)[-1],
            **({"expert_groups": layout.n_group, "topk_group": layout.topk_group}
               if layout.n_group > 1 else {}),
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
    ckpt = open_checkpoint(args.model)
    layout = expert_layout(ckpt)
    prune_count(len(layout.layers), layout.num_experts, layout.top_k, args.ratio,
                layout.n_group, layout.topk_group)
    out = ensure_writable_dir(args.output, "output")
    result = score_checkpoint(ckpt, layout, progress=not args.quiet)
    plan = make_plan(layout, result.scores, args.ratio, ckpt.fingerprint)
    written = write_plan_outputs(plan, out)
    _print_plan(plan, _layout_facts(layout, ckpt.fingerprint)["routed_expert_bytes"])
    print(f"scored {human_bytes(result.bytes_read)} of expert weights in {result.seconds:.2f} s")
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Check an external plan against a checkpoint and write it in our formats."""
    ckpt = open_checkpoint(args.model)
    layout = expert_layout(ckpt, scoring=False)
    plan = read_plan(args.plan, layout, ckpt.fingerprint)
    _print_plan(plan)
    if args.output:
        for path in write_plan_outputs(plan, ensure_writable_dir(args.output, "output")):
            print(f"wrote {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    ckpt = open_checkpoint(args.model)
    layout = expert_layout(ckpt, scoring=False)
    facts = _layout_facts(layout, ckpt.fingerprint)
    facts["total_bytes"] = ckpt.total_bytes
    facts["quantization"] = {
        "method": layout.quant.method, "description": layout.quant.describe(),
        "expert_encodings": list(layout.encodings), "scorable": layout.scorable,
        **({"why_not": layout.unscorable} if layout.unscorable else {})}
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    print(f"family            {facts['family']}")
    print(f"MoE layers        {len(layout.layers)} ({layout.layers[0]}..{layout.layers[-1]})")
    print(f"experts per layer {layout.num_experts}, top_k {layout.top_k}")
    print(f"weights           {human_bytes(ckpt.total_bytes)}, of which routed experts "
          f"{human_bytes(facts['routed_expert_bytes'])}")
    print(f"quantization      {layout.quant.describe()}; experts stored as "
          f"{', '.join(layout.encodings) or 'an unknown encoding'}")
    if layout.scorable:
        print("AIMER scoring     yes (scores dequantized weights)")
    else:
        print("AIMER scoring     no: prune with a plan file (`plan`), which needs no scores")
        print(f"                  {str(layout.unscorable).removeprefix('vllm-aimer: ')}")
    print(f"max prune ratio   {facts['max_prune_ratio']:.4g}")
    print(f"checkpoint        {ckpt.fingerprint}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vllm_aimer.demo import run_demo

    return run_demo(Path(args.workdir), args.ratio, Path(args.model) if args.model else None)


def cmd_fit(args: argparse.Namespace) -> int:
    """Size a model against N GPUs from headers or config.json alone (reads no weights)."""
    from vllm_aimer.fit import fit_options, load_model_facts, plan_fit, render_fit

    # Values arrive as strings and are checked by fit_options: one-line errors.
    opts = fit_options(gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       overhead_gib=args.overhead_gib, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, kv_cache_dtype=args.kv_cache_dtype,
                       ratio=args.ratio)
    facts, model_dir = load_model_facts(args.model)
    report = plan_fit(facts, opts, model_dir)
    print(json.dumps(report.to_json(), indent=1) if args.json else render_fit(report))
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-aimer",
        description="Calibration-free AIMER expert pruning for vLLM: score, plan, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score every routed expert and write a pruning plan")
    p.add_argument("model", help="local Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--ratio", type=float, required=True,
                   help="fraction of routed experts to prune, in [0, 1)")
    p.add_argument("--output", required=True,
                   help="directory for pruned_experts.json, plan.json and scores.csv")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("plan", help="check a pruned_experts.json/plan.json against a checkpoint")
    p.add_argument("model", help="local checkpoint directory")
    p.add_argument("plan", help="pruned_experts.json, plan.json, or a directory holding one")
    p.add_argument("--output", help="also write it as pruned_experts.json + plan.json here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", help="show a checkpoint's MoE layout (reads headers only)")
    p.add_argument("model", help="local checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="serve a tiny MoE pruned by AIMER and query it (no downloads)")
    p.add_argument("--workdir", default=".demo", help="where the model, plan and logs go")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of experts to prune")
    p.add_argument("--model", help="serve this checkpoint instead of the embedded tiny MoE")
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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_fit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AimerError as e:
        print(f"vllm-aimer: error: {str(e).removeprefix('vllm-aimer: ')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
