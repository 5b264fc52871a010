# The gateway and operator image: the remotegpu package without the GPU stack.
# `remotegpu gateway` and `remotegpu operator` run from it (the chart's `image`).
#   docker build -t ghcr.io/remotegpu/remotegpu:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The pinned lock as constraints: only the base dependencies are installed, at the
# versions the tests ran with (the lock also pins the worker extra, unused here).
COPY requirements.lock pyproject.toml README.md ./
COPY base ./base
COPY remotegpu ./remotegpu
COPY gateway ./gateway
COPY operator ./operator
COPY inference-worker ./inference-worker
RUN pip install --constraint requirements.lock . \
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
