"""What every weight encoding shares: the checkpoint's quantization config, the group
of tensors one projection is stored in, the running sums, and exact reductions.

An encoding turns one projection's tensors (per expert, or fused over all experts)
into a `Scorer` that adds that projection's sum of |w| and of w^2 to each expert's
`Sums`, reading bounded chunks and never materialising a whole expert. Where a
scale multiplies a group of values, the group's sums of |code| and code^2 are taken
first and multiplied by |scale| and scale^2: the exact sums of the dequantized
values (the same arithmetic as dequantizing first, in float64).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_aimer.lazy import torch

from vllm_aimer.checkpoint import Checkpoint, TensorInfo
from vllm_aimer.encodings.reduce import float_sums, storage_view
from vllm_aimer.errors import AimerError

__all__ = [
    # config
    "QuantConfig", "quant_config", "modelopt_algo", "modelopt_group_size", "ct_formats",
    "CtScheme", "ct_scheme", "require_ct_fp4_scheme",
    # projections and scorers
    "Projection", "refuse", "Sums", "Scorer", "MatrixScorer", "Encoding", "has", "only",
    # exact reductions
    "CHUNK_ELEMENTS", "row_spans", "f64", "abs_sq_sums", "add_block_scaled", "codes_u8",
    "GroupBuckets", "one_hot", "col_group_sums", "runs_of", "unpack_int32", "FP4_CODES",
    "fp4_byte_sums", "add_fp4_groups", "ceil_div",
]

CHUNK_ELEMENTS = 1 << 20
"""About 4 MiB of float32 per reduction: cache-sized, and far faster than
reducing whole tensors (see ../shared notes: ~4x on this CPU)."""


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's `quantization_config` (config.json, its text_config, or
    hf_quant_config.json), with the method name normalised."""
    method: str | None
    """quant_method lower-cased (ModelOpt's `modelopt_fp4` etc. kept); None: unquantized."""
    raw: Mapping[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def ct_index(self) -> tuple[_CtTargets, list[tuple[_CtTargets, CtScheme]]]:
        """compressed-tensors' ignore list and (targets, scheme) per config group, split
        once for `ct_scheme` (computed on first use; `raw` is not changed after)."""
        ignore = _CtTargets.of([t for t in self.raw.get("ignore") or () if isinstance(t, str)])
        top = self.raw.get("format")
        groups = [(_CtTargets.of(g.get("targets") or ()),
                   CtScheme(g["weights"], g.get("format") or top, g.get("input_activations")))
                  for g in (self.raw.get("config_groups") or {}).values()
                  if isinstance(g, Mapping) and isinstance(g.get("weights"), Mapping)]
        return ignore, groups

    def describe(self) -> str:
        """For messages: the method, with its algorithm, formats or bits and group when
        known; "unquantized" without a config."""
        if self.method is None:
            return "unquantized"
        detail = ""
        if self.method.startswith("modelopt"):
            detail = f" ({modelopt_algo(self)})"
        elif self.method == "compressed-tensors":
            formats = sorted({f for f in ct_formats(self) if f})
            detail = f" ({', '.join(formats)})" if formats else ""
        elif self.method in ("gptq", "awq"):
            detail = f" ({self.raw.get('bits', '?')}-bit, group {self.raw.get('group_size', '?')})"
        return self.method + detail


def quant_config(ckpt: Checkpoint) -> QuantConfig:
    """The checkpoint's quantization config: the first of config.json's
    `quantization_config` or `compression_config`, its text_config's
    `quantization_config`, or hf_quant_config.json; QuantConfig(None) when there is
    none. Without a quant_method the method is "modelopt" for hf_quant_config.json's
    `{"quantization": {...}}` form, else "unknown"."""
    config = ckpt.config
    inner = config.get("text_config")
    raw = (config.get("quantization_config") or config.get("compression_config")
           or (inner.get("quantization_config") if isinstance(inner, Mapping) else None)
           or ckpt.hf_quant_config)
    if not isinstance(raw, Mapping) or not raw:
        return QuantConfig(None)
    method = raw.get("quant_method")
    if not isinstance(method, str) and isinstance(raw.get("quantization"), Mapping):
        method = "modelopt"  # hf_quant_config.json: {"producer": ..., "quantization": {...}}
    return QuantConfig(method.lower() if isinstance(method, str) else "unknown", raw)


def modelopt_algo(quant: QuantConfig) -> str:
    """ModelOpt's quant_algo, upper-cased ("" when absent), from hf_quant_config.json's
    `quantization` section or the config itself."""
    inner = quant.raw.get("quantization")
    src = inner if isinstance(inner, Mapping) else quant.raw
    return str(src.get("quant_algo", "")).upper()


def modelopt_group_size(quant: QuantConfig) -> int | None:
    """ModelOpt's group_size, found as `modelopt_algo` finds quant_algo; None if not an int."""
    inner = quant.raw.get("quantization")
    src = inner if isinstance(inner, Mapping) else quant.raw
    value = src.get("group_size")
    return value if isinstance(value, int) else None


# compressed-tensors: `config_groups` of schemes, each with `targets` (a layer class
# such as "Linear", a name, or "re:<regex>"), an `ignore` list, and a `format` per
# group or for the whole checkpoint. Matched as vLLM does (exact name, then regex,
# then class), on the expert projection's module name.
_CT_CLASS_TARGETS = ("Linear", "FusedMoE", "RoutedExperts")


def ct_formats(quant: QuantConfig) -> list[str]:
    """The compressed-tensors format of each config group (the top-level `format` when
    a group names none; None when neither does)."""
    groups = quant.raw.get("config_groups") or {}
    top = quant.raw.get("format")
    return [g.get("format") or top for g in groups.values() if isinstance(g, Mapping)]


@dataclass(frozen=True)
class CtScheme:
    """The parts of a compressed-tensors config group the encodings read."""
    weights: Mapping[str, Any]
    format: str | None
    input_activations: Mapping[str, Any] | None


@dataclass(frozen=True)
class _CtTargets:
    """A target list split once: exact names, compiled `re:` patterns, and whether a
    layer class (which every expert projection is) is among them. Built once per config
    because a release lists hundreds of ignored modules and has tens of thousands of
    expert projections to look up."""
    names: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]
    has_class: bool

    @classmethod
    def of(cls, targets: Sequence[Any]) -> _CtTargets:
        text = [str(t) for t in targets]
        return cls(frozenset(t for t in text if not t.startswith("re:")),
                   tuple(re.compile(t[3:]) for t in text if t.startswith("re:")),
                   any(t in _CT_CLASS_TARGETS for t in text))

    def rank(self, module: str) -> int | None:
        """0: exact name, 1: regex, 2: layer class; None: no match."""
        if module in self.names:
            return 0
        if any(p.match(module) for p in self.patterns):
            return 1
        return 2 if self.has_class else None


def ct_scheme(quant: QuantConfig, module: str) -> CtScheme | None:
    """The compressed-tensors scheme that applies to `module`, or None (ignored or
    not targeted). Matched as vLLM does: an exact name before a regex before a layer
    class; among equals, the first group."""
    ignore, groups = quant.ct_index
    if ignore.rank(module) in (0, 1):
        return None
    best: tuple[int, CtScheme] | None = None
    for targets, scheme in groups:
        rank = targets.rank(module)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, scheme)
    return best[1] if best else None


# --------------------------------------------------------------------------- projections

@dataclass(frozen=True)
class Projection:
    """The tensors one projection of one expert is stored in (or, fused, of all experts)."""
    module: str
    """Checkpoint module name: `...experts.3.gate_proj`, or `...experts.gate_up_proj` fused."""
    tensors: Mapping[str, TensorInfo]
    """Per expert: suffix after `<proj>.` (`weight`, `qweight`, `weight_scale` ...);
    fused: suffix after the projection name (`""`, `_blocks`, `_scale_inv`, `_bias`)."""
    fused: bool
    num_experts: int
    """Fused: the experts on dim 0."""

    def describe(self) -> str:
        """For messages: the module name, then each tensor's suffix, dtype and shape."""
        parts = [f"{s or '(weight)'} {t.dtype} {list(t.shape)}" for s, t in sorted(self.tensors.items())]
        return f"{self.module}: " + ", ".join(parts)

    def dtype(self, suffix: str) -> str | None:
        """The dtype of the tensor with `suffix`, or None when there is none."""
        t = self.tensors.get(suffix)
        return t.dtype if t is not None else None


def refuse(proj: Projection, what: str, fix: str) -> AimerError:
    """The AimerError (returned, for the caller to raise) naming `proj`'s tensors, `what`
    is wrong with them and the `fix`."""
    return AimerError(f"expert tensors {proj.describe()}: {what}", fix)


def require_ct_fp4_scheme(quant: QuantConfig, proj: Projection, group: int, found: str) -> None:
    """Check that compressed-tensors declares a 4-bit float weight scheme in groups of
    `group` for `proj` (NVFP4: 16, MXFP4: 32), the only thing its packed FP4 values
    can be decoded with.

    Args:
        quant: the checkpoint's quantization config.
        proj: the projection whose tensors look like packed FP4.
        group: the values that share one scale.
        found: what the tensors look like, for the message.

    Raises:
        AimerError: no such scheme applies to `proj`.
    """
    scheme = ct_scheme(quant, proj.module) if quant.method == "compressed-tensors" else None
    w = scheme.weights if scheme else {}
    if (scheme is None or w.get("type") != "float" or w.get("num_bits") != 4
            or w.get("group_size") != group):
        raise refuse(proj, f"{found}, but the config has no 4-bit float scheme in groups of "
                     f"{group} for {proj.module} (found: {dict(w) if w else 'none'}).",
                     "check quantization_config in config.json, or pass a plan file.")


# --------------------------------------------------------------------------- sums

@dataclass
class Sums:
    """Running sums of one expert's weights: sum |w|, sum w^2 and the count of w."""
    abs_sum: float = 0.0
    sq_sum: float = 0.0
    numel: int = 0

    def add(self, values: Any) -> None:
        """Plain values (a numpy array or torch tensor), in bounded chunks: float32 runs
        of 256, float64 across runs (see `reduce`)."""
        flat, dtype = storage_view(values)
        for start in range(0, flat.size, CHUNK_ELEMENTS):
            self.add_totals(*float_sums(flat[start:start + CHUNK_ELEMENTS], dtype), 0)
        self.numel += flat.size

    def add_totals(self, abs_sum: float, sq_sum: float, numel: int) -> None:
        """Add sums computed elsewhere over `numel` values."""
        self.abs_sum += abs_sum
        self.sq_sum += sq_sum
        self.numel += numel


class Scorer:
    """Adds one projection's sums to its expert (or, fused, to every expert)."""

    reads: tuple[TensorInfo, ...] = ()
    """Every tensor read while scoring (for byte accounting)."""
    threaded: bool = False
    """Whether `add` may run in a worker thread: it reads only through the shards'
    memory maps (`f.array`) and touches only the `accs` it is given."""
    plain_float: bool = False
    """Whether the projection is one plain float tensor whose values are the weights,
    the only kind the GPU reduction (`gpu_scoring`) takes; a threaded scorer of
    packed values (block FP8's numpy path) is not."""

    def add(self, f: Any, accs: Sequence[Sums], chunk_elements: int) -> None:
        """Add the projection's sums to `accs`.

        Args:
            f: the open shards (`vllm_aimer.shards.Shards`) to read from.
            accs: the expert's Sums (one), or, fused, one per expert in order.
            chunk_elements: about how many values to decode at a time.

        Raises:
            AimerError: values read contradict the recipe (the encodings that check
                some while reading: GPTQ's g_idx, pack-quantized's weight_shape).
        """
        raise NotImplementedError


class MatrixScorer(Scorer):
    """A scorer of one 2-D matrix per expert: `add_matrix(f, acc, lead)` reads the matrix
    at leading index `lead` (() per expert, (e,) in a fused tensor)."""

    def __init__(self, proj: Projection, *reads: TensorInfo) -> None:
        self.proj = proj
        self.reads = tuple(reads)

    def add(self, f: Any, accs: Sequence[Sums], chunk_elements: int) -> None:
        if self.proj.fused:
            for expert, acc in enumerate(accs):
                self.add_matrix(f, acc, (expert,), chunk_elements)
        else:
            self.add_matrix(f, accs[0], (), chunk_elements)

    def add_matrix(self, f: Any, acc: Sums, lead: tuple[int, ...], chunk_elements: int) -> None:
        """Add the sums of the matrix at leading index `lead` to `acc` (see `add`)."""
        raise NotImplementedError


def row_spans(rows: int, row_numel: int, chunk_elements: int, align: int = 1) -> Iterator[slice]:
    """Consecutive row slices of about `chunk_elements` elements, each starting at a
    multiple of `align` (a scale block's rows)."""
    step = max(1, chunk_elements // max(1, row_numel * align)) * align
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def f64(t: torch.Tensor) -> torch.Tensor:
    """Exact float64 values of a float, float8 or integer tensor."""
    return t.to(torch.float64)


_RUN = 128
"""Float32 partial sums run over at most this many values: sums of |code| and code^2 of
integer codes (|code| <= 255) are then exact, and float8/FP4 ones within ~1e-7."""


def abs_sq_sums(v: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of |v| and v^2 over `dim` of a float32 tensor, as float64: float32 partials
    over runs of at most 128 values (exact for integer codes), float64 beyond."""
    dim = dim % v.dim()
    n = v.shape[dim]
    if n <= _RUN:
        return v.abs().sum(dim).to(torch.float64), (v * v).sum(dim).to(torch.float64)
    runs = ceil_div(n, _RUN)
    if runs * _RUN != n:
        pad = [0, 0] * (v.dim() - 1 - dim) + [0, runs * _RUN - n]
        v = torch.nn.functional.pad(v, pad)
    v = v.unflatten(dim, (runs, _RUN))
    return (v.abs().sum(dim + 1).to(torch.float64).sum(dim),
            (v * v).sum(dim + 1).to(torch.float64).sum(dim))


def add_block_scaled(acc: Sums, values: torch.Tensor, scale: torch.Tensor,
                     block: tuple[int, int]) -> None:
    """Add values [rows, cols] (float32 codes, zero points removed) times scale
    [ceil(rows/br), ceil(cols/bc)], one scale per (br, bc) block: per block sums of
    |v| and v^2, times |s| and s^2 in float64."""
    rows, cols = values.shape
    br, bc = block
    rb, cb = ceil_div(rows, br), ceil_div(cols, bc)
    if (rb * br, cb * bc) != (rows, cols):
        values = torch.nn.functional.pad(values, (0, cb * bc - cols, 0, rb * br - rows))
    a, q = abs_sq_sums(values.view(rb, br, cb, bc), 3)        # [rb, br, cb]
    a, q = a.sum(1), q.sum(1)
    s = scale.reshape(rb, cb).to(torch.float64)
    acc.add_totals(float((a * s.abs()).sum()), float((q * s * s).sum()), rows * cols)


def codes_u8(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-wide fields of int32 words (low bits first) as uint8, field i of
    word w at index w * (32/bits) + i along the last dim (little-endian bytes)."""
    b = words.contiguous().view(torch.uint8)
    if bits == 8:
        return b
    if bits == 4:
        return torch.stack((b & 0xF, b >> 4), -1).flatten(-2)
    if bits == 2:
        return torch.stack([(b >> s) & 0x3 for s in (0, 2, 4, 6)], -1).flatten(-2)
    return unpack_int32(words, bits, words.dim() - 1).to(torch.uint8)


class GroupBuckets:
    """Sums of |v| and v^2 per (group, column) over rows whose group is known (GPTQ/AWQ
    groups along the input rows, act-order `g_idx` included); times |scale| and
    scale^2 [groups, columns] at the end."""

    def __init__(self, groups: int, cols: int) -> None:
        self.abs = torch.zeros(groups, cols, dtype=torch.float64)
        self.sq = torch.zeros(groups, cols, dtype=torch.float64)
        self.numel = 0

    def add_indexed(self, values: torch.Tensor, group_of_row: torch.Tensor) -> None:
        """Rows in any groups (act-order): a one-hot [groups, rows] product, exact in
        float64 (each term is 1 x value)."""
        onehot = one_hot(group_of_row, self.abs.shape[0])
        self.abs += onehot @ values.abs()
        self.sq += onehot @ (values * values)
        self.numel += values.numel()

    def add_row_sums(self, a: torch.Tensor, q: torch.Tensor, first_row: int, group: int) -> None:
        """Per-row sums a = |v|, q = v^2 (float32 [rows, cols]) of consecutive rows from
        `first_row`, in groups of `group` consecutive rows: summed per group (float32
        over at most 16 rows, exact for integer codes; float64 beyond)."""
        rows = a.shape[0]
        r = 0
        while r < rows:
            g = (first_row + r) // group
            stop = min(rows, (g + 1) * group - first_row)
            self.abs[g] += _sum_rows(a[r:stop])
            self.sq[g] += _sum_rows(q[r:stop])
            r = stop

    def finish(self, acc: Sums, scale: torch.Tensor) -> None:
        """Add the buckets times |scale| and scale^2 (float64 [groups, columns]) to `acc`."""
        acc.add_totals(float((self.abs * scale.abs()).sum()),
                       float((self.sq * scale * scale).sum()), self.numel)


def _sum_rows(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if n <= 16:
        return x.sum(0).to(torch.float64)
    runs = ceil_div(n, 16)
    if runs * 16 != n:
        x = torch.cat([x, x.new_zeros(runs * 16 - n, *x.shape[1:])])
    return x.view(runs, 16, *x.shape[1:]).sum(1).to(torch.float64).sum(0)


def one_hot(index: torch.Tensor, classes: int) -> torch.Tensor:
    """float64 [classes, len(index)] with a 1 at (index[i], i)."""
    out = torch.zeros(classes, index.numel(), dtype=torch.float64)
    out[index, torch.arange(index.numel())] = 1.0
    return out


def col_group_sums(values: torch.Tensor, g_idx: torch.Tensor,
                   groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, sums of |v| and v^2 over each column group ([rows, groups]), columns
    assigned by `g_idx` (column -> group)."""
    onehot = one_hot(g_idx, groups).t()
    return values.abs() @ onehot, (values * values) @ onehot


def runs_of(g_idx: torch.Tensor, group: int) -> bool:
    """Whether a g_idx is the trivial k // group (no act-order)."""
    return bool(torch.equal(g_idx, torch.arange(g_idx.numel()) // group))


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-wide fields of int32 words, low bits first, unpacked along
    `dim` (0: rows, 1: columns): int64 [rows * 32/bits, cols] or [rows, cols * 32/bits]."""
    per = 32 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int64) & 0xFFFFFFFF
    fields = torch.stack([(p >> (bits * i)) & mask for i in range(per)], dim=dim + 1)
    shape = list(packed.shape)
    shape[dim] *= per
    return fields.reshape(shape)


# FP4 (E2M1) code points; a byte holds two, low nibble first (OCP MX and NVFP4 alike).
FP4_CODES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
             -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@functools.cache
def fp4_byte_sums() -> tuple[torch.Tensor, torch.Tensor]:
    """Per byte: the sum of |v| and of v^2 over its two FP4 values (exact in float32);
    built on first use, so that importing the encodings does not import torch."""
    values = torch.tensor(FP4_CODES, dtype=torch.float64)
    b = torch.arange(256)
    lo, hi = values[b & 0xF], values[b >> 4]
    return (lo.abs() + hi.abs()).float(), (lo ** 2 + hi ** 2).float()


def add_fp4_groups(acc: Sums, packed: torch.Tensor, scale: torch.Tensor) -> None:
    """Add FP4 bytes [rows, groups, bytes per group] with one float64 scale per group
    [rows, groups]: per group sum|v| x |s| and sum v^2 x s^2 (group sums of at most 16
    bytes are exact in float32)."""
    idx = packed.to(torch.long)
    byte_abs, byte_sq = fp4_byte_sums()
    a = torch.take(byte_abs, idx).sum(-1).to(torch.float64)
    q = torch.take(byte_sq, idx).sum(-1).to(torch.float64)
    acc.add_totals(float((a * scale.abs()).sum()), float((q * scale * scale).sum()),
                   packed.numel() * 2)


# --------------------------------------------------------------------------- encodings

@dataclass(frozen=True)
class Encoding:
    """One weight encoding: how to recognise it, the tensors it owns, how to score it."""
    name: str
    label: str
    """What users read: the format and the tensors it stores."""
    suffixes: frozenset[str]
    """Per-expert tensor suffixes this encoding owns (scored or carried along)."""
    matches: Callable[[QuantConfig, Projection], bool]
    """Recognise the encoding from one projection's tensor names and dtypes (and, where
    two encodings store the same names, the quant method)."""
    scorer: Callable[[QuantConfig, Projection], Scorer]
    """Validate against the config and headers and build the scorer (AimerError if
    the tensors do not fit the recipe)."""
    fused_suffixes: frozenset[str] = frozenset()
    """Suffixes of fused all-expert tensors this encoding owns (dim 0 = expert)."""


def has(proj: Projection, *suffixes: str) -> bool:
    """Whether `proj` has a tensor for every one of `suffixes`."""
    return all(s in proj.tensors for s in suffixes)


def only(proj: Projection, allowed: frozenset[str]) -> bool:
    """Whether every tensor suffix of `proj` is in `allowed`."""
    return set(proj.tensors) <= allowed


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up (integers)."""
    return -(-a // b)
