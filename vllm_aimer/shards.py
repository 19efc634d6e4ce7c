"""Read access to a checkpoint's shards while scoring.

Plain arrays come straight from a read-only memory map of each shard (the header gave
every tensor's offset): no copy, no per-read objects, and numpy releases the GIL while
it walks them, so worker threads read in parallel. Pages a scorer is done with are
dropped from the process with MADV_DONTNEED (they stay in the page cache), which keeps
resident memory at a few chunks per thread instead of growing to the size of the shards.
Quantized encodings still read through safetensors handles (`get_slice`/`get_tensor`,
torch), from one thread.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from vllm_aimer.checkpoint import Checkpoint, TensorInfo
from vllm_aimer.encodings.reduce import STORAGE

__all__ = ["Shards", "usable_cpus", "default_threads"]

PAGE = mmap.PAGESIZE
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
# No MADV_SEQUENTIAL / MADV_WILLNEED: measured on the benchmark models (2 cores, virtio
# disk) they did not speed up cold reads and slowed warm ones (a syscall per tensor);
# what helps cold reads is more reads in flight, i.e. threads (see `default_threads`).


class Shards:
    """Memory maps (thread-safe) and safetensors handles (one thread) by tensor name.

    Args:
        ckpt: the checkpoint whose shards are read; `close` releases them.
    """

    OPEN = 4
    """safetensors handles kept open at a time (a weight and its scales may sit in
    different files)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.maps: dict[str, mmap.mmap] = {}
        self.lock = threading.Lock()
        self.handles: OrderedDict[str, Any] = OrderedDict()

    # ------------------------------------------------------------------ memory maps

    def _map(self, file: str) -> mmap.mmap:
        m = self.maps.get(file)
        if m is None:
            with self.lock:
                m = self.maps.get(file)
                if m is None:
                    with open(self.ckpt.path(file), "rb") as fh:
                        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                    self.maps[file] = m
        return m

    def array(self, info: TensorInfo) -> np.ndarray:
        """The tensor's stored values, 1-D, as `reduce.STORAGE[dtype]`, without a copy.

        Raises:
            ValueError: the tensor's file offset is unknown (`info.offset` < 0).
            KeyError: its dtype has no entry in `reduce.STORAGE`.
        """
        if info.offset < 0:
            raise ValueError(f"tensor {info.name} has no file offset")
        return np.frombuffer(self._map(info.file), STORAGE[info.dtype], count=info.numel,
                             offset=info.offset)

    def release(self, info: TensorInfo, start: int, stop: int) -> None:
        """Drop this process's mapping of the pages inside bytes [start, stop) of the
        tensor (the page cache keeps them; a later read maps them again)."""
        if _DONTNEED is None:
            return
        first = -(-(info.offset + start) // PAGE) * PAGE
        last = (info.offset + stop) // PAGE * PAGE
        if last > first:
            self.maps[info.file].madvise(_DONTNEED, first, last - first)

    # ------------------------------------------------------------------ safetensors

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        file = self.ckpt.tensors[name].file
        if file in self.handles:
            self.handles.move_to_end(file)
            return self.handles[file]
        while len(self.handles) >= self.OPEN:
            self.handles.popitem(last=False)[1].__exit__(None, None, None)
        handle = safe_open(self.ckpt.path(file), framework="pt")
        self.handles[file] = handle.__enter__()
        return self.handles[file]

    def get_slice(self, name: str) -> Any:
        """safetensors' lazy slice of tensor `name` (torch), through a kept-open handle."""
        return self._handle(name).get_slice(name)

    def get_tensor(self, name: str) -> Any:
        """Tensor `name` as a torch tensor, through a kept-open handle."""
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        """Close the safetensors handles and the memory maps (a map an array still points
        into is unmapped when that array is freed)."""
        while self.handles:
            self.handles.popitem()[1].__exit__(None, None, None)
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:  # an array still points into it: unmapped when freed
                pass
        self.maps.clear()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a vLLM CPU worker's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Scoring threads: one per usable CPU, at least 4 (a cold page cache is read
    through page faults, and more of them in flight read faster even on 2 cores:
    1.5-2.3 GB/s with 4 threads against 0.6-1.1 GB/s with 1 on the benchmark's disk),
    at most 32."""
    return min(32, max(4, usable_cpus()))
