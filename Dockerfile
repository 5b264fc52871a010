# syntax=docker/dockerfile:1
# The gateway and operator image: the remotegpu package without the GPU stack.
# `remotegpu gateway` and `remotegpu operator` run from it (the chart's `image`).
#   docker build -t ghcr.io/remotegpu/remotegpu:0.1.0 .
# (`make images` builds it with buildah; the tests pass a local Debian bookworm base
# as BASE_IMAGE, since no registry is reachable there.)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/remotegpu \
    PATH=/opt/remotegpu/bin:$PATH

WORKDIR /src
# Bytecode is compiled at build time (--compile-bytecode; pip does it for the project):
# with PYTHONDONTWRITEBYTECODE and none shipped, every container start would compile
# each module it imports, about 10 CPU-seconds for the worker's stack (PyTorch, diffusers,
# transformers), paid on every scale-from-zero.
# The dependencies first, in their own layer (a code change does not reinstall them),
# at the versions the lock pins (it also pins the worker extra, unused here), installed
# by uv (the version `make install` uses; it is not left in the image). Its cache is a
# build cache mount: downloads are reused across builds, never in the image.
# UV_CACHE_DIR may name another cache the build mounts: `make images` mounts the
# host's, so the wheels `make install` fetched are not fetched again.
ARG UV_VERSION=0.13.9
ARG UV_CACHE_DIR=/root/.cache/uv
COPY requirements.lock pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/uv \
    python3 -m venv /opt/remotegpu \
    && python3 -m venv /tmp/uv \
    && /tmp/uv/bin/pip install --quiet "uv==$UV_VERSION" \
    && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies']))" > requirements.in \
    && UV_LINK_MODE=copy /tmp/uv/bin/uv pip install --native-tls --python /opt/remotegpu/bin/python \
         --compile-bytecode --constraint requirements.lock -r requirements.in \
    && rm -rf /tmp/uv
COPY base ./base
COPY remotegpu ./remotegpu
COPY gateway ./gateway
COPY operator ./operator
COPY inference-worker ./inference-worker
# pyproject.toml names README.md as the long description: an empty one will do (a
# docs edit must not rebuild the image).
RUN --mount=type=cache,target=/root/.cache/pip \
    touch README.md \
    && pip install --no-deps . \
    && rm -rf /src \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /data remotegpu \
    && mkdir -p /data \
    && chown 10001:10001 /data

WORKDIR /data
USER 10001:10001
ENV REMOTEGPU_DATA_DIR=/data
EXPOSE 8000 8002
ENTRYPOINT ["remotegpu"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
