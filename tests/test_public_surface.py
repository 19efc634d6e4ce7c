"""The package's public surface stays documented: README's module table matches the tree
(every module and subpackage of vllm_aimer is named in it, a subpackage's modules in its
row, and every name in it exists), and what other modules import is in `__all__`."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vllm_aimer"


def _table() -> dict[str, str]:
    """First-column names (`plan`, `fit/`) -> the row's job text."""
    text = (REPO / "README.md").read_text()
    start = text.index("| module | job |")
    rows: dict[str, str] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        first, job = line.strip("|").split("|", 1)
        for name in re.findall(r"`([\w/]+)`", first):
            rows[name] = job
    return rows


def _modules(directory: Path) -> set[str]:
    return {p.stem for p in directory.glob("*.py") if p.stem != "__init__"}


def _subpackages(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if (p / "__init__.py").is_file()}


def test_every_module_is_in_the_table_and_every_entry_exists():
    rows = _table()
    assert len(rows) > 20, "module table not found in README.md"
    top = _modules(PACKAGE) | {f"{name}/" for name in _subpackages(PACKAGE)}
    assert set(rows) == top, (f"missing from README: {sorted(top - set(rows))}; "
                              f"not in the tree: {sorted(set(rows) - top)}")


def test_each_subpackage_row_names_its_modules():
    rows = _table()
    encodings = _modules(PACKAGE / "encodings")
    for package in _subpackages(PACKAGE):
        directory = PACKAGE / package
        named = set(re.findall(r"`([\w/]+)`", rows[f"{package}/"]))
        inner = _modules(directory) | {f"{name}/" for name in _subpackages(directory)}
        for sub in _subpackages(directory):  # one level deeper: testing/encoders/
            # One encoder per encoding, named like the `encodings/` row's modules: the
            # row need only name what is extra there.
            inner |= _modules(directory / sub) - encodings
        assert inner <= named, f"README's `{package}/` row does not name {sorted(inner - named)}"


def _imports_from_package() -> dict[str, set[str]]:
    """module -> public names that the package, benchmarks and scripts import from it
    (`from vllm_aimer.X import a, b`), parsed with ast."""
    used: dict[str, set[str]] = {}
    files = [*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"),
             *(REPO / "scripts").rglob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("vllm_aimer")):
                used.setdefault(node.module, set()).update(
                    a.name for a in node.names if not a.name.startswith("_"))
    return used


def test_every_imported_name_is_in_the_modules_all():
    """What the package, benchmarks and scripts import from a module is its public
    surface: each name is listed in that module's `__all__` (or is a submodule)."""
    missing = []
    for module, names in sorted(_imports_from_package().items()):
        mod = importlib.import_module(module)
        public = set(getattr(mod, "__all__", ()))
        for name in sorted(names):
            is_package = hasattr(mod, "__path__")
            if name not in public and not (
                    is_package and importlib.util.find_spec(f"{module}.{name}") is not None):
                missing.append(f"{module}.{name}")
    assert not missing, f"imported by others but not in __all__: {missing}"
