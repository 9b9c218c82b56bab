# syntax=docker/dockerfile:1
# modelserver: gRPC on 50051; HTTP on 8000: the REST APIs (TF Serving's /v1, the Open Inference Protocol's /v2),
# Prometheus /metrics and the health endpoints; built-in models exported into /models at start.
# Build: docker build -t modelserver .        GPU: docker build --build-arg TENSORFLOW_EXTRA=and-cuda -t modelserver:gpu .
# podman/buildah: add --format docker, or the image loses its HEALTHCHECK (the OCI format has none). `make image`
# builds it with podman from a wheelhouse, offline (README, "The image").
# BASE_IMAGE: the official image by default; `make image` uses a stand-in made from Debian's packages.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# hadolint ignore=DL3006
FROM ${BASE_IMAGE}

# "and-cuda" adds the CUDA libraries (pinned in deploy/docker/requirements-gpu.lock) for the GPU variant.
ARG TENSORFLOW_EXTRA=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when the pins change, not on every code change.
# The runtime dependencies come from pyproject.toml, their versions (and their dependencies') from the lock; pip,
# setuptools and wheel from requirements-image.lock. Build hook: when deploy/docker/wheelhouse/ holds wheels
# (`make wheelhouse` downloads them on the host, through the host's pip configuration, mirror and CA), pip
# installs from there alone and needs no network (README, "The image"); otherwise from PyPI.
COPY pyproject.toml requirements.lock ./
COPY deploy/docker/requirements-gpu.lock deploy/docker/requirements-image.lock deploy/docker/
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=bind,source=deploy/docker/wheelhouse,target=/wheelhouse \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && if [ -n "$TENSORFLOW_EXTRA" ]; then sed -i "s/^tensorflow==/tensorflow[$TENSORFLOW_EXTRA]==/" /tmp/requirements.txt; fi \
    && if compgen -G "/wheelhouse/*.whl" >/dev/null; then source=(--no-index --find-links /wheelhouse); else source=(); fi \
    && pip install "${source[@]}" -r deploy/docker/requirements-image.lock \
    && pip install "${source[@]}" -r /tmp/requirements.txt -c requirements.lock -c deploy/docker/requirements-gpu.lock \
    && rm /tmp/requirements.txt

# A user (numeric, so Kubernetes' runAsNonRoot can check it) without a login or home; it owns the model repository (a named volume mounted at /models
# starts as a copy of this empty, app-owned folder, so the server can export into it).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir /models \
    && chown app:app /models

COPY modelserver/ modelserver/
COPY server/ server/
COPY models/ models/
COPY clients/ clients/
COPY deploy/docker/export_models.py deploy/docker/

USER 10001:10001

# Listen on every interface inside the container (the default, 127.0.0.1, is unreachable from outside it).
# HTTP: the REST APIs share the metrics port (one HTTP port serves /v1, /v2, /metrics and health).
ENV MODELSERVER_HOST=0.0.0.0 \
    MODELSERVER_GRPC_PORT=50051 \
    MODELSERVER_METRICS_PORT=8000 \
    MODELSERVER_HTTP_PORT=8000 \
    MODELSERVER_MODEL_REPOSITORY=/models
VOLUME ["/models"]
# 50051: gRPC (our API, the Open Inference Protocol, TF Serving's API); 8000: HTTP (REST APIs and /metrics).
EXPOSE 50051 8000

# The gRPC health service through the project's own CLI (already in the image; no extra binary to trust): it
# exits 0 only when the server reports SERVING. A shell expands the port so that it follows MODELSERVER_GRPC_PORT.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "exec python -m clients --target \"127.0.0.1:${MODELSERVER_GRPC_PORT}\" --timeout 3 health"]

# Exec form: the server is PID 1 and gets SIGTERM itself, so `docker stop` drains it (see stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "server"]
