"""The loader's options from `--model-loader-extra-config`, validated up front."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_aimer.errors import AimerError
from vllm_aimer.constraints import check_ratio

__all__ = ["AIMER_KEYS", "PARENT_KEYS", "AimerOptions", "parse_options", "number",
           "positive_int"]

AIMER_KEYS: tuple[str, ...] = ("prune_ratio", "plan", "plan_out", "plan_cache", "scoring_device")
# Keys vLLM's DefaultModelLoader understands; passed through to it unchanged.
PARENT_KEYS: tuple[str, ...] = ("enable_multithread_load", "num_threads", "enable_weights_track")
EXAMPLE = '\'{"prune_ratio": 0.5}\' or \'{"plan": "plan/pruned_experts.json"}\''


@dataclass(frozen=True)
class AimerOptions:
    """The validated options (built by `parse_options`)."""
    prune_ratio: float | None = None
    """Share of routed experts to prune, in [0, 1); None when a plan file decides."""
    plan: str | None = None
    """A plan file (any known format) or a directory holding one."""
    plan_out: str | None = None
    """Where the loader writes the plan it used."""
    plan_cache: str | bool = True
    """A directory, True for the default (~/.cache/vllm-aimer/plans), False for none."""
    parent: dict[str, Any] = field(default_factory=dict)
    """The remaining keys, for vLLM's own loader."""
    scoring_device: str = "auto"
    """Where plain float experts are reduced: auto (the worker's GPU when there is one),
    cpu, cuda or cuda:N."""


def parse_options(extra: Mapping[str, Any] | str | None) -> AimerOptions:
    """Validate `--model-loader-extra-config` for `--load-format aimer`.

    Args:
        extra: the config as vLLM hands it over: a mapping, its JSON text, or None.

    Returns:
        The options; keys of vLLM's own loader (PARENT_KEYS) are kept in `parent`.

    Raises:
        AimerError: `extra` is missing, empty, not a JSON object or has an unknown
            key; neither prune_ratio nor plan is given; or a value is invalid
            (prune_ratio outside [0, 1), an empty plan/plan_out path, a plan_cache
            that is neither a path nor a bool, a scoring_device other than auto, cpu,
            cuda or cuda:N).
    """
    if extra is None or extra == {}:
        raise AimerError("--load-format aimer needs prune_ratio or plan in "
                         "--model-loader-extra-config.",
                         f"pass --model-loader-extra-config {EXAMPLE}.")
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError as e:
            raise AimerError(f"--model-loader-extra-config is not valid JSON ({e}).",
                             f"pass a JSON object, e.g. {EXAMPLE}.") from None
    if not isinstance(extra, Mapping):
        raise AimerError(f"--model-loader-extra-config must be a JSON object, got {extra!r}.",
                         f"pass e.g. {EXAMPLE}.")
    unknown = sorted(set(extra) - set(AIMER_KEYS) - set(PARENT_KEYS))
    if unknown:
        raise AimerError(
            f"unknown --model-loader-extra-config key(s) {', '.join(map(repr, unknown))}.",
            f"valid keys are {', '.join(AIMER_KEYS + PARENT_KEYS)}.")
    ratio, plan, plan_out = (extra.get(k) for k in AIMER_KEYS[:3])
    plan_cache = extra.get("plan_cache", True)
    if not isinstance(plan_cache, bool) and (not isinstance(plan_cache, str) or not plan_cache.strip()):
        raise AimerError(f"plan_cache must be a directory path or false, got {plan_cache!r}.",
                         'pass e.g. "plan_cache": "/cache/plans", or false to always score.')
    # prune_ratio with plan is valid for one plan format only (vllm-ascend's ordered
    # expert lists, whose tail the ratio prunes): checked once the file is read
    # (plan_formats.read_plan_file).
    if ratio is None and plan is None:
        raise AimerError("--load-format aimer needs prune_ratio or plan.",
                         f"pass --model-loader-extra-config {EXAMPLE}.")
    if ratio is not None:
        ratio = check_ratio(ratio)
    for key, value in (("plan", plan), ("plan_out", plan_out)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise AimerError(f"{key} must be a non-empty path string, got {value!r}.",
                             f'pass e.g. "{key}": "/path/to/dir-or-file".')
    device = extra.get("scoring_device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise AimerError(f"scoring_device must be auto, cpu, cuda or cuda:N, got {device!r}.",
                         'pass e.g. "scoring_device": "cpu" (auto uses the GPU when there is one).')
    parent = {k: v for k, v in extra.items() if k in PARENT_KEYS}
    return AimerOptions(ratio, plan, plan_out, plan_cache, parent, device)


def number(value: Any, flag: str, fix: str) -> float:
    """A command-line or config value as a finite float.

    Args:
        value: a string from the command line, or a number.
        flag: how the user named it (e.g. "--ratio"), for the message.
        fix: the message's fix.

    Raises:
        AimerError: it is a bool, not a number, or not finite.
    """
    if isinstance(value, bool):
        raise AimerError(f"{flag} must be a number, got {value!r}.", fix)
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise AimerError(f"{flag} must be a number, got {value!r}.", fix) from None
    if not math.isfinite(result):
        raise AimerError(f"{flag} must be a finite number, got {value!r}.", fix)
    return result


def positive_int(value: Any, flag: str, fix: str) -> int:
    """A command-line or config value as a positive integer ("8" and 8.0 pass).

    Raises:
        AimerError: as `number`, or it is not a whole number of at least 1.
    """
    result = number(value, flag, fix)
    if result != int(result) or result < 1:
        raise AimerError(f"{flag} must be a positive integer, got {value!r}.", fix)
    return int(result)
