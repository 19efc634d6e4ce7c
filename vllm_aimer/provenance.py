"""Where an export records where it came from (read by `inspect`, written by `export`);
its own module so that reading it needs neither torch nor the exporter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["PROVENANCE_DIR", "PROVENANCE_FILE", "read_provenance"]

PROVENANCE_DIR = "vllm-aimer"
"""Subdirectory of an export holding provenance.json and the plan files."""
PROVENANCE_FILE = "provenance.json"


def read_provenance(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance note of an export.

    Args:
        directory: a checkpoint directory.

    Returns:
        `<directory>/vllm-aimer/provenance.json` as parsed JSON, or None for any other
        checkpoint (no such file, or one that cannot be read or parsed).
    """
    path = Path(directory) / PROVENANCE_DIR / PROVENANCE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
