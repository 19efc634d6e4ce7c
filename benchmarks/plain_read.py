"""The reference the scoring benchmark measures AIMER against: read the routed experts'
weights of a generated checkpoint in chunks into a float32 buffer, and nothing else.

    python -m benchmarks.plain_read MODEL [--threads N] [--raw]

One pread of 1 MiB at a time per thread into a reused buffer; BF16 chunks are widened
into a float32 buffer (a uint16 -> uint32 cast and a 16-bit shift, numpy's fastest
exact way), F32 chunks are already float32. `--raw` skips the widening (bytes only).
Needs numpy and the standard library only: as a process it is the floor of what any
tool that reads those bytes must pay.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CHUNK = 1 << 20
EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


def expert_spans(model: Path) -> list[tuple[Path, int, int, str]]:
    """(shard, offset, bytes, dtype) of every routed expert weight, in file order."""
    spans = []
    for shard in sorted(model.glob("*.safetensors")):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if EXPERT.search(name):
                begin, end = entry["data_offsets"]
                spans.append((shard, 8 + n + begin, end - begin, entry["dtype"]))
    return sorted(spans)


def plain_read(model: Path, threads: int = 1, raw: bool = False) -> int:
    """Read every expert weight's bytes in 1 MiB chunks (into float32 unless `raw`);
    returns the bytes read."""
    spans = expert_spans(model)
    fds = {shard: os.open(shard, os.O_RDONLY) for shard in {s[0] for s in spans}}

    def read(part: list[tuple[Path, int, int, str]]) -> int:
        buf = np.empty(CHUNK, np.uint8)
        wide = np.empty(CHUNK // 2, np.uint32)
        total = 0
        for shard, offset, nbytes, dtype in part:
            for start in range(0, nbytes, CHUNK):
                n = min(CHUNK, nbytes - start)
                total += os.preadv(fds[shard], [memoryview(buf)[:n]], offset + start)
                if dtype == "BF16" and not raw:
                    np.left_shift(buf[:n].view(np.uint16), 16, out=wide[:n // 2],
                                  dtype=np.uint32)
        return total

    try:
        if threads <= 1:
            return read(spans)
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(read, [spans[i::threads] for i in range(threads)]))
    finally:
        for fd in fds.values():
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--raw", action="store_true", help="bytes only, no float32 widening")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    n = plain_read(args.model, args.threads, args.raw)
    print(f"read {n} bytes in {time.perf_counter() - start:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
