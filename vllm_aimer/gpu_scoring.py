"""Plain float expert weights reduced on a GPU.

The CPU only copies bytes: threads copy each projection's bytes from the shards'
memory maps into one of two pinned staging buffers (each projection padded with zeros
to whole runs of 256 values, which add nothing), the buffer goes to the device, and
the device turns each run into float32 sums of |w| and w^2; those come back (a few MB
per buffer) and are added per projection in float64 on the host. While the GPU works
on one buffer the threads fill the other.

Deterministic: no atomics; every buffer is reduced as one full-size [runs, 256] tensor
(the unused tail zeroed on the device), so a run's sums do not depend on where it sits
or how full the buffer is; a projection is never split across buffers unless it is
larger than one. Tensor-parallel ranks scoring on their own GPUs therefore agree, and
identical experts score identically.

Memory is bounded: two pinned and two device buffers of BUFFER_BYTES, the float32 copy
of one buffer, and the per-run sums; freed (and the caching allocator emptied) before
vLLM allocates the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from vllm_aimer.encodings.base import Sums
from vllm_aimer.encodings.reduce import RUN
from vllm_aimer.layout import ScoredTensor
from vllm_aimer.shards import Shards

__all__ = ["BUFFER_BYTES", "device_sums"]

BUFFER_BYTES = 64 << 20
_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "F64": torch.float64}


@dataclass(frozen=True)
class _Segment:
    item: int
    slot: int
    """Expert index within the item (0 for a per-expert tensor)."""
    st: ScoredTensor
    first: int
    """First element of the segment in the tensor."""
    count: int


@dataclass(frozen=True)
class _Piece:
    seg: int
    """Index into the segment list."""
    first: int
    """First element, within the tensor."""
    count: int
    at: int
    """Element offset in the staging buffer (a multiple of RUN)."""

    @property
    def runs(self) -> int:
        return -(-self.count // RUN)


def device_sums(shards: Shards, items: Sequence[tuple[ScoredTensor, int]], device: str,
                threads: int, buffer_bytes: int = BUFFER_BYTES) -> list[list[Sums]]:
    """Per item (a plain-float projection and the layer's expert count), the Sums of
    each expert it holds, reduced on `device` ("cpu" runs the same packing and
    arithmetic without pinned memory or streams: how it is tested without a GPU).

    Args:
        shards: the open shards the tensors are read from.
        items: (scored tensor, the layer's expert count) per projection; a fused tensor
            (`expert` None) is split evenly into that many experts on dim 0.
        device: a torch device string: "cuda", "cuda:N" or "cpu".
        threads: threads copying bytes into the staging buffers.
        buffer_bytes: the size of each staging buffer.

    Returns:
        Per item, in order, one Sums per expert it holds (one for a per-expert tensor).
    """
    segments: list[_Segment] = []
    for i, (st, experts) in enumerate(items):
        numel = st.info.numel
        if st.expert is None:
            per = numel // experts
            segments += [_Segment(i, e, st, e * per, per) for e in range(experts)]
        else:
            segments.append(_Segment(i, 0, st, 0, numel))
    totals = [[0.0, 0.0] for _ in segments]
    dev = torch.device(device)
    for dtype in sorted({s.st.info.dtype for s in segments}):
        _reduce(shards, [k for k, s in enumerate(segments) if s.st.info.dtype == dtype],
                segments, dtype, dev, totals, threads, buffer_bytes)
    out = [[Sums() for _ in range(experts if st.expert is None else 1)]
           for st, experts in items]
    for s, (a, q) in zip(segments, totals):
        out[s.item][s.slot].add_totals(a, q, s.count)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _batches(ids: list[int], segments: list[_Segment], capacity: int) -> list[list[_Piece]]:
    """Segments packed into buffers of `capacity` elements, each at a multiple of RUN; a
    segment that does not fit in what is left starts a new buffer, and only one longer
    than a whole buffer is split (from a buffer's start, so always alike)."""
    batches: list[list[_Piece]] = [[]]
    at = 0
    for k in ids:
        s = segments[k]
        if at and at + s.count > capacity:
            batches.append([])
            at = 0
        done = 0
        while done < s.count:
            if at >= capacity:
                batches.append([])
                at = 0
            n = min(s.count - done, capacity - at)
            piece = _Piece(k, s.first + done, n, at)
            batches[-1].append(piece)
            at += piece.runs * RUN
            done += n
    return [b for b in batches if b]


def _reduce(shards: Shards, ids: list[int], segments: list[_Segment], dtype: str,
            dev: torch.device, totals: list[list[float]], threads: int,
            buffer_bytes: int) -> None:
    tdtype = _TORCH[dtype]
    size = torch.empty(0, dtype=tdtype).element_size()
    capacity = max(RUN, buffer_bytes // size // RUN * RUN)
    cuda = dev.type == "cuda"
    pinned = [torch.empty(capacity * size, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    hosts = [p.numpy() for p in pinned]
    staged = [torch.empty(capacity * size, dtype=torch.uint8, device=dev) for _ in range(2)]
    sums = [torch.empty(2, capacity // RUN, dtype=torch.float64, pin_memory=cuda)
            for _ in range(2)]
    copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
    summed = [torch.cuda.Event() if cuda else None for _ in range(2)]
    stream = torch.cuda.Stream(dev) if cuda else None
    pending: list[list[_Piece] | None] = [None, None]

    def fill(host: np.ndarray, piece: _Piece) -> None:
        s = segments[piece.seg]
        src = shards.array(s.st.info)[piece.first:piece.first + piece.count]
        a, b = piece.at * size, (piece.at + piece.count) * size
        host[a:b] = src.view(np.uint8)
        pad = piece.runs * RUN - piece.count
        if pad:
            host[b:b + pad * size] = 0
        shards.release(s.st.info, piece.first * size, (piece.first + piece.count) * size)

    def settle(j: int) -> None:
        """Add the per-run sums of the batch in slot j to its segments (host, float64,
        in run order: the same for every rank and every position)."""
        batch = pending[j]
        if batch is None:
            return
        if summed[j] is not None:
            summed[j].synchronize()
        runs = sums[j].numpy()
        starts = [p.at // RUN for p in batch]
        stop = starts[-1] + batch[-1].runs
        a = np.add.reduceat(runs[0, :stop], starts)
        q = np.add.reduceat(runs[1, :stop], starts)
        for p, x, y in zip(batch, a.tolist(), q.tolist()):
            totals[p.seg][0] += x
            totals[p.seg][1] += y
        pending[j] = None

    wide = torch.float64 if tdtype == torch.float64 else torch.float32
    n = -1
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for n, batch in enumerate(_batches(ids, segments, capacity)):
            j = n % 2
            settle(j)  # batch n-2: its sums are back, so its buffers are free too
            if copied[j] is not None:
                copied[j].synchronize()
            list(pool.map(lambda p: fill(hosts[j], p), batch))
            used = (batch[-1].at + batch[-1].runs * RUN) * size
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                staged[j][:used].copy_(pinned[j][:used], non_blocking=cuda)
                if copied[j] is not None:
                    copied[j].record(stream)
                staged[j][used:].zero_()
                x = staged[j].view(tdtype).view(-1, RUN).to(wide)  # always the full buffer
                sums[j][1].copy_(torch.linalg.vecdot(x, x, dim=1), non_blocking=cuda)
                sums[j][0].copy_(x.abs_().sum(1), non_blocking=cuda)
                if summed[j] is not None:
                    summed[j].record(stream)
                del x
            pending[j] = batch
        for j in sorted((0, 1), key=lambda j: j != (n + 1) % 2):  # older batch first
            settle(j)
