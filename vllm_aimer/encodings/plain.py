"""Plain floating-point weights (F32, BF16, F16, F64): `<proj>.weight`, or fused
`experts.<proj>` [E, ...] (dim 0 = expert); the values are the weights."""

from __future__ import annotations

from typing import Any

from vllm_aimer.dtypes import FLOAT_DTYPES
from vllm_aimer.encodings.base import Encoding, Projection, QuantConfig, Scorer, Sums, only
from vllm_aimer.encodings.reduce import float_sums

__all__ = ["ENCODING", "SUFFIXES", "FUSED_SUFFIXES", "PlainScorer"]

SUFFIXES = frozenset({"weight", "bias"})
FUSED_SUFFIXES = frozenset({"", "_bias"})


def _matches(quant: QuantConfig, proj: Projection) -> bool:
    main = "" if proj.fused else "weight"
    return proj.dtype(main) in FLOAT_DTYPES and only(proj, FUSED_SUFFIXES if proj.fused else SUFFIXES)


class PlainScorer(Scorer):
    """The weight's bytes straight from the shard's memory map, in chunks of
    `chunk_elements` (see `reduce.float_sums`); a fused tensor expert by expert (dim 0).
    Each chunk's pages are let go once summed, so resident memory stays at a few
    chunks per thread however large the tensor."""

    threaded = True
    plain_float = True

    def __init__(self, proj: Projection) -> None:
        self.info = proj.tensors["" if proj.fused else "weight"]
        self.fused = proj.fused
        self.reads = (self.info,)

    def add(self, f: Any, accs: list[Sums], chunk_elements: int) -> None:
        values = f.array(self.info)
        size = values.itemsize
        per = values.size // len(accs) if self.fused else values.size
        step = max(1, chunk_elements)
        for expert, acc in enumerate(accs):
            first = expert * per
            for start in range(first, first + per, step):
                stop = min(first + per, start + step)
                acc.add_totals(*float_sums(values[start:stop], self.info.dtype), stop - start)
                f.release(self.info, start * size, stop * size)


def _scorer(quant: QuantConfig, proj: Projection) -> Scorer:
    return PlainScorer(proj)


ENCODING = Encoding(
    name="float", label="plain float weights (F32/BF16/F16: `<proj>.weight`, fused `experts.<proj>`)",
    suffixes=SUFFIXES, fused_suffixes=FUSED_SUFFIXES, matches=_matches, scorer=_scorer)
