"""output_format / output_quality on POST /v1/inference/image: what is accepted and how
it reaches the worker (the round trip through a real worker is tests/worker/test_output_formats.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.gateway.conftest import SCHNELL, RunningGateway


@pytest.mark.parametrize(
    ("fields", "status", "field"),
    [
        ({"output_format": "gif"}, 422, "output_format"),
        ({"output_format": "PNG"}, 422, "output_format"),
        ({"output_format": "jpeg", "output_quality": 0}, 422, "output_quality"),
        ({"output_format": "jpeg", "output_quality": 101}, 422, "output_quality"),
        ({"output_format": "webp", "output_quality": "90"}, 422, "output_quality"),
        ({"output_quality": 80}, 400, "output_quality"),  # png is lossless
        ({"output_format": "png", "output_quality": 80}, 400, "output_quality"),
    ],
)
def test_bad_output_options(
    gateway: RunningGateway, key: str, fields: dict[str, Any], status: int, field: str
) -> None:
    r = gateway.submit(key, {"prompt": "a", "model": SCHNELL, **fields})
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, ("png", None)),
        ({"output_format": "jpeg"}, ("jpeg", None)),
        ({"output_format": "webp", "output_quality": 55}, ("webp", 55)),
    ],
)
def test_the_lease_carries_the_output_options(
    gateway: RunningGateway, key: str, fields: dict[str, Any], expected: tuple[str, int | None]
) -> None:
    r = gateway.submit(key, {"prompt": "a", "model": SCHNELL, **fields})
    assert r.status_code == 202, r.text
    w = gateway.worker()
    try:
        lease = w.lease(SCHNELL, "w1", wait_seconds=5)
    finally:
        w.close()
    assert lease is not None
    assert (lease.request.output_format, lease.request.output_quality) == expected
