"""Plain floating-point weights (F32, BF16, F16, F64): `<proj>.weight`, or fused
`experts.<proj>` [E, ...] (dim 0 = expert); the values are the weights."""

from __future__ import annotations

from typing import Any

import torch

from vllm_aimer.dtypes import FLOAT_DTYPES
from vllm_aimer.encodings.base import (Encoding, Projection, QuantConfig, Scorer, Sums,
                                       only, row_spans)

SUFFIXES = frozenset({"weight", "bias"})
FUSED_SUFFIXES = frozenset({"", "_bias"})


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    main = "" if proj.fused else "weight"
    return proj.dtype(main) in FLOAT_DTYPES and only(proj, FUSED_SUFFIXES if proj.fused else SUFFIXES)


class PlainScorer(Scorer):
    """Rows of the weight in chunks, summed as they are (float32 runs, float64 totals);
    a fused tensor expert by expert (dim 0)."""

    def __init__(self, proj: Projection) -> None:
        self.info = proj.tensors["" if proj.fused else "weight"]
        self.fused = proj.fused
        self.reads = (self.info,)

    def add(self, f: Any, accs: list[Sums], chunk_elements: int) -> None:
        sl = f.get_slice(self.info.name)
        shape = self.info.shape
        if not self.fused:
            row_numel = self.info.numel // max(1, shape[0])
            for rows in row_spans(shape[0], row_numel, chunk_elements):
                accs[0].add(sl[rows])
            return
        if len(shape) == 1:
            for expert, acc in enumerate(accs):
                acc.add(sl[expert:expert + 1])
            return
        inner = shape[1]
        row_numel = self.info.numel // max(1, shape[0] * inner)
        for expert, acc in enumerate(accs):
            for rows in row_spans(inner, row_numel, chunk_elements):
                acc.add(sl[expert, rows])


def _scorer(quant: QuantConfig, proj: Projection) -> Scorer:
    return PlainScorer(proj)


ENCODING = Encoding(
    name="float", label="plain float weights (F32/BF16/F16: `<proj>.weight`, fused `experts.<proj>`)",
    suffixes=SUFFIXES, fused_suffixes=FUSED_SUFFIXES, matches=_matches, scorer=_scorer)


def encode(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A weight [out, in] as stored: `weight` in `dtype`."""
    return {"weight": w.to(dtype).contiguous()}
