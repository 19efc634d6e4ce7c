"""Write a pruned checkpoint, streamed from the source shards (no dense model in memory).

The tensors written are exactly what `--load-format aimer` hands vLLM: the loader's
`PrunedWeights` stream (pruned experts never read, kept ones renumbered, fused and router
tensors sliced; packed quantized bytes unchanged). Its names, dtypes and shapes are known
from the source headers and the plan before any tensor is read (`PlanMap`), so every
output shard's header is written first and each tensor then goes straight to its offset:
memory stays within one tensor plus the reading window, whatever the model size.

Everything is written into a temporary directory beside the output and renamed into place
at the end, so a failed export leaves nothing behind (and `--force` replaces an old
export only once the new one is complete).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_aimer import __version__
from vllm_aimer.architectures import TensorNames
from vllm_aimer.checkpoint import INDEX_NAME, Checkpoint, TensorInfo
from vllm_aimer.dtypes import dtype_bits
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout
from vllm_aimer.outputs import write_plan_outputs
from vllm_aimer.constraints import check_prune_count, check_ratio, prune_count
from vllm_aimer.plan import Plan, identity_plan, make_plan, with_mtp_layers
from vllm_aimer.plan_formats import FORMATS, file_format, read_plan_file
from vllm_aimer.provenance import PROVENANCE_DIR, PROVENANCE_FILE, read_provenance
from vllm_aimer.scoring import score_checkpoint
from vllm_aimer.weights import PlanMap, PrunedWeights

__all__ = ["export_checkpoint", "parse_size", "check_output_dir", "read_provenance",
           "ExportResult", "PROVENANCE_DIR", "PROVENANCE_FILE", "export_plan",
           "pruned_config", "READ_WINDOW"]

EXPORT_FORMAT = "vllm-aimer.export/v1"
DEFAULT_MAX_SHARD_SIZE = "5GB"
READ_WINDOW = 256 << 20
"""Bytes read from a source shard before it is reopened (see PrunedWeights.iterate)."""
# Dense weights in other formats are not copied: stock loaders could pick them up
# instead of the pruned safetensors.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5",
                   ".msgpack", ".npz")
_TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    **{getattr(torch, n): s for n, s in (("uint16", "U16"), ("uint32", "U32"),
                                         ("uint64", "U64"), ("float8_e8m0fnu", "F8_E8M0"))
       if hasattr(torch, n)},
}


# --------------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes of "5GB" (10^9, as transformers' max_shard_size), "2GiB" (2^30) or "1000"."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise AimerError(f"--max-shard-size {text!r} is not a size.",
                             'pass e.g. "5GB", "500MB", "2GiB" or a number of bytes.')
        value = int(float(m[1]) * _UNITS[(m[2] or "B").upper()])
    if value <= 0:
        raise AimerError(f"--max-shard-size must be positive, got {text!r}.",
                         'pass e.g. "5GB".')
    return value


# --------------------------------------------------------------------------- output layout

@dataclass
class _Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str

    @property
    def nbytes(self) -> int:
        return TensorInfo(self.name, "", self.dtype, self.shape).nbytes

    @property
    def align(self) -> float:
        return dtype_bits(self.dtype, self.name) / 8


def _output_specs(ckpt: Checkpoint, pmap: PlanMap) -> list[_Spec]:
    """What `PrunedWeights` will yield, in its order, from headers and the plan alone."""
    specs = []
    for _, infos in ckpt.tensors_by_file():
        for info in infos:
            is_expert, new_name = pmap.expert(info.name)
            if is_expert:
                if new_name is not None:
                    specs.append(_Spec(new_name, info.dtype, info.shape, info.name))
                continue
            shape = list(info.shape)
            rows = pmap.fused_rows(info.name)
            if rows is not None:
                shape[0] = len(rows)
            else:
                router = pmap.router_rows(info.name)
                if router is not None:
                    shape[router[1]] = len(router[0])
            specs.append(_Spec(info.name, info.dtype, tuple(shape), info.name))
    return specs


def _shards(specs: list[_Spec], max_bytes: int) -> list[list[_Spec]]:
    """Consecutive runs of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[_Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


@dataclass
class _Shard:
    file: str
    header: bytes
    offsets: dict[str, tuple[int, int]]
    """name -> (start, stop) in the data section."""
    pending: set[str] = field(default_factory=set)
    fd: int | None = None

    @property
    def data_start(self) -> int:
        return 8 + len(self.header)


def _layout_shard(file: str, specs: list[_Spec], metadata: Mapping[str, str]) -> _Shard:
    """The safetensors header of one shard. Tensors are ordered by element size, largest
    first (as safetensors' own writer does), so that every tensor starts aligned to its
    element size; the header is padded with spaces to a multiple of 8 bytes."""
    ordered = sorted(specs, key=lambda s: -s.align)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offsets, at = {}, 0
    for spec in ordered:
        offsets[spec.name] = (at, at + spec.nbytes)
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [at, at + spec.nbytes]}
        at += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return _Shard(file, raw, offsets, set(offsets))


# --------------------------------------------------------------------------- config

def _rename_module(name: str, names: TensorNames, pmap: PlanMap,
                   where: str) -> tuple[bool, str | None]:
    """(whether `name` names one routed expert of a planned layer, its new name or None
    when pruned). Patterns ("re:...", globs) naming a specific expert are refused."""
    hit = names.match_expert_module(name)
    if hit is not None and hit[0] in pmap.kept:
        layer, expert, head, tail = hit
        new = pmap.new_id[layer].get(expert)
        return True, (None if new is None else f"{head}{new}{tail}")
    if re.search(r"experts\\?\.\d", name) and re.search(r"[*+?\[\]()|^$\\]|^re:", name):
        raise AimerError(
            f"{where} holds the pattern {name!r}, which names routed experts by id; "
            "vllm-aimer cannot renumber a pattern.",
            "rewrite that entry by hand for the pruned model, or list the modules explicitly.")
    return False, None


def _rewrite_modules(value: Any, names: TensorNames, pmap: PlanMap, where: str) -> Any:
    """Per-expert module names anywhere in a quantization config (lists such as
    modules_to_not_convert / ignore, or dict keys) renamed to the kept ids; pruned
    experts' entries dropped."""
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, str):
                hit, new = _rename_module(item, names, pmap, where)
                if hit and new is None:
                    continue
                out.append(new if hit else item)
            else:
                out.append(_rewrite_modules(item, names, pmap, where))
        return out
    if isinstance(value, dict):
        out_d = {}
        for key, item in value.items():
            hit, new = (_rename_module(key, names, pmap, where) if isinstance(key, str)
                        else (False, None))
            if hit and new is None:
                continue
            out_d[new if hit else key] = _rewrite_modules(item, names, pmap, where)
        return out_d
    return value


def pruned_config(config: Mapping[str, Any], layout: ExpertLayout, plan: Plan,
                  pmap: PlanMap) -> dict[str, Any]:
    """config.json of the pruned model: the kept count in every alias of the family's
    expert count (in text_config for multimodal configs, and at the top level where the
    config has it there), per-expert quantization entries renumbered. Nothing else
    changes (top_k, n_group: the plan keeps groups equal)."""
    out = json.loads(json.dumps(config))
    kept = plan.kept_per_layer
    text = out.get("text_config") if isinstance(out.get("text_config"), dict) else None
    for key in layout.arch.expert_count_keys:
        if text is not None:
            text[key] = kept
            if key in out:
                out[key] = kept
        else:
            out[key] = kept
    for holder in (out, text or {}):
        if isinstance(holder.get("quantization_config"), dict):
            holder["quantization_config"] = _rewrite_modules(
                holder["quantization_config"], layout.arch.names, pmap,
                "config.json quantization_config")
    return out


# --------------------------------------------------------------------------- the output dir

def check_output_dir(output: Path, source: Path, force: bool) -> None:
    """Refuse before any work: an output that is the source or holds it, a file, or a
    non-empty directory without force."""
    out, src = output.resolve(), source.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise AimerError(f"--output {str(output)!r} is, holds or lies inside the source "
                         f"checkpoint {str(source)!r}.",
                         "write the export to a directory of its own, outside the source.")
    if output.exists() and not output.is_dir():
        raise AimerError(f"--output {str(output)!r} exists and is not a directory.",
                         "pass a new or empty directory.")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise AimerError(f"--output {str(output)!r} is not empty.",
                         "pass a new or empty directory, or --force to replace its contents.")
    parent = output.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise AimerError(f"cannot write beside {str(output)!r}: {parent} is not a writable "
                         "directory (the export is written there first, then renamed).",
                         "create the parent directory, or choose a writable place.")


def _copy_side_files(source: Path, dest: Path) -> list[str]:
    """Tokenizer, chat template, generation config, README...: everything but weights,
    weight indexes, config.json (rewritten), hidden entries and an earlier export's
    vllm-aimer/ directory."""
    copied = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] == PROVENANCE_DIR:
            continue
        if path.is_dir() or rel.as_posix() == "config.json":
            continue
        name = path.name
        if name.endswith(WEIGHT_SUFFIXES) or (name.endswith(".index.json")
                                              and name[:-len(".index.json")].endswith(WEIGHT_SUFFIXES)):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        copied.append(rel.as_posix())
    return copied


# --------------------------------------------------------------------------- export

AIMER_CRITERION = "AIMER: mean(|w|) / rms(w) of each routed expert's weights, highest pruned"


def export_plan(ckpt: Checkpoint, layout: ExpertLayout, *, ratio: float | None = None,
                plan_path: str | None = None, progress: bool = True) -> tuple[Plan, str, str]:
    """(plan, criterion, where it came from) for an export, as the loader makes them: a
    plan file (any known format; a ratio only with vllm-ascend's lists) whose missing MTP
    layers are scored with AIMER, or AIMER scores at `ratio`. Checks everything it can
    before scoring."""
    if plan_path is not None:
        plan = read_plan_file(plan_path, layout, ckpt, ratio)
        check_prune_count(plan.router, plan.pruned_per_layer, f"plan {plan_path}")
        fmt = file_format(plan_path, ratio is not None)
        criterion = f"as decided by the plan file ({FORMATS[fmt]})"
        if layout.mtp_layers and not plan.mtp_layers and plan.total_pruned:
            plan = with_mtp_layers(plan, layout, _scores(ckpt, layout, layout.mtp_layers,
                                                         progress))
            criterion += "; MTP layers: " + AIMER_CRITERION
        return plan, criterion, f"plan file {Path(plan_path).resolve()} ({fmt})"
    if ratio is None:
        raise AimerError("export needs --ratio R or --plan FILE.",
                         "pass --ratio 0.5 to prune half of the experts by AIMER, or --plan "
                         "with a plan file.")
    ratio = check_ratio(ratio)
    if ratio == 0.0:
        return identity_plan(layout, ckpt.fingerprint), AIMER_CRITERION, "ratio 0 (nothing pruned)"
    prune_count(len(layout.layers), layout.router, ratio)
    scores = _scores(ckpt, layout, layout.all_layers, progress)
    return (make_plan(layout, scores, ratio, ckpt.fingerprint), AIMER_CRITERION,
            f"AIMER scores at ratio {ratio:g}")


def _scores(ckpt: Checkpoint, layout: ExpertLayout, layers: tuple[int, ...],
            progress: bool) -> dict[int, list[float]]:
    """AIMER scores, one MoE layer per `score_checkpoint` call: each call closes the
    shards it read, so the export's memory stays within one layer's experts of one shard
    instead of a whole shard of mapped pages (the scores are the same: layers are
    scored independently)."""
    scores: dict[int, list[float]] = {}
    for layer in tqdm(layers, desc="AIMER scoring MoE layers", unit="layer",
                      disable=not progress, delay=1.0):
        scores.update(score_checkpoint(ckpt, layout, progress=False, layers=[layer]).scores)
    return scores


@dataclass(frozen=True)
class ExportResult:
    output: Path
    shards: list[str]
    tensors: int
    total_bytes: int
    """Bytes of tensor data written (the index's total_size)."""
    copied: list[str]
    provenance: dict[str, Any]


def _bytes_of(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _write_tensor(shard: _Shard, directory: Path, spec: _Spec, tensor: torch.Tensor) -> None:
    dtype = _TORCH_DTYPES.get(tensor.dtype)
    if dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise AimerError(
            f"internal error: tensor {spec.source} came out of the weight stream as "
            f"{dtype} {list(tensor.shape)}, expected {spec.dtype} {list(spec.shape)}.",
            "report this to vllm-aimer; nothing was written.")
    if shard.fd is None:
        shard.fd = os.open(directory / shard.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(shard.fd, struct.pack("<Q", len(shard.header)) + shard.header, 0)
    start, stop = shard.offsets[spec.name]
    data = _bytes_of(tensor)
    assert len(data) == stop - start, (spec.name, len(data), stop - start)
    at = shard.data_start + start
    while data:
        n = os.pwrite(shard.fd, data, at)
        data, at = data[n:], at + n
    shard.pending.discard(spec.name)
    if not shard.pending:
        os.fsync(shard.fd)
        os.close(shard.fd)
        shard.fd = None


def export_checkpoint(ckpt: Checkpoint, layout: ExpertLayout, plan: Plan, output: str | Path,
                      *, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
                      criterion: str, requested_ratio: float | None = None,
                      plan_source: str) -> ExportResult:
    """Write `plan` applied to `ckpt` as a new checkpoint directory `output`."""
    output = Path(output)
    max_bytes = parse_size(max_shard_size)
    check_output_dir(output, ckpt.directory, force)
    pmap = PlanMap(layout, plan)
    specs = _output_specs(ckpt, pmap)
    config = pruned_config(ckpt.config, layout, plan, pmap)
    groups = _shards(specs, max_bytes)
    metadata = {"format": "pt"}
    shards = [_layout_shard(f"model-{i:05d}-of-{len(groups):05d}.safetensors", g, metadata)
              for i, g in enumerate(groups, 1)]
    where = {spec.name: (shard, spec) for shard, group in zip(shards, groups) for spec in group}
    if len(where) != len(specs):
        raise AimerError("internal error: two output tensors share a name.",
                         "report this to vllm-aimer.")

    need = sum(spec.nbytes for spec in specs)
    free = shutil.disk_usage(output.resolve().parent).free
    if free < need:
        raise AimerError(
            f"the export needs {need / 1e9:.2f} GB of tensor data, but only {free / 1e9:.2f} GB "
            f"are free beside {str(output)!r}.",
            "free space there or choose another --output.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.aimer-export-",
                                dir=output.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is not what a model directory wants
    try:
        stream = PrunedWeights(ckpt, layout, plan)
        written = 0
        for name, tensor in stream.iterate(window=READ_WINDOW):
            if name not in where:
                raise AimerError(f"internal error: the weight stream yielded {name}, which the "
                                 "export did not plan for.", "report this to vllm-aimer.")
            shard, spec = where[name]
            _write_tensor(shard, tmp, spec, tensor)
            written += 1
            del tensor
        left = [n for s in shards for n in s.pending]
        if written != len(specs) or left:
            raise AimerError(f"internal error: {len(left)} planned tensors never came out of "
                             f"the weight stream (e.g. {left[:3]}).", "report this to vllm-aimer.")
        weight_map = {spec.name: shard.file for shard, group in zip(shards, groups)
                      for spec in group}
        total = sum(spec.nbytes for spec in specs)
        (tmp / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = _copy_side_files(ckpt.directory, tmp)
        side = tmp / PROVENANCE_DIR
        side.mkdir()
        plan_files = [p.name for p in write_plan_outputs(plan, side, model=str(ckpt.directory))]
        provenance: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "source": {"path": str(ckpt.directory.resolve()), "fingerprint": ckpt.fingerprint,
                       "family": layout.arch.family, "experts_per_layer": layout.num_experts,
                       "total_bytes": ckpt.total_bytes},
            "criterion": criterion,
            "plan_source": plan_source,
            "requested_ratio": requested_ratio,
            "ratio": plan.ratio,
            "experts_per_layer": plan.kept_per_layer,
            "moe_layers": plan.layer_ids,
            **({"mtp_layers": plan.mtp_layer_ids} if plan.mtp_layer_ids else {}),
            "plan_hash": plan.plan_hash,
            "plan_files": [f"{PROVENANCE_DIR}/{n}" for n in plan_files],
            "vllm_aimer_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        earlier = read_provenance(ckpt.directory)
        if earlier is not None:
            provenance["source_provenance"] = earlier
        (side / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
        _fsync_tree(tmp)
        _swap_into_place(tmp, output)
    except BaseException as e:
        for shard in shards:
            if shard.fd is not None:
                os.close(shard.fd)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise AimerError(
                f"writing the export failed ({e.strerror or e}); nothing was left at "
                f"{str(output)!r}" + (" (its previous contents are untouched)"
                                      if output.exists() else "") + ".",
                f"the export needs about {need / 1e9:.2f} GB beside "
                f"{str(output)!r}: free space there or choose another --output.") from e
        raise
    return ExportResult(output, [s.file for s in shards], len(specs), total, copied, provenance)


def _fsync_tree(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished export to `output`; an old `output` (--force) is moved aside
    first and removed only after the rename succeeded."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.aimer-old-", dir=output.resolve().parent))
        os.rename(output, old / "previous")
    try:
        os.rename(tmp, output)
    except BaseException:
        if old is not None:
            os.rename(old / "previous", output)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
