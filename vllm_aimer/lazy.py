"""torch, imported on first use.

Importing torch takes seconds; `vllm-aimer score` on plain float weights, `inspect`,
`plan` and `fit` never touch it. Modules that need torch for some paths only (the
quantized encodings) bind `torch` from here: the first attribute read imports it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["LazyModule", "imported", "torch"]


class LazyModule(types.ModuleType):
    """Stands for a module until an attribute is read, then forwards to it."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)


def imported(name: str) -> bool:
    """Whether module `name` has been imported already (nothing is imported here)."""
    return name in sys.modules


torch: Any = LazyModule("torch")
