"""Plan files of neighbouring tools, read into our `Plan` and written from it.

Every reader ends in `plan_from_pruned_experts`, so a foreign plan passes the same
checks as ours (ids in range, complement, uniform count, balanced groups, top_k floor).
The format is told from the content, never from the file name. Where each shape comes
from (read in the producers' public code):

- ``vllm-aimer``: our own plan.json (`Plan.to_json`).
- ``pruned-experts``: the AIMER authors' ``pruned_experts.json``
  (ZongfangLiu/AIMER src/calib_free_prune.py: ``{str(layer): sorted(pruned)}`` for the
  layers that prune something, ``json.dump(indent=2)``; layer = decoder-layer index of
  ``model.model.layers``, see ``_iter_moe_layers``).
- ``pruning-plan``: the authors' ``pruning_plan.json`` (same script): ``{"plan": [{"layer",
  "total_experts", "pruned_experts", "kept_experts", "prune_ratio"}], "metric",
  "uniform_pruning", "uniform_pruned_per_layer"}``. It holds per-layer *counts* only, so
  the ids come from the ``pruned_experts.json`` the script writes beside it; the counts
  are checked against it.
- ``vllm-profile``: vLLM PR #37824 (RIY, ``--riy-expert-profile``) and PR #42613
  (``--moe-pruned-experts-profile``, vllm/utils/moe_pruned_experts.py): ``{"version": 1,
  "model"?, "workload"?, "pruned_experts": [[layer, expert], ...]}`` with global expert
  ids; layer = decoder-layer index of the FusedMoE prefix (#42613
  ``extract_moe_layer_index``: ``layers\\.(\\d+)``). RIY version 2 adds ``routing_mode``:
  ``pre_topk_mask`` is version 1's behaviour (pruned experts masked before top-k, i.e.
  removed from routing, as here); ``post_topk_drop`` routes over every expert and then
  drops pruned ones, a different model, and is refused. The SHAPE converter's profile
  adds ``_metadata`` (ignored). RIY's activation statistics (``{"num_layers",
  "num_experts", "layers": [{"layer", "freq", "weight_sum"}]}``) are not a plan.
- ``vllm-ascend``: vllm-ascend PR #12525 (vllm_ascend/patch/worker/
  patch_qwen3_moe_pruning.py): JSONL, one ``{"<layer>": [expert ids, most important
  first]}`` per line, plus a separate ``expert_prune_ratio``: every layer keeps the first
  ``int(E * (1 - ratio))`` ids of its list (so the tail is pruned; ids missing from a list
  are pruned too); layer = ``extract_layer_index`` of the MoE block prefix; every MoE
  layer needs a line. The one format that comes with a ratio.
- ``llm-compressor``: llm-compressor's REAPPruningModifier ``report_path``
  (src/llmcompressor/modifiers/pruning/reap/base.py ``on_finalize``: ``json.dump(
  self._retained_experts)``): ``{"<MoE block module name>": [kept ids]}``, e.g.
  ``"model.layers.3.mlp"`` (transformers' module names, which may differ from the
  checkpoint's tensor names, e.g. Mixtral's ``mlp`` vs ``block_sparse_moe``: only the
  layer index is used).

Layer keys are decoder-layer indices in every format above. A file whose layers fit
the checkpoint only as MoE ordinals (0..n-1 counting MoE layers) is refused with that
diagnosis rather than renumbered, and so is a plan that prunes a different number of
experts in different layers (vLLM builds every MoE layer with one expert count).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_aimer.checkpoint import Checkpoint
from vllm_aimer.constraints import check_ratio
from vllm_aimer.errors import AimerError
from vllm_aimer.layout import ExpertLayout
from vllm_aimer.plan import (PLAN_FILE, PRUNED_EXPERTS_FILE, Plan, identity_plan,
                             plan_from_pruned_experts, read_plan)

__all__ = ["FORMATS", "WRITABLE_FORMATS", "VLLM_PROFILE_FILE", "detect_format", "file_format",
           "read_plan_file",
           "resolve_plan_path", "vllm_profile", "ascend_lines", "llm_compressor_report",
           "write_plan_as", "ascend_ratio"]

VLLM_PROFILE_FILE = "vllm_profile.json"
PRUNING_PLAN_FILE = "pruning_plan.json"

FORMATS: dict[str, str] = {
    "vllm-aimer": "vllm-aimer plan.json",
    "pruned-experts": "AIMER authors' pruned_experts.json",
    "pruning-plan": "AIMER authors' pruning_plan.json",
    "vllm-profile": "vLLM #37824/#42613 pruned-experts profile",
    "vllm-ascend": "vllm-ascend ordered expert lists (JSONL)",
    "llm-compressor": "llm-compressor REAP report (kept experts)",
}
# pruning_plan.json holds counts only: it cannot be written on its own.
WRITABLE_FORMATS = ("vllm-aimer", "pruned-experts", "vllm-profile", "vllm-ascend",
                    "llm-compressor")
_REMAKE = "make a plan for this checkpoint with `vllm-aimer score MODEL --ratio R --output DIR`."
_LAYER_KEY = re.compile(r"0|[1-9][0-9]*")
# A MoE block's module name in llm-compressor's report: `...layers.N.<block>`.
_MODULE_KEY = re.compile(r"^(?:.*\.)?layers\.(?P<layer>0|[1-9][0-9]*)\.[A-Za-z_]\w*$")
_UNIFORM = ("vLLM builds every MoE layer with one expert count, so plans must be uniform.")


# --------------------------------------------------------------------------- reading

def resolve_plan_path(path: str | Path) -> Path:
    """A plan file, or the first plan file in a directory (ours first)."""
    p = Path(path)
    if p.is_dir():
        names = (PLAN_FILE, PRUNED_EXPERTS_FILE, VLLM_PROFILE_FILE)
        found = [p / n for n in names if (p / n).is_file()]
        if not found:
            raise AimerError(f"plan directory {str(path)!r} holds none of {', '.join(names)}.",
                             "pass the plan file itself, or the --output directory of "
                             "`vllm-aimer score`.")
        return found[0]
    return p


def _read_text(p: Path, shown: str) -> str:
    try:
        return p.read_text()
    except FileNotFoundError:
        raise AimerError(f"plan file {shown!r} does not exist.",
                         "pass the path of a plan file (pruned_experts.json, plan.json, a vLLM "
                         "profile, ...; `vllm-aimer score` writes them).") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise AimerError(f"plan file {shown!r} cannot be read ({reason}).",
                         "check the path and its permissions.") from None


def _parse(text: str, shown: str) -> Any:
    """One JSON document, or the objects of a JSON Lines file (a list of them)."""
    try:
        return json.loads(text)
    except ValueError as whole:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            out = []
            for n, line in enumerate(lines, 1):
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise AimerError(f"plan file {shown!r} is neither valid JSON nor JSON Lines "
                                     f"(line {n}: {e}).", _KNOWN) from None
            return out
        raise AimerError(f"plan file {shown!r} is not valid JSON ({whole}).", _KNOWN) from None


_KNOWN = ("pass a plan in one of: " + "; ".join(FORMATS.values()) + ".")


def detect_format(data: Any, with_ratio: bool = False) -> str:
    """The format of parsed plan content (see the module docstring); `with_ratio`: a
    prune ratio came with the file, which only vllm-ascend's lists take."""
    if isinstance(data, list):
        if data and all(isinstance(d, dict) and len(d) == 1 for d in data):
            return "vllm-ascend"
        return "unknown"
    if not isinstance(data, dict):
        return "unknown"
    if "format" in data:
        return "vllm-aimer"
    if "pruned_experts" in data:
        return "vllm-profile"
    if isinstance(data.get("plan"), list):
        return "pruning-plan"
    if isinstance(data.get("layers"), list) and "num_experts" in data:
        return "riy-stats"
    keys = [str(k) for k in data]
    if all(_LAYER_KEY.fullmatch(k) for k in keys):
        # One JSONL line of vllm-ascend parses as a whole document too; the ratio that
        # must come with it tells the two apart.
        return "vllm-ascend" if with_ratio and len(keys) == 1 else "pruned-experts"
    if keys and all(_MODULE_KEY.match(k) for k in keys):
        return "llm-compressor"
    return "unknown"


def file_format(path: str | Path, with_ratio: bool = False) -> str:
    """The format of a plan file (or of the plan file a directory holds)."""
    p = resolve_plan_path(path)
    return detect_format(_parse(_read_text(p, str(p)), str(p)), with_ratio)


def read_plan_file(path: str | Path, layout: ExpertLayout, ckpt: Checkpoint | str,
                   ratio: float | None = None) -> Plan:
    """Any supported plan file (or a directory holding one), checked against the
    checkpoint. `ratio` only goes with vllm-ascend's ordered lists. The result may lack
    the checkpoint's MTP layers (no foreign format has them; see `with_mtp_layers`)."""
    fingerprint = ckpt if isinstance(ckpt, str) else ckpt.fingerprint
    p = resolve_plan_path(path)
    shown = str(p)
    data = _parse(_read_text(p, str(path) if p == Path(path) else shown), shown)
    fmt = detect_format(data, ratio is not None)
    where = f"plan file {shown!r}"
    if fmt == "unknown":
        raise AimerError(f"{where} is in no plan format vllm-aimer knows.", _KNOWN)
    if fmt == "riy-stats":
        raise AimerError(f"{where} holds RIY expert activation statistics, not a plan.",
                         "turn the statistics into a profile (`pruned_experts` pairs) first.")
    if ratio is not None and fmt != "vllm-ascend":
        raise AimerError(
            f"prune_ratio and plan were both given, and {where} is a {FORMATS[fmt]}, which "
            "already fixes which experts are pruned (only vllm-ascend's ordered expert "
            "lists take a ratio).", "pass only one of them.")
    if fmt == "vllm-aimer":
        return read_plan(p, layout, fingerprint)  # with its fingerprint check
    if fmt == "vllm-ascend":
        if ratio is None:
            raise AimerError(
                f"{where} holds vllm-ascend ordered expert lists, which prune the tail of "
                "each list by a ratio given separately (expert_prune_ratio).",
                'pass the ratio with the plan: {"plan": "...", "prune_ratio": R} '
                "(or --ratio R on the command line).")
        pruned = _from_ascend(data if isinstance(data, list) else [data], layout, ratio, where)
    elif fmt == "pruned-experts":
        pruned = _from_pruned_experts(data, where)
    elif fmt == "pruning-plan":
        pruned = _from_pruning_plan(data, p, layout, where)
    elif fmt == "vllm-profile":
        pruned = _from_vllm_profile(data, where)
    else:
        pruned = _from_llm_compressor(data, layout, where)
    return _plan(pruned, layout, fingerprint, where, fmt)


def _ids(value: Any, where: str, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                              for i in value):
        raise AimerError(f"{where}: {what} must be a list of integer expert ids, got {value!r}.",
                         _KNOWN)
    return value


def _from_pruned_experts(data: Any, where: str) -> dict[int, list[int]]:
    bad = [k for k in data if not _LAYER_KEY.fullmatch(str(k))] if isinstance(data, dict) else [data]
    if bad:
        raise AimerError(f"{where} has non-integer layer keys {bad[:5]}.",
                         'a plan maps MoE layer indices to pruned ids: {"0": [3, 7], ...}.')
    return {int(k): _ids(v, where, f"layer {k}") for k, v in data.items()}


def _from_pruning_plan(data: Mapping[str, Any], path: Path, layout: ExpertLayout,
                       where: str) -> dict[int, list[int]]:
    """Counts from pruning_plan.json, ids from the pruned_experts.json beside it."""
    sibling = path.parent / PRUNED_EXPERTS_FILE
    if not sibling.is_file():
        raise AimerError(
            f"{where} is the AIMER authors' pruning_plan.json, which holds per-layer counts "
            f"only; the pruned ids are in the {PRUNED_EXPERTS_FILE} their script writes "
            f"beside it, and {sibling} does not exist.",
            f"keep {PRUNED_EXPERTS_FILE} next to {PRUNING_PLAN_FILE}, or pass it instead.")
    ids = _from_pruned_experts(_parse(_read_text(sibling, str(sibling)), str(sibling)),
                               f"plan file {str(sibling)!r}")
    counts: dict[int, int] = {}
    for row in data["plan"]:
        if not (isinstance(row, dict) and all(isinstance(row.get(k), int) for k in
                                              ("layer", "total_experts", "pruned_experts"))):
            raise AimerError(f"{where}: plan rows need integer layer, total_experts and "
                             f"pruned_experts, got {row!r}.", _KNOWN)
        if row["total_experts"] != layout.num_experts:
            raise AimerError(
                f"{where} is for a different checkpoint: layer {row['layer']} has "
                f"{row['total_experts']} experts, this checkpoint {layout.num_experts}.", _REMAKE)
        counts[row["layer"]] = row["pruned_experts"]
    # The authors' file lists only layers that prune something.
    said = {layer: n for layer, n in counts.items() if n}
    found = {layer: len(v) for layer, v in ids.items()}
    if said != found:
        raise AimerError(
            f"{where} and {sibling} disagree: the plan prunes {_counts(said)} but the ids "
            f"prune {_counts(found)}.",
            "use the two files written together by one run of the authors' script.")
    return ids


def _counts(counts: Mapping[int, int]) -> str:
    distinct = sorted(set(counts.values()))
    return (f"{distinct[0]} experts in each of {len(counts)} layers" if len(distinct) == 1
            else f"{dict(sorted(counts.items()))} experts per layer" if counts else "nothing")


def _from_vllm_profile(data: Mapping[str, Any], where: str) -> dict[int, list[int]]:
    version = data.get("version", 1)
    mode = data.get("routing_mode")
    if isinstance(version, bool) or version not in (1, 2):
        raise AimerError(f"{where}: unsupported profile version {version!r} (vLLM's RIY and "
                         "#42613 profiles are version 1 or 2).", _KNOWN)
    if version == 2 and mode != "pre_topk_mask":
        raise AimerError(
            f"{where} is a RIY version-2 profile with routing_mode {mode!r}: it routes over "
            "every expert and then drops the pruned ones from each token's top-k, a different "
            "model from one whose pruned experts are removed (what vllm-aimer serves).",
            'use routing_mode "pre_topk_mask" (or a version-1 profile), which removes the '
            "pruned experts from routing.")
    if version == 1 and mode is not None:
        raise AimerError(f"{where}: a version-1 profile has no routing_mode (RIY refuses it).",
                         'drop routing_mode, or write version 2 with "pre_topk_mask".')
    pairs = data["pruned_experts"]
    if not isinstance(pairs, list):
        raise AimerError(f"{where}: pruned_experts must be a list of [layer, expert] pairs.",
                         _KNOWN)
    out: dict[int, list[int]] = {}
    seen: set[tuple[int, int]] = set()
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair)):
            raise AimerError(f"{where}: each pruned_experts entry must be a [layer, expert] "
                             f"pair of non-negative integers, got {pair!r}.", _KNOWN)
        if tuple(pair) in seen:
            raise AimerError(f"{where} lists [layer, expert] {pair} twice.",
                             "list each pruned expert once.")
        seen.add((pair[0], pair[1]))
        out.setdefault(pair[0], []).append(pair[1])
    return out


def _from_ascend(lines: Sequence[Any], layout: ExpertLayout, ratio: Any,
                 where: str) -> dict[int, list[int]]:
    ratio = check_ratio(ratio)
    E = layout.num_experts
    # vllm-ascend's _get_pruned_expert_count: per layer, truncated (not our global rounding).
    keep = int(E * (1.0 - ratio))
    if keep <= 0:
        raise AimerError(f"{where}: prune ratio {ratio} keeps no expert of {E}.",
                         "pass a smaller ratio.")
    out: dict[int, list[int]] = {}
    for n, entry in enumerate(lines, 1):
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise AimerError(f"{where}: line {n} must be one {{\"<layer>\": [ids]}} object.",
                             _KNOWN)
        key, ordered = next(iter(entry.items()))
        if not _LAYER_KEY.fullmatch(str(key)):
            raise AimerError(f"{where}: line {n} has layer key {key!r}, not a layer index.",
                             _KNOWN)
        ordered = _ids(ordered, where, f"layer {key}")
        if len(set(ordered)) != len(ordered):
            raise AimerError(f"{where}: layer {key} lists an expert twice.",
                             "list each expert once, most important first.")
        if int(key) in out:
            raise AimerError(f"{where} has two lines for layer {key}.", "keep one per layer.")
        if len(ordered) < keep:
            raise AimerError(
                f"{where}: layer {key} orders {len(ordered)} experts, but ratio {ratio} keeps "
                f"int({E} x (1 - {ratio})) = {keep} of them.",
                "pass a larger ratio, or a list that ranks at least that many experts.")
        bad = [i for i in ordered if not 0 <= i < E]
        if bad:
            raise AimerError(f"{where} is for a different checkpoint: layer {key} names expert "
                             f"id(s) {bad[:5]}, this checkpoint has experts 0..{E - 1}.", _REMAKE)
        kept = set(ordered[:keep])
        out[int(key)] = [e for e in range(E) if e not in kept]
    return out


def _from_llm_compressor(data: Mapping[str, Any], layout: ExpertLayout,
                         where: str) -> dict[int, list[int]]:
    E = layout.num_experts
    out: dict[int, list[int]] = {}
    for key, kept in data.items():
        layer = int(_MODULE_KEY.match(key)["layer"])  # type: ignore[index]
        kept = _ids(kept, where, key)
        if layer in out:
            raise AimerError(f"{where} names layer {layer} twice.", "keep one entry per layer.")
        if len(set(kept)) != len(kept):
            raise AimerError(f"{where}: {key} keeps an expert twice.", "list each kept id once.")
        bad = [i for i in kept if not 0 <= i < E]
        if bad:
            raise AimerError(f"{where} is for a different checkpoint: {key} keeps expert id(s) "
                             f"{bad[:5]}, this checkpoint has experts 0..{E - 1}.", _REMAKE)
        out[layer] = [e for e in range(E) if e not in set(kept)]
    return out


def _short(ids: Sequence[int]) -> str:
    ids = sorted(ids)
    return str(ids) if len(ids) <= 8 else f"[{ids[0]}..{ids[-1]}] ({len(ids)} layers)"


def check_layer_keys(layers: set[int], layout: ExpertLayout, where: str, fmt: str) -> None:
    """The file's layer indices against the checkpoint's MoE layers (decoder-layer
    indices): refuse MoE ordinals, non-MoE layers and layers left out."""
    trunk, mtp = list(layout.layers), list(layout.mtp_layers)
    stray = sorted(layers - set(trunk) - set(mtp))
    if stray:
        ordinals = list(range(len(trunk)))
        if layers <= set(ordinals) and trunk != ordinals:
            raise AimerError(
                f"{where} names layers {_short(layers)}, which fit this checkpoint only as MoE "
                f"ordinals (the i-th MoE layer); a {FORMATS[fmt]} names decoder layers (the N "
                f"of model.layers.N), and this checkpoint's MoE layers are {_short(trunk)}.",
                "renumber the file's layers to decoder-layer indices (MoE ordinal i is "
                f"decoder layer {trunk[0]}, {trunk[1] if len(trunk) > 1 else ''}... in that "
                "order), or regenerate the plan for this checkpoint.")
        raise AimerError(
            f"{where} is for a different checkpoint: it names {len(layers)} MoE layers "
            f"{_short(layers)} but this checkpoint has {len(trunk)} MoE layers {_short(trunk)}"
            + (f" (and MTP layers {mtp})" if mtp else "")
            + f"; layer(s) {_short(stray)} have no routed experts here.", _REMAKE)
    missing = sorted(set(trunk) - layers)
    if missing and layers & set(trunk):
        if fmt == "vllm-ascend":
            raise AimerError(f"{where} has no expert list for MoE layer(s) {_short(missing)} "
                             "(vllm-ascend refuses such a file too).",
                             "give every MoE layer a line.")
        raise AimerError(
            f"{where} prunes experts in layers {_short(sorted(layers & set(trunk)))} but none in "
            f"layers {_short(missing)} of this checkpoint's {len(trunk)} MoE layers: it is "
            f"for a different checkpoint, or not uniform; {_UNIFORM}",
            "prune the same number of experts in every MoE layer of this checkpoint "
            "(vllm-aimer score makes uniform plans).")


def _plan(pruned: dict[int, list[int]], layout: ExpertLayout, fingerprint: str, where: str,
          fmt: str) -> Plan:
    if pruned:
        check_layer_keys(set(pruned), layout, where, fmt)
    if not any(pruned.values()):
        # Nothing pruned (the authors write {} for k = 0): the unpruned model.
        return identity_plan(layout, fingerprint)
    return plan_from_pruned_experts(layout, {str(k): v for k, v in sorted(pruned.items())},
                                    fingerprint, where.removeprefix("plan "))


# --------------------------------------------------------------------------- writing

def vllm_profile(plan: Plan, model: str | None = None) -> dict[str, Any]:
    """The vLLM #37824 (RIY, version 1) / #42613 profile of `plan`: trunk layers only
    (RIY checks layer < num_hidden_layers, and no profile format has MTP layers)."""
    pairs = [[layer, e] for layer in plan.layer_ids for e in plan.layer(layer).pruned]
    out: dict[str, Any] = {"version": 1}
    if model:
        out["model"] = model
    out["workload"] = "none: vllm-aimer AIMER weight scores (calibration-free)"
    out["pruned_experts"] = pairs
    return out


def _importance_order(plan: Plan, layer: int) -> list[int]:
    """Kept ids then pruned ids, each most important first: by AIMER score ascending (the
    highest scores are pruned) when the plan has scores, else by id."""
    lp = plan.layer(layer)
    key = (lambda e: (lp.scores[e], e)) if lp.scores is not None else (lambda e: e)  # type: ignore[index]
    return sorted(lp.kept, key=key) + sorted(lp.pruned, key=key)


def ascend_ratio(plan: Plan) -> float:
    """An expert_prune_ratio from which vllm-ascend keeps exactly the plan's count
    (it keeps int(E x (1 - ratio)))."""
    E, kept = plan.num_experts, plan.kept_per_layer
    ratio = plan.pruned_per_layer / E
    if int(E * (1.0 - ratio)) != kept:  # float rounding below the integer
        ratio = (plan.pruned_per_layer - 0.5) / E
    assert int(E * (1.0 - ratio)) == kept and 0 <= ratio < 1
    return ratio


def ascend_lines(plan: Plan) -> str:
    """vllm-ascend JSONL: per trunk layer, every expert, the kept ones first."""
    return "".join(json.dumps({str(layer): _importance_order(plan, layer)}) + "\n"
                   for layer in plan.layer_ids)


def llm_compressor_report(plan: Plan, ckpt: Checkpoint, layout: ExpertLayout) -> dict[str, list[int]]:
    """llm-compressor's report: MoE block module name -> kept ids, trunk layers. Module
    names are the checkpoint's (the router tensor's parent)."""
    blocks: dict[int, str] = {}
    for name in ckpt.tensors:
        layer = layout.arch.names.match_router(name, layout.mtp_base)
        if layer is not None and layer not in blocks:
            tail = next(t for t in layout.arch.names.router_tensors if name.endswith("." + t))
            blocks[layer] = name[: -len(tail) - 1]
    return {blocks.get(layer, f"model.layers.{layer}.mlp"): list(plan.layer(layer).kept)
            for layer in plan.layer_ids}


def write_plan_as(plan: Plan, fmt: str, *, model: str | None = None,
                  ckpt: Checkpoint | None = None, layout: ExpertLayout | None = None) -> str:
    """`plan` as the text of a `fmt` file (see WRITABLE_FORMATS)."""
    if fmt == "vllm-aimer":
        return plan.to_json()
    if fmt == "pruned-experts":
        return json.dumps(plan.pruned_experts(), indent=1) + "\n"
    if fmt == "vllm-profile":
        return json.dumps(vllm_profile(plan, model), indent=1) + "\n"
    if fmt == "vllm-ascend":
        return ascend_lines(plan)
    if fmt == "llm-compressor":
        assert ckpt is not None and layout is not None
        return json.dumps(llm_compressor_report(plan, ckpt, layout), indent=1) + "\n"
    raise AimerError(f"cannot write plan format {fmt!r}.",
                     f"choose one of {', '.join(WRITABLE_FORMATS)}.")
