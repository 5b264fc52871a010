"""The one way the gateway (result storage) and the worker (model cache) make an S3 client."""

from __future__ import annotations

from typing import Any


def client(
    endpoint_url: str | None,
    region: str | None,
    *,
    timeout_seconds: float,
    attempts: int,
    read_timeout_seconds: float | None = None,
) -> Any:
    """A boto3 S3 client; credentials from the environment, a web identity or the instance's
    role. boto3 is imported here, when a client is first needed."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or "us-east-1",
        config=Config(
            connect_timeout=timeout_seconds,
            read_timeout=read_timeout_seconds or timeout_seconds,
            retries={"max_attempts": attempts, "mode": "standard"},
            # Path-style URLs work with every S3-compatible server (no bucket DNS names).
            s3={"addressing_style": "path"},
        ),
    )
