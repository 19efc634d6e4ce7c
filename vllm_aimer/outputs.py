"""Writing plan files so that a reader never sees a half-written one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from vllm_aimer.errors import AimerError
from vllm_aimer.plan import PLAN_FILE, PRUNED_EXPERTS_FILE, SCORES_FILE, Plan, scores_csv
from vllm_aimer.plan_formats import VLLM_PROFILE_FILE, write_plan_as


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; plans are meant to be shared (e.g. with a server
        # running as another user), so give them the usual umask-derived mode.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create `path` if needed and prove we can write there, before any heavy work."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".aimer-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise AimerError(f"{what} directory {str(path)!r} is not writable ({e.strerror or e}).",
                         f"pass a {what} directory that this process can create and write.") from None
    return directory


def write_plan_outputs(plan: Plan, directory: Path, model: str | None = None) -> list[Path]:
    """pruned_experts.json, plan.json, the vLLM #37824/#42613 profile (vllm_profile.json,
    naming `model`) and (when the plan has scores) scores.csv."""
    outputs = [(directory / PRUNED_EXPERTS_FILE,
                _json_lines(plan.pruned_experts())),
               (directory / PLAN_FILE, plan.to_json()),
               (directory / VLLM_PROFILE_FILE, write_plan_as(plan, "vllm-profile", model=model))]
    if all(plan.layer(layer).scores is not None for layer in plan.layer_ids):
        outputs.append((directory / SCORES_FILE, scores_csv(plan)))
    for path, text in outputs:
        atomic_write_text(path, text)
    return [p for p, _ in outputs]


def _json_lines(pruned: dict[str, list[int]]) -> str:
    return json.dumps(pruned, indent=1) + "\n"
