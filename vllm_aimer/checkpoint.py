"""A local safetensors checkpoint, seen through its headers only.

Opening a checkpoint validates that every shard exists and is complete and
computes an identity from the index and header bytes, so a plan can be tied to
the checkpoint it was made for without hashing gigabytes of weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from vllm_aimer.dtypes import dtype_bits, tensor_bytes
from vllm_aimer.errors import AimerError

__all__ = ["INDEX_NAME", "SINGLE_NAME", "HF_QUANT_CONFIG_NAME", "TensorInfo", "Checkpoint",
           "open_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# ModelOpt before 0.31 keeps its quantization config beside config.json (vLLM reads it
# when config.json has no quantization_config).
HF_QUANT_CONFIG_NAME = "hf_quant_config.json"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its shard's header lists it."""
    name: str
    file: str
    """Its shard file, relative to the checkpoint directory."""
    dtype: str
    """The safetensors dtype name (see vllm_aimer.dtypes)."""
    shape: tuple[int, ...]
    offset: int = -1
    """Byte offset of the tensor's data in its file (-1: not known, e.g. built by hand)."""

    @property
    def numel(self) -> int:
        """Elements in `shape`."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes on disk; AimerError for a dtype vllm_aimer.dtypes does not know."""
        return tensor_bytes(self.dtype, self.shape, self.name)


@dataclass(frozen=True)
class Checkpoint:
    """A local safetensors checkpoint's config and tensor headers (from `open_checkpoint`)."""
    directory: Path
    config: Mapping[str, Any]
    """config.json."""
    files: tuple[str, ...]
    """Shard file names (relative to `directory`), in load order."""
    tensors: Mapping[str, TensorInfo]
    fingerprint: str
    """sha256 over config.json, the index, every shard's header and a small sample
    of its data (so two checkpoints of one architecture differ)."""
    hf_quant_config: Mapping[str, Any] | None = None
    """hf_quant_config.json, when config.json has no quantization_config (old ModelOpt)."""

    def path(self, file: str) -> Path:
        """The path of shard `file`."""
        return self.directory / file

    def tensors_by_file(self) -> Iterator[tuple[str, list[TensorInfo]]]:
        """Yields (shard file, its tensors in name order), files in load order."""
        for file in self.files:
            yield file, [t for t in self.tensors.values() if t.file == file]

    @cached_property
    def total_bytes(self) -> int:
        """Bytes of all tensors' data (headers excluded)."""
        return sum(t.nbytes for t in self.tensors.values())


def _read_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise AimerError(f"{path} is not a safetensors file (too short).",
                             "re-download or re-copy the checkpoint.")
        (n,) = struct.unpack("<Q", raw_len)
        header = f.read(n)
    if len(header) != n:
        raise AimerError(f"{path} is truncated (incomplete header).",
                         "re-download or re-copy the checkpoint.")
    return raw_len + header


def _tensors_of_shard(path: Path, file: str, header: bytes) -> dict[str, TensorInfo]:
    """The tensors a shard's header lists, with their file offsets, checked as safetensors
    checks them (each tensor's bytes match its dtype and shape, the data section is
    covered exactly and present on disk). Parsed here rather than with safe_open,
    which would import torch (seconds) for headers alone."""
    def unreadable(why: str) -> AimerError:
        return AimerError(f"shard {path} is unreadable or truncated ({why}).",
                          "re-download or re-copy this shard.")

    try:
        entries = json.loads(header[8:])
    except ValueError as e:
        raise unreadable(f"invalid header: {e}") from None
    if not isinstance(entries, dict):
        raise unreadable("the header is not a JSON object")
    data_start = len(header)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name in sorted(entries):  # safe_open's order, which callers have relied on
        if name == "__metadata__":
            continue
        entry = entries[name]
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise unreadable(f"malformed header entry for {name}") from None
        dtype_bits(dtype, name)  # an unknown dtype fails here, not later
        info = TensorInfo(name, file, dtype, shape, data_start + begin)
        if begin < 0 or end - begin != info.nbytes:
            raise unreadable(f"tensor {name} spans bytes {begin}..{end}, but {dtype} "
                             f"{list(shape)} takes {info.nbytes}")
        tensors[name] = info
        spans.append((begin, end, name))
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise unreadable(f"tensor {name} starts at data byte {begin}, expected {covered}")
        covered = end
    if data_start + covered > path.stat().st_size:
        raise unreadable(f"the header promises {data_start + covered} bytes, the file has "
                         f"{path.stat().st_size}: truncated")
    return tensors


SAMPLE_BYTES = 1 << 16


def _data_sample(path: Path, data_start: int) -> bytes:
    """The first and last 64 KiB of a shard's data section: cheap, yet it tells
    fine-tunes of one base model apart, which headers alone cannot."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(data_start)
        head = f.read(SAMPLE_BYTES)
        f.seek(max(data_start, size - SAMPLE_BYTES))
        return head + f.read(SAMPLE_BYTES)


def _shard_files(directory: Path) -> tuple[list[str], bytes]:
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        index_bytes = index_path.read_bytes()
        try:
            weight_map = json.loads(index_bytes)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise AimerError(f"{index_path} is not a valid safetensors index ({e}).",
                             "re-download the checkpoint's index file.") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise AimerError(
                f"checkpoint {directory} is missing shard file(s) listed in "
                f"{INDEX_NAME}: {', '.join(missing)}.",
                "finish downloading the checkpoint (all shards must be present).")
        return files, index_bytes
    if (directory / SINGLE_NAME).is_file():
        return [SINGLE_NAME], b""
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        return found, b""
    raise AimerError(
        f"no safetensors weights found in {directory} (expected {SINGLE_NAME} or "
        f"{INDEX_NAME}).",
        "point the model at a local Hugging Face checkpoint directory in safetensors format.")


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read config, index and shard headers of a local checkpoint (plus a 128 KiB
    sample per shard for its identity); no tensor is read.

    Args:
        path: a local Hugging Face checkpoint directory in safetensors format.

    Returns:
        The checkpoint, with every tensor's header entry and the fingerprint.

    Raises:
        AimerError: `path` is not a directory; config.json is missing or not valid
            JSON; the index or hf_quant_config.json is not valid; a shard the index
            lists is missing; no safetensors weights are found; or a shard's header is
            unreadable, names an unknown dtype or does not match the file (truncated).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise AimerError(
            f"model {str(path)!r} is not a local directory; AIMER scores experts "
            "straight from the checkpoint files.",
            "download the checkpoint first (e.g. `huggingface-cli download MODEL "
            "--local-dir DIR`) and pass DIR as the model.")
    config_path = directory / "config.json"
    try:
        config_bytes = config_path.read_bytes()
        config = json.loads(config_bytes)
    except FileNotFoundError:
        raise AimerError(f"{config_path} does not exist.",
                         "point the model at a checkpoint directory with a config.json.") from None
    except ValueError as e:
        raise AimerError(f"{config_path} is not valid JSON ({e}).",
                         "repair or re-download config.json.") from None

    files, index_bytes = _shard_files(directory)
    digest = hashlib.sha256()
    digest.update(config_bytes)
    digest.update(index_bytes)
    hf_quant_config = _hf_quant_config(directory, config, digest)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        shard = directory / file
        digest.update(file.encode())
        header = _read_header(shard)
        digest.update(header)
        tensors.update(_tensors_of_shard(shard, file, header))
        digest.update(_data_sample(shard, len(header)))
    return Checkpoint(directory, config, tuple(files), tensors, digest.hexdigest(),
                      hf_quant_config)


def _hf_quant_config(directory: Path, config: Mapping[str, Any],
                     digest: Any) -> Mapping[str, Any] | None:
    """hf_quant_config.json when config.json has no quantization_config, as vLLM does
    (transformers_utils/config.py); its bytes join the fingerprint."""
    inner = config.get("text_config")
    if config.get("quantization_config") or (
            isinstance(inner, Mapping) and inner.get("quantization_config")):
        return None
    path = directory / HF_QUANT_CONFIG_NAME
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise AimerError(f"{path} is not valid JSON ({e}).",
                         f"repair or re-download {HF_QUANT_CONFIG_NAME}.") from None
    digest.update(raw)
    return data if isinstance(data, Mapping) else None
