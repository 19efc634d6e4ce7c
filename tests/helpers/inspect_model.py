"""Functions shipped to the vLLM worker with LLM.apply_model (must be importable there)."""


def expert_shapes(model) -> dict[str, list[int]]:
    """Expert weight shapes, and each router's output size (its weight may be
    repacked into another shape by the CPU backend after loading)."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(("experts.w13_weight", "experts.w2_weight")):
            out[name] = list(p.shape)
    for name, module in model.named_modules():
        if name.endswith((".gate", ".router")) and hasattr(module, "output_size"):
            out[f"{name}.weight"] = [int(module.output_size), int(module.input_size)]
    return out


def expert_maps(model) -> dict[str, list[int]]:
    """Each MoE layer's global->local expert map on this rank (vLLM's EP placement)."""
    out = {}
    for name, module in model.named_modules():
        if name.endswith(".experts") and hasattr(module, "expert_map"):
            m = module.expert_map
            out[name] = [] if m is None else [int(x) for x in m.tolist()]
    return out


def param_digests(model) -> dict[str, str]:
    """sha256 of every parameter's and buffer's bytes, as the worker holds them."""
    import hashlib

    import torch

    out = {}
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:  # vLLM's layerwise reload leaves some on the meta device
                out[f"{kind}:{name}"] = f"{t.dtype}{list(t.shape)}:meta"
                continue
            data = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            out[f"{kind}:{name}"] = f"{t.dtype}{list(t.shape)}:" + hashlib.sha256(data).hexdigest()
    return out


def drafter_expert_shapes(worker) -> dict[str, list[int]]:
    """Expert shapes of the speculative-decoding draft model (collective_rpc: runs on
    each worker, which holds the drafter next to the target model)."""
    return expert_shapes(worker.model_runner.drafter.model)
