"""Render helm/vllm-aimer offline with Helm's own engine (helm-python-sdk)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import yaml

from tests.deploy.paths import CHART_DIR

RELEASE = "demo"
NAMESPACE = "llm"


@lru_cache(maxsize=1)
def chart():
    import helm_python

    return helm_python.Chart.load(CHART_DIR)


def render_raw(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template demo helm/vllm-aimer -n llm`.

    Applies values.schema.json first (HelmValuesError) and the templates'
    `fail` checks (HelmRenderError).
    """
    return chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The Kubernetes objects a release would create (NOTES.txt left out)."""
    objects = []
    for path, text in sorted(render_raw(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    return next(t for p, t in render_raw(values).items() if p.endswith("NOTES.txt"))


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "vllm")


def arg_value(args: list[str], flag: str) -> str | None:
    """The word after `flag` in args, or None when the flag is absent."""
    if flag not in args:
        return None
    return args[args.index(flag) + 1]
