"""Weight encodings of routed experts, one module each (see base.py for the contract).

Each module has the same two parts: recognise and validate (`ENCODING.matches`,
`ENCODING.scorer`: from the config's `quantization_config` and the safetensors
headers), and accumulate the sums of |w| and w^2 from the packed values (its
`Scorer`). The encoders the tests write tiny checkpoints with live apart, in
`vllm_aimer.testing.encoders` (one module per format). Adding a format is adding a
module to `ENCODINGS` (and its encoder there).
"""

from __future__ import annotations

from vllm_aimer.encodings import (awq, fp8_block, fp8_scaled, gptq, int8, mxfp4, nvfp4,
                                  pack_quantized, plain)
from vllm_aimer.encodings.base import (Encoding, Projection, QuantConfig, Scorer, Sums,
                                       quant_config)
from vllm_aimer.errors import AimerError

__all__ = ["ENCODINGS", "FUSED_SUFFIXES", "Encoding", "Projection", "QuantConfig", "Scorer",
           "Sums", "encoding_for", "quant_config", "scorer_for", "supported"]

ENCODINGS: tuple[Encoding, ...] = (
    plain.ENCODING, fp8_block.ENCODING, fp8_scaled.ENCODING, int8.ENCODING, gptq.ENCODING,
    awq.ENCODING, pack_quantized.ENCODING, nvfp4.ENCODING, mxfp4.ENCODING)

FUSED_SUFFIXES: frozenset[str] = frozenset().union(*(e.fused_suffixes for e in ENCODINGS))
"""Every suffix a fused all-expert tensor may carry after its projection name."""


def supported() -> str:
    """Every encoding's label, joined by "; " (for messages)."""
    return "; ".join(e.label for e in ENCODINGS)


def encoding_for(quant: QuantConfig, proj: Projection) -> Encoding | None:
    """The first encoding of ENCODINGS that recognises `proj` (from its tensor names and
    dtypes, and the quant method where two store the same names), or None."""
    return next((e for e in ENCODINGS if e.matches(quant, proj)), None)


def scorer_for(quant: QuantConfig, proj: Projection) -> tuple[Encoding, Scorer]:
    """The projection's encoding and scorer (never a score from raw codes).

    Args:
        quant: the checkpoint's quantization config.
        proj: one projection's tensors.

    Returns:
        (encoding, its scorer for `proj`).

    Raises:
        AimerError: no encoding recognises the tensors, or the one that does finds
            they do not fit the config (the message names the format).
    """
    encoding = encoding_for(quant, proj)
    if encoding is None:
        raise AimerError(
            f"expert tensors {proj.describe()} (quantization: {quant.describe()}) are in "
            "an encoding vllm-aimer cannot decode, so AIMER cannot score them (it never "
            f"scores raw codes). Supported: {supported()}.",
            "use a checkpoint in a supported format, or pass a plan file computed elsewhere "
            "(`plan` needs no scores; the weight stream renames any per-expert tensor).")
    return encoding, encoding.scorer(quant, proj)
