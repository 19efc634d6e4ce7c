"""Weight encodings of routed experts, one module each (see base.py for the contract).

Each module has the same three parts: recognise and validate (`ENCODING.matches`,
`ENCODING.scorer`: from the config's `quantization_config` and the safetensors
headers), accumulate the sums of |w| and w^2 from the packed values (its `Scorer`),
and an encoder the tests use to write tiny checkpoints (`encode`,
`quantization_config`). Adding a format is adding a module to `ENCODINGS`.
"""

from __future__ import annotations

from vllm_aimer.encodings import (awq, fp8_block, fp8_scaled, gptq, int8, mxfp4, nvfp4,
                                  pack_quantized, plain)
from vllm_aimer.encodings.base import (Encoding, Projection, QuantConfig, Scorer, Sums,
                                       quant_config)
from vllm_aimer.errors import AimerError

ENCODINGS: tuple[Encoding, ...] = (
    plain.ENCODING, fp8_block.ENCODING, fp8_scaled.ENCODING, int8.ENCODING, gptq.ENCODING,
    awq.ENCODING, pack_quantized.ENCODING, nvfp4.ENCODING, mxfp4.ENCODING)

FUSED_SUFFIXES: frozenset[str] = frozenset().union(*(e.fused_suffixes for e in ENCODINGS))
"""Every suffix a fused all-expert tensor may carry after its projection name."""


def supported() -> str:
    return "; ".join(e.label for e in ENCODINGS)


def encoding_for(quant: QuantConfig, proj: Projection) -> Encoding | None:
    return next((e for e in ENCODINGS if e.matches(quant, proj)), None)


def scorer_for(quant: QuantConfig, proj: Projection) -> tuple[Encoding, Scorer]:
    """The projection's encoding and scorer; an AimerError naming the format when
    vllm-aimer cannot decode it (never a score from raw codes)."""
    encoding = encoding_for(quant, proj)
    if encoding is None:
        raise AimerError(
            f"expert tensors {proj.describe()} (quantization: {quant.describe()}) are in "
            "an encoding vllm-aimer cannot decode, so AIMER cannot score them (it never "
            f"scores raw codes). Supported: {supported()}.",
            "use a checkpoint in a supported format, or pass a plan file computed elsewhere "
            "(`plan` needs no scores; the weight stream renames any per-expert tensor).")
    return encoding, encoding.scorer(quant, proj)


__all__ = ["ENCODINGS", "FUSED_SUFFIXES", "Encoding", "Projection", "QuantConfig", "Scorer",
           "Sums", "encoding_for", "quant_config", "scorer_for", "supported"]
