# vLLM's OpenAI-compatible server with the vllm-aimer plugin installed.
#
#   docker build -t vllm-aimer:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v /models:/models vllm-aimer:0.1.0 \
#       /models/Qwen3-30B-A3B --load-format aimer \
#       --model-loader-extra-config '{"prune_ratio": 0.5}'
#
# Everything after the image name is appended to the ENTRYPOINT (`vllm serve`),
# exactly as with the upstream vllm/vllm-openai image. See deploy/README.md.

# Keep in step with helm/vllm-aimer/Chart.yaml (appVersion) and pyproject.toml.
ARG VLLM_IMAGE_TAG=v0.32.0

############################ builder: the wheel ############################
# The same base as the final stage: one image to pull, and the Python that
# builds the wheel is the one that will run it.
FROM vllm/vllm-openai:${VLLM_IMAGE_TAG} AS builder

WORKDIR /src
# Only what the wheel is built from, so edits to tests or docs keep the cache.
COPY pyproject.toml README.md ./
COPY vllm_aimer ./vllm_aimer
# --no-deps: vllm, torch, transformers, safetensors, pyyaml, prometheus-client,
# pydantic and tqdm all ship in the base image already.
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

############################ runtime ############################
FROM vllm/vllm-openai:${VLLM_IMAGE_TAG}

ARG VLLM_IMAGE_TAG
LABEL org.opencontainers.image.title="vllm-aimer" \
      org.opencontainers.image.description="vLLM with AIMER load-time expert pruning for MoE models (--load-format aimer)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/vllm/vllm-openai:${VLLM_IMAGE_TAG}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The plugin is pure Python; its runtime dependencies (and huggingface_hub, which
# the Helm chart's download init container uses) are all in the base image. The
# import check fails the build if that ever stops being true.
COPY --from=builder /wheels /tmp/wheels
RUN python3 -m pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python3 -c "import vllm_aimer, yaml, prometheus_client, pydantic, safetensors, tqdm, huggingface_hub" \
    && python3 -c "from importlib.metadata import entry_points as e; \
assert any(p.name == 'aimer' for p in e(group='vllm.general_plugins')), 'plugin entry point missing'"

# A non-root user with uid/gid 1000 (Kubernetes runAsUser 1000, fsGroup 1000).
# Some CUDA base images already have a uid-1000 user (e.g. `ubuntu`): replace it.
# Every cache lives under /cache, the only place the server writes besides /tmp,
# so a read-only root filesystem with emptyDir volumes on /cache and /tmp works.
RUN existing_user="$(getent passwd 1000 | cut -d: -f1)" \
    && if [ -n "${existing_user}" ]; then userdel "${existing_user}"; fi \
    && existing_group="$(getent group 1000 | cut -d: -f1)" \
    && if [ -n "${existing_group}" ]; then groupdel "${existing_group}"; fi \
    && groupadd --gid 1000 vllm \
    && useradd --uid 1000 --gid 1000 --home-dir /cache --no-create-home \
               --shell /usr/sbin/nologin vllm \
    && mkdir -p /cache/huggingface /cache/xdg /cache/vllm /cache/triton \
                /cache/torchinductor /cache/nv /cache/flashinfer /cache/numba \
                /cache/outlines /cache/config \
    && chown -R 1000:1000 /cache \
    && chmod -R g+rwX /cache

ENV HOME=/cache \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache/xdg \
    XDG_CONFIG_HOME=/cache/config \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_CONFIG_ROOT=/cache/config/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    CUDA_CACHE_PATH=/cache/nv \
    FLASHINFER_WORKSPACE_BASE=/cache/flashinfer \
    NUMBA_CACHE_DIR=/cache/numba \
    OUTLINES_CACHE_DIR=/cache/outlines \
    TMPDIR=/tmp \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /cache
USER 1000:1000

EXPOSE 8000

# python3 rather than curl: the interpreter is certain to be in the image.
# The start period covers loading (and scoring) a large MoE checkpoint.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["vllm", "serve"]
CMD ["--help"]
