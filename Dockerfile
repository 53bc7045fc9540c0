# crossvit-serve images, three targets from one base image (deploy/README.md has the commands):
#   cpu  (default: last)  the lean server: requirements/lean.txt, no torch; serves the OpenVINO model that a
#                         build stage with torch prepared (`crossvit-serve --prepare-only`) into /opt/models
#   cpu-full              the server with torch (from TORCH_INDEX_URL, PyTorch's CPU-only index; the rest
#                         requirements/serve-cpu.txt): fetches, verifies and converts weights itself, so it is
#                         the image for weights that arrive at run time (Kubernetes' init containers)
#   cuda                  requirements/serve.txt as locked: PyPI's torch brings its CUDA runtime, cuBLAS and
#                         cuDNN; the host's driver comes in through the NVIDIA container toolkit
#
#   docker build --target cpu      -t crossvit-serve:cpu      .
#   docker build --target cpu-full -t crossvit-serve:cpu-full .
#   docker build --target cuda     -t crossvit-serve:cuda     .
#   docker build --target cpu --build-arg BAKE_WEIGHTS=crossvit_18_dagger_240 -t crossvit-serve:cpu-18d .
#
# Build arguments:
#   BASE_IMAGE       any Debian-like image with python3 >= 3.10 and its venv module; `make image-test`
#                    debootstraps a bookworm one where no registry can be reached
#   TORCH_INDEX_URL  where the stages with CPU torch take it from; empty: PyPI's torch as serve.txt locks it, CUDA
#                    libraries included (about 5 GB more in cpu-full; in cpu only the build stage carries them),
#                    for builders that cannot reach PyTorch's index
#   BAKE_WEIGHTS, WEIGHTS_SOURCE   fetch and verify a checkpoint at build time: cpu-full and cuda keep it in
#                    /weights (cpu-full with its OpenVINO conversion); cpu keeps only the model prepared from it
#   RANDOM_MODELS    without BAKE_WEIGHTS, the variants the cpu image prepares with random weights: served only
#                    with CROSSVIT_ALLOW_RANDOM_WEIGHTS=true, and flagged as random (`pretrained: false`)
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

FROM build AS venv-cpu-full
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

# the lean server: no torch, no safetensors or huggingface-hub
FROM build AS venv-cpu
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    /opt/venv/bin/python requirements/install.py requirements/lean.txt
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

# Fetched once for both CPU targets.
FROM venv-cpu-full AS fetched-cpu
ARG BAKE_WEIGHTS=""
ARG WEIGHTS_SOURCE=hub
RUN mkdir -p /weights \
 && if [ -n "$BAKE_WEIGHTS" ]; then \
      /opt/venv/bin/crossvit-weights fetch "$BAKE_WEIGHTS" --dest /weights --source "$WEIGHTS_SOURCE" --no-progress \
      && /opt/venv/bin/crossvit-weights verify /weights \
      && rm -rf /weights/.cache; \
    fi

# cpu-full: with baked weights, the OpenVINO conversion is baked too (/weights/.cache/models), so a
# read-only container starts without converting.
FROM fetched-cpu AS weights-cpu-full
ARG BAKE_WEIGHTS=""
RUN if [ -n "$BAKE_WEIGHTS" ]; then \
      CROSSVIT_MODEL="$BAKE_WEIGHTS" CROSSVIT_WEIGHTS_DIR=/weights CROSSVIT_FETCH_WEIGHTS=false \
      CROSSVIT_BACKEND=openvino /opt/venv/bin/crossvit-serve --prepare-only; \
    fi

# cpu: the prepared model alone (model.xml, model.bin, heads.npz, probe.npz, golden.npz, prepared.json per entry), made
# here with torch; the lean image needs no checkpoint. Without BAKE_WEIGHTS, random-init entries.
FROM fetched-cpu AS models-cpu
ARG BAKE_WEIGHTS=""
ARG RANDOM_MODELS=crossvit_18_dagger_240
ENV CROSSVIT_WEIGHTS_DIR=/weights \
    CROSSVIT_CACHE_DIR=/opt/models \
    CROSSVIT_FETCH_WEIGHTS=false \
    CROSSVIT_DEVICE=cpu \
    CROSSVIT_BACKEND=openvino
RUN mkdir -p /opt/models \
 && if [ -n "$BAKE_WEIGHTS" ]; then \
      CROSSVIT_MODEL="$BAKE_WEIGHTS" /opt/venv/bin/crossvit-serve --prepare-only; \
    else \
      for model in $RANDOM_MODELS; do \
        CROSSVIT_MODEL="$model" CROSSVIT_ALLOW_RANDOM_WEIGHTS=true /opt/venv/bin/crossvit-serve --prepare-only \
        || exit 1; \
      done; \
    fi

# ---------------------------------------------------------------- runtime: what every target shares
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
# Asked on the probe listener, which no client load on the API port can starve. Every 2 s, so that
# "healthy" follows a 3-4 s start closely (Docker 20.10 has no separate start-up interval): with bash's
# /dev/tcp, a check costs a few ms of one core, where a Python one cost ~40 ms. Unhealthy after 30 s
# of failed checks, as before (3 x 10 s).
HEALTHCHECK --interval=2s --timeout=5s --start-period=300s --retries=15 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${CROSSVIT_PROBE_PORT:-8081} && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && read -r -t 4 _ status _ <&3 && [ \"$status\" = 200 ]"]
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

# ---------------------------------------------------------------- cpu-full
FROM runtime AS cpu-full
COPY --from=venv-cpu-full /opt/venv /opt/venv
COPY --from=weights-cpu-full --chown=10001:10001 /weights /weights
ENV CROSSVIT_DEVICE=cpu \
    CROSSVIT_BACKEND=openvino

# ---------------------------------------------------------------- cpu (last: the default target)
# No torch and no checkpoint: the prepared entries in /opt/models (the server's user owns them, as it owns
# /weights in the other targets). A volume mounted over /opt/models (Kubernetes' prepare-model init container)
# replaces them.
FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
COPY --from=models-cpu --chown=10001:10001 /opt/models /opt/models
ENV CROSSVIT_DEVICE=cpu \
    CROSSVIT_BACKEND=openvino \
    CROSSVIT_CACHE_DIR=/opt/models \
    CROSSVIT_FETCH_WEIGHTS=false
