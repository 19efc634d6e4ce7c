"""deploy/README.md's commands stay true: every `helm install/upgrade` in it
renders with the chart, its values file example renders, and its `docker run`
arguments parse with vLLM's `vllm serve` parser."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from tests.deploy.helm import arg_value, render, server_container
from tests.deploy.paths import DEPLOY_DIR

helm_python = pytest.importorskip("helm_python")

README = DEPLOY_DIR / "README.md"


def code_blocks(lang: str = "") -> list[str]:
    text = README.read_text()
    return [m.group(2) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)
            if not lang or m.group(1) == lang]


def commands(program: str) -> list[list[str]]:
    """Shell commands in the README's plain code blocks starting with `program`,
    continuation lines joined and $IMAGE expanded."""
    image = ""
    found = []
    for block in code_blocks():
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("IMAGE="):
                image = shlex.split(line)[0].split("=", 1)[1]
            if line.startswith(program + " "):
                found.append(shlex.split(line.replace("$IMAGE", image)))
    return found


def helm_values(argv: list[str]) -> dict:
    values: dict = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "--set":
            merge(values, helm_python.parse_set_string(value))
        elif flag == "--set-json":
            merge(values, helm_python.parse_set_json(value))
    return values


def merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def test_set_passes_fractions_as_strings():
    """Why the README uses --set-json for fractions: Helm's --set keeps 0.5 a string,
    which the schema rejects (as it must: a string ratio would reach vLLM quoted)."""
    assert helm_python.parse_set_string("pruning.ratio=0.5") == {"pruning": {"ratio": "0.5"}}
    with pytest.raises(helm_python.HelmValuesError, match="pruning/ratio"):
        render(helm_python.parse_set_string("pruning.ratio=0.5"))
    assert helm_python.parse_set_json("pruning.ratio=0.5") == {"pruning": {"ratio": 0.5}}


def test_helm_commands_render():
    installs = [c for c in commands("helm") if c[1] in ("install", "upgrade")]
    assert len(installs) >= 4
    for argv in installs:
        assert "helm/vllm-aimer" in argv, argv
        if "-f" in argv:
            continue  # the values file example, below
        objects = render(helm_values(argv))
        args = server_container(objects)["args"]
        assert arg_value(args, "--load-format") == "aimer", argv
        assert json.loads(arg_value(args, "--model-loader-extra-config")), argv


def test_values_file_example_renders():
    [block] = [b for b in code_blocks("yaml") if b.startswith("# qwen3-values.yaml")]
    objects = render(yaml.safe_load(block))
    args = server_container(objects)["args"]
    assert json.loads(arg_value(args, "--model-loader-extra-config")) == {
        "plan": "/etc/vllm-aimer/plan/pruned_experts.json",
        "enable_multithread_load": True, "num_threads": 8}
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "ServiceMonitor",
                                            "PodDisruptionBudget"}


def test_docker_run_arguments_parse(vllm_serve_parse):
    runs = commands("docker")
    runs = [c for c in runs if c[1] == "run"]
    assert len(runs) >= 2
    for argv in runs:
        image = next(i for i, a in enumerate(argv) if a.startswith("vllm-aimer:"))
        args = vllm_serve_parse(["serve", *argv[image + 1:]])
        assert args.load_format == "aimer"
        assert isinstance(args.model_loader_extra_config, dict)
        assert args.model_tag.startswith("/models/")
