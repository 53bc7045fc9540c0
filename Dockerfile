# syntax=docker/dockerfile:1
# crossvit-serve images, two targets (deploy/README.md has the commands):
#   cpu  (default)  python:3.11-slim, CPU-only torch from download.pytorch.org
#   cuda            nvidia/cuda base with Python 3.11, CUDA torch from PyPI
#
#   docker build --target cpu  -t crossvit-serve:cpu  .
#   docker build --target cuda -t crossvit-serve:cuda .
#   docker build --target cpu --build-arg BAKE_WEIGHTS=crossvit_18_dagger_240 -t crossvit-serve:cpu-18d .
#
# The install step is `make setup`'s pip command (Makefile) without `-e` and without the `[dev]`
# extra: `python -m pip install --disable-pip-version-check -q .`, into a venv that the final
# stage copies; compilers, pip caches and sources stay in the build stages.
# Weights: baked in with BAKE_WEIGHTS (fetched and verified at build time), or mounted / fetched
# at start-up into /weights (CROSSVIT_WEIGHTS_DIR). The server runs as uid/gid 10001 (the
# Kubernetes manifests' runAsUser); /weights belongs to it, so a fresh named volume does too.

ARG PYTHON_IMAGE=python:3.11-slim
# PyPI's CUDA torch wheels bring their own CUDA runtime, cuBLAS and cuDNN; the image only needs
# the driver, which the NVIDIA container toolkit mounts from the host. A -runtime- tag works too.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-base-ubuntu22.04
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------- cuda
FROM ${CUDA_IMAGE} AS cuda-python
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM cuda-python AS cuda-build
ENV PIP_NO_CACHE_DIR=1
RUN python3.11 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY weights ./weights
RUN /opt/venv/bin/python -m pip install --disable-pip-version-check -q torch \
 && /opt/venv/bin/python -m pip install --disable-pip-version-check -q .

FROM cuda-build AS cuda-weights
ARG BAKE_WEIGHTS=""
ARG WEIGHTS_SOURCE=hub
RUN mkdir -p /weights \
 && if [ -n "$BAKE_WEIGHTS" ]; then \
      /opt/venv/bin/crossvit-weights fetch "$BAKE_WEIGHTS" --dest /weights --source "$WEIGHTS_SOURCE" --no-progress \
      && /opt/venv/bin/crossvit-weights verify /weights \
      && rm -rf /weights/.cache; \
    fi

FROM cuda-python AS cuda
RUN groupadd --system --gid 10001 crossvit \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin crossvit
COPY --from=cuda-build /opt/venv /opt/venv
COPY --from=cuda-weights --chown=10001:10001 /weights /weights
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/huggingface \
    CROSSVIT_HOST=0.0.0.0 \
    CROSSVIT_ALLOW_RANDOM_WEIGHTS=false \
    CROSSVIT_WEIGHTS_DIR=/weights \
    CROSSVIT_DEVICE=cuda
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CROSSVIT_PORT', '8000'), timeout=4)"]
CMD ["crossvit-serve"]

# ---------------------------------------------------------------- cpu (last: the default target)
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_CPU_INDEX
ENV PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY weights ./weights
# CPU torch first, from PyTorch's CPU index (no CUDA libraries); the project install keeps it.
RUN /opt/venv/bin/python -m pip install --disable-pip-version-check -q --index-url "$TORCH_CPU_INDEX" torch \
 && /opt/venv/bin/python -m pip install --disable-pip-version-check -q .

FROM cpu-build AS cpu-weights
ARG BAKE_WEIGHTS=""
ARG WEIGHTS_SOURCE=hub
RUN mkdir -p /weights \
 && if [ -n "$BAKE_WEIGHTS" ]; then \
      /opt/venv/bin/crossvit-weights fetch "$BAKE_WEIGHTS" --dest /weights --source "$WEIGHTS_SOURCE" --no-progress \
      && /opt/venv/bin/crossvit-weights verify /weights \
      && rm -rf /weights/.cache; \
    fi

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 crossvit \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin crossvit
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-weights --chown=10001:10001 /weights /weights
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/huggingface \
    CROSSVIT_HOST=0.0.0.0 \
    CROSSVIT_ALLOW_RANDOM_WEIGHTS=false \
    CROSSVIT_WEIGHTS_DIR=/weights \
    CROSSVIT_DEVICE=cpu
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CROSSVIT_PORT', '8000'), timeout=4)"]
CMD ["crossvit-serve"]
