"""Plain float expert weights reduced on a GPU.

The CPU only copies bytes: threads copy each projection's bytes from the shards'
memory maps into one of two pinned staging buffers (each projection padded with zeros
to whole runs of 256 values, which add nothing), the buffer goes to the device, and
the device turns each run into float32 sums of |w| and w^2, added per projection in
float64. While the GPU works on one buffer the threads fill the other. Memory is
bounded: two pinned buffers and two device buffers of BUFFER_BYTES, plus the float32
copy of one buffer; everything is freed (and the caching allocator emptied) before
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


def device_sums(shards: Shards, items: Sequence[tuple[ScoredTensor, int]], device: str,
                threads: int, buffer_bytes: int = BUFFER_BYTES) -> list[list[Sums]]:
    """Per item (a plain-float projection and the layer's expert count), the Sums of
    each expert it holds, reduced on `device` ("cpu" runs the same packing and
    arithmetic without pinned memory or streams: how it is tested without a GPU)."""
    segments: list[_Segment] = []
    for i, (st, experts) in enumerate(items):
        numel = st.info.numel
        if st.expert is None:
            per = numel // experts
            segments += [_Segment(i, e, st, e * per, per) for e in range(experts)]
        else:
            segments.append(_Segment(i, 0, st, 0, numel))
    dev = torch.device(device)
    abs_tot = torch.zeros(len(segments), dtype=torch.float64, device=dev)
    sq_tot = torch.zeros(len(segments), dtype=torch.float64, device=dev)
    for dtype in sorted({s.st.info.dtype for s in segments}):
        _reduce(shards, [k for k, s in enumerate(segments) if s.st.info.dtype == dtype],
                segments, dtype, dev, abs_tot, sq_tot, threads, buffer_bytes)
    abs_cpu, sq_cpu = abs_tot.cpu().tolist(), sq_tot.cpu().tolist()
    out = [[Sums() for _ in range(experts if st.expert is None else 1)]
           for st, experts in items]
    for k, s in enumerate(segments):
        out[s.item][s.slot].add_totals(abs_cpu[k], sq_cpu[k], s.count)
    del abs_tot, sq_tot
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _batches(ids: list[int], segments: list[_Segment], capacity: int) -> list[list[_Piece]]:
    """Pieces of segments packed into buffers of `capacity` elements, each piece at a
    multiple of RUN (a segment longer than a buffer is split at multiples of RUN)."""
    batches: list[list[_Piece]] = [[]]
    at = 0
    for k in ids:
        s = segments[k]
        done = 0
        while done < s.count:
            if at >= capacity:
                batches.append([])
                at = 0
            n = min(s.count - done, capacity - at)
            batches[-1].append(_Piece(k, s.first + done, n, at))
            at += -(-n // RUN) * RUN
            done += n
    return [b for b in batches if b]


def _reduce(shards: Shards, ids: list[int], segments: list[_Segment], dtype: str,
            dev: torch.device, abs_tot: torch.Tensor, sq_tot: torch.Tensor,
            threads: int, buffer_bytes: int) -> None:
    tdtype = _TORCH[dtype]
    size = torch.empty(0, dtype=tdtype).element_size()
    capacity = max(RUN, buffer_bytes // size // RUN * RUN)
    cuda = dev.type == "cuda"
    pinned = [torch.empty(capacity * size, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    hosts = [p.numpy() for p in pinned]
    staged = [torch.empty(capacity * size, dtype=torch.uint8, device=dev) for _ in range(2)]
    copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
    stream = torch.cuda.Stream(dev) if cuda else None

    def fill(host: np.ndarray, piece: _Piece) -> None:
        s = segments[piece.seg]
        src = shards.array(s.st.info)[piece.first:piece.first + piece.count]
        a, b = piece.at * size, (piece.at + piece.count) * size
        host[a:b] = src.view(np.uint8)
        pad = -(-piece.count // RUN) * RUN - piece.count
        if pad:
            host[b:b + pad * size] = 0
        shards.release(s.st.info, piece.first * size, (piece.first + piece.count) * size)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for n, batch in enumerate(_batches(ids, segments, capacity)):
            j = n % 2
            if copied[j] is not None:
                copied[j].synchronize()  # the last copy out of this pinned buffer is done
            list(pool.map(lambda p: fill(hosts[j], p), batch))
            used = (batch[-1].at + -(-batch[-1].count // RUN) * RUN) * size
            runs = torch.tensor([p.seg for p in batch for _ in range(-(-p.count // RUN))],
                                dtype=torch.long)
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                staged[j][:used].copy_(pinned[j][:used], non_blocking=cuda)
                if copied[j] is not None:
                    copied[j].record(stream)
                x = staged[j][:used].view(tdtype).view(-1, RUN)
                x = x.to(torch.float64 if tdtype == torch.float64 else torch.float32)
                index = runs.to(dev)
                sq_tot.index_add_(0, index, torch.linalg.vecdot(x, x, dim=1).to(torch.float64))
                abs_tot.index_add_(0, index, x.abs_().sum(1).to(torch.float64))
                del x
        if stream is not None:
            stream.synchronize()
    del pinned, hosts, staged
