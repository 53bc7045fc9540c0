# crossvit-serve images, two targets from one base image (deploy/README.md has the commands):
#   cpu  (default: last)  torch from TORCH_INDEX_URL (PyTorch's CPU-only index), the rest requirements/serve-cpu.txt
#   cuda                  requirements/serve.txt as locked: PyPI's torch brings its CUDA runtime, cuBLAS and
#                         cuDNN; the host's driver comes in through the NVIDIA container toolkit
#
#   docker build --target cpu  -t crossvit-serve:cpu  .
#   docker build --target cuda -t crossvit-serve:cuda .
#   docker build --target cpu --build-arg BAKE_WEIGHTS=crossvit_18_dagger_240 -t crossvit-serve:cpu-18d .
#
# Build arguments:
#   BASE_IMAGE       any Debian-like image with python3 >= 3.10 and its venv module; `make image-test`
#                    debootstraps a bookworm one where no registry can be reached
#   TORCH_INDEX_URL  where the cpu target takes torch from; empty: PyPI's torch as serve.txt locks it, CUDA
#                    libraries included (about 5 GB more), for builders that cannot reach PyTorch's index
#   BAKE_WEIGHTS, WEIGHTS_SOURCE   fetch and verify a checkpoint into the image's /weights at build time
# Every install is a lock file through requirements/install.py (the pinned pip first, then every pin
# hash-checked with --no-deps: nothing resolved, whatever the index holds on the day; then pip check), then
# the project itself with --no-deps; `make lock` writes the locks.
#
# Optional build secrets, for builders whose pip needs its own settings (a mirror, find-links, a proxy's CA);
# mounted only while installing, stored in no layer (deploy/image_test.py passes this machine's):
#   --secret id=pip.conf,src=FILE   a pip configuration file
#   --secret id=pip-ca,src=FILE     a CA bundle for pip
# Secret mounts need BuildKit (docker >= 23 by default; DOCKER_BUILDKIT=1 with 20.10). There is no `# syntax=`
# line: the builder's own Dockerfile frontend suffices, so nothing but BASE_IMAGE is pulled.
#
# The server runs as uid/gid 10001 (the Kubernetes manifests' runAsUser); /weights belongs to it, so a fresh
# named volume does too.

ARG BASE_IMAGE=python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------- build: a venv per target, from the lock
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY requirements/*.txt requirements/install.py ./requirements/

# The project's own files, apart: editing them rebuilds no dependency layer.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY model /src/model
COPY service /src/service
COPY weights /src/weights
COPY client /src/client

FROM build AS venv-cuda
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    /opt/venv/bin/python requirements/install.py requirements/serve.txt
COPY --from=source /src /src
RUN /opt/venv/bin/python -m pip install -q --no-deps --no-build-isolation . \
 && /opt/venv/bin/python -m pip check

FROM build AS venv-cpu
ARG TORCH_INDEX_URL
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
      /opt/venv/bin/python requirements/install.py \
      && /opt/venv/bin/python -m pip install -q --no-deps --index-url "$TORCH_INDEX_URL" -r requirements/torch.txt \
      && /opt/venv/bin/python requirements/install.py requirements/serve-cpu.txt; \
    else \
      /opt/venv/bin/python requirements/install.py requirements/serve.txt; \
    fi
COPY --from=source /src /src
RUN /opt/venv/bin/python -m pip install -q --no-deps --no-build-isolation . \
 && /opt/venv/bin/python -m pip check

# ---------------------------------------------------------------- weights: baked in, or an empty /weights
FROM venv-cuda AS weights-cuda
ARG BAKE_WEIGHTS=""
ARG WEIGHTS_SOURCE=hub
RUN mkdir -p /weights \
 && if [ -n "$BAKE_WEIGHTS" ]; then \
      /opt/venv/bin/crossvit-weights fetch "$BAKE_WEIGHTS" --dest /weights --source "$WEIGHTS_SOURCE" --no-progress \
      && /opt/venv/bin/crossvit-weights verify /weights \
      && rm -rf /weights/.cache; \
    fi

FROM venv-cpu AS weights-cpu
ARG BAKE_WEIGHTS=""
ARG WEIGHTS_SOURCE=hub
# With baked weights, the OpenVINO conversion is baked too (/weights/.cache/models), so a read-only
# container starts without converting.
RUN mkdir -p /weights \
 && if [ -n "$BAKE_WEIGHTS" ]; then \
      /opt/venv/bin/crossvit-weights fetch "$BAKE_WEIGHTS" --dest /weights --source "$WEIGHTS_SOURCE" --no-progress \
      && /opt/venv/bin/crossvit-weights verify /weights \
      && rm -rf /weights/.cache \
      && CROSSVIT_MODEL="$BAKE_WEIGHTS" CROSSVIT_WEIGHTS_DIR=/weights CROSSVIT_FETCH_WEIGHTS=false \
         CROSSVIT_BACKEND=openvino /opt/venv/bin/crossvit-serve --prepare-only; \
    fi

# ---------------------------------------------------------------- runtime: what both targets share
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 crossvit \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin crossvit
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/huggingface \
    CROSSVIT_HOST=0.0.0.0 \
    CROSSVIT_ALLOW_RANDOM_WEIGHTS=false \
    CROSSVIT_WEIGHTS_DIR=/weights
USER 10001:10001
# 8000: the API; 8081: the probe listener (/healthz, /readyz, /metrics only; CROSSVIT_PROBE_PORT)
EXPOSE 8000 8081
# Healthy means ready (/readyz: a worker loaded and warmed up, not draining): Docker has no separate
# readiness, and compose's `service_healthy` and a look at `docker ps` both mean "can take requests".
# Asked on the probe listener, which no client load on the API port can starve.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CROSSVIT_PROBE_PORT', '8081'), timeout=4)"]
CMD ["crossvit-serve"]

# ---------------------------------------------------------------- cuda
FROM runtime AS cuda
COPY --from=venv-cuda /opt/venv /opt/venv
COPY --from=weights-cuda --chown=10001:10001 /weights /weights
# what nvidia/cuda base images set: the container toolkit mounts the driver for these
ENV CROSSVIT_DEVICE=cuda \
    CROSSVIT_BACKEND=torch \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------- cpu (last: the default target)
FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
COPY --from=weights-cpu --chown=10001:10001 /weights /weights
ENV CROSSVIT_DEVICE=cpu \
    CROSSVIT_BACKEND=openvino
