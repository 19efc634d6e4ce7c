"""NVFP4: FP4 (E2M1) codes, two per byte (low nibble first), one FP8 (E4M3) scale per
16 values and one float32 scale per tensor.

- ModelOpt (quant_method modelopt / modelopt_fp4, quant_algo NVFP4 or W4A16_NVFP4):
  `<proj>.weight` uint8 [R, C/2], `weight_scale` float8 [R, C/16], `weight_scale_2`
  float32 (+ `input_scale`); value = e2m1 x weight_scale x weight_scale_2.
- compressed-tensors `nvfp4-pack-quantized`: `weight_packed` uint8 [R, C/2],
  `weight_scale` float8 [R, C/16], `weight_global_scale` float32 (+
  `input_global_scale`); value = e2m1 x weight_scale / weight_global_scale.

(vLLM's `break_fp4_bytes` / `dequantize_to_dtype` in nvfp4_emulation_utils and
compressed-tensors' `unpack_fp4_from_uint8` + `dequantize`; vLLM uses 1/global as
scale_2.)"""

from __future__ import annotations

from typing import Any

from vllm_aimer.lazy import torch

from vllm_aimer.encodings.base import (Encoding, MatrixScorer, Projection, QuantConfig, Sums,
                                       add_fp4_groups, f64, has, modelopt_algo,
                                       modelopt_group_size, only, refuse, require_ct_fp4_scheme,
                                       row_spans)

__all__ = ["ENCODING", "GROUP", "MODELOPT", "CT", "SUFFIXES", "Nvfp4Scorer"]

GROUP = 16
MODELOPT = frozenset({"weight", "weight_scale", "weight_scale_2", "input_scale", "bias"})
CT = frozenset({"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale",
                "bias"})
SUFFIXES = MODELOPT | CT


def _flavour(proj: Projection) -> str | None:
    if proj.fused or proj.dtype("weight_scale") != "F8_E4M3":
        return None
    if proj.dtype("weight") == "U8" and has(proj, "weight_scale_2") and only(proj, MODELOPT):
        return "modelopt"
    if proj.dtype("weight_packed") == "U8" and has(proj, "weight_global_scale") and only(proj, CT):
        return "compressed-tensors"
    return None


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    return _flavour(proj) is not None


class Nvfp4Scorer(MatrixScorer):
    """NVFP4 values times their group's FP8 scale and the global scale, in the ModelOpt
    or compressed-tensors flavour (see above)."""

    def __init__(self, proj: Projection, flavour: str) -> None:
        t = proj.tensors
        main, glob = (("weight", "weight_scale_2") if flavour == "modelopt"
                      else ("weight_packed", "weight_global_scale"))
        self.packed, self.scale, self.glob = t[main], t["weight_scale"], t[glob]
        super().__init__(proj, self.packed, self.scale, self.glob)
        self.flavour = flavour

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        g = float(f64(f.get_tensor(self.glob.name)).reshape(-1)[0])
        factor = g if self.flavour == "modelopt" else 1.0 / g
        rows, width = self.packed.shape
        sl, ssl = f.get_slice(self.packed.name), f.get_slice(self.scale.name)
        for span in row_spans(rows, width * 2, chunk_elements):
            packed = sl[span].view(torch.uint8)
            groups = packed.reshape(packed.shape[0], width // (GROUP // 2), GROUP // 2)
            add_fp4_groups(acc, groups, f64(ssl[span]) * factor)


def _scorer(quant: QuantConfig, proj: Projection) -> Nvfp4Scorer:
    flavour = _flavour(proj)
    assert flavour is not None
    if flavour == "modelopt":
        algo = modelopt_algo(quant) if quant.method and quant.method.startswith("modelopt") else ""
        group = modelopt_group_size(quant) or GROUP
        if "NVFP4" not in algo or group != GROUP:
            raise refuse(proj, f"ModelOpt NVFP4 tensors under quant_method {quant.method!r}, "
                         f"quant_algo {algo or None!r}, group_size {group}; expected quant_algo "
                         "NVFP4 (or W4A16_NVFP4) with group_size 16.",
                         "check quantization_config (or hf_quant_config.json), or pass a plan "
                         "file (a plan needs no scores).")
    else:
        require_ct_fp4_scheme(quant, proj, GROUP, "compressed-tensors NVFP4 tensors")
    packed = proj.tensors["weight" if flavour == "modelopt" else "weight_packed"]
    scale = proj.tensors["weight_scale"]
    glob = proj.tensors["weight_scale_2" if flavour == "modelopt" else "weight_global_scale"]
    if (len(packed.shape) != 2 or packed.shape[1] % (GROUP // 2)
            or tuple(scale.shape) != (packed.shape[0], packed.shape[1] // (GROUP // 2))
            or glob.numel != 1):
        raise refuse(proj, "NVFP4 expects packed [R, C/2] with C a multiple of 16, scales "
                     "[R, C/16] and one global scale.", "use the checkpoint as released.")
    return Nvfp4Scorer(proj, flavour)


ENCODING = Encoding(
    name="nvfp4", label="NVFP4 (ModelOpt `weight` uint8 + `weight_scale` + `weight_scale_2`; "
    "compressed-tensors `weight_packed` + `weight_scale` + `weight_global_scale`)",
    suffixes=SUFFIXES, matches=_matches, scorer=_scorer)
