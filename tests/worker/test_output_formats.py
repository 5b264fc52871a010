"""Output formats round-trip: the real worker loop encodes PNG, JPEG or WebP, the gateway
stores it and the signed result_url serves it with the matching content type."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.worker.conftest import RunningGateway
from tests.worker.test_loop import TINY, LoopThread


@pytest.mark.parametrize(
    ("fields", "content_type", "pil_format"),
    [
        ({}, "image/png", "PNG"),
        ({"output_format": "png"}, "image/png", "PNG"),
        ({"output_format": "jpeg"}, "image/jpeg", "JPEG"),
        ({"output_format": "jpeg", "output_quality": 30}, "image/jpeg", "JPEG"),
        ({"output_format": "webp"}, "image/webp", "WEBP"),
        ({"output_format": "webp", "output_quality": 50}, "image/webp", "WEBP"),
    ],
)
def test_each_format_round_trips(
    engines: Any, gateway: RunningGateway, fields: dict[str, Any], content_type: str, pil_format: str
) -> None:
    lt = LoopThread(engines("flux1"), gateway)
    try:
        job_id = gateway.submit(TINY, "a lighthouse", size={"width": 1024, "height": 768}, steps=2, **fields)
        job = gateway.wait(job_id, {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", job
        r = httpx.get(job["result_url"], timeout=30)  # the signed URL, no key
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == content_type
        head = httpx.head(job["result_url"], timeout=30)
        assert head.headers["content-type"] == content_type
        assert int(head.headers["content-length"]) == len(r.content)
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.format == pil_format
            assert im.size == (1024, 768)
            im.load()
    finally:
        assert lt.stop() == "drained"


def test_a_lower_quality_gives_a_smaller_file(engines: Any, gateway: RunningGateway) -> None:
    lt = LoopThread(engines("flux1"), gateway)
    sizes = {}
    try:
        for quality in (20, 95):
            job_id = gateway.submit(
                TINY, "a lighthouse", steps=2, seed=7, output_format="jpeg", output_quality=quality
            )
            assert gateway.wait(job_id, {"succeeded", "failed"})["status"] == "succeeded"
            sizes[quality] = len(gateway.result(job_id))
    finally:
        lt.stop()
    assert sizes[20] < sizes[95], sizes


def test_the_gateway_refuses_a_result_in_another_format(gateway: RunningGateway) -> None:
    """A worker that ignores output_format (an older one) cannot pass a PNG off as the JPEG asked for."""
    job_id = gateway.submit(TINY, "x", output_format="jpeg")
    w = gateway.client()
    try:
        lease = w.lease(TINY, "w1", wait_seconds=5)
        assert lease is not None and lease.job_id == job_id
        assert lease.request.output_format == "jpeg"
        buf = io.BytesIO()
        Image.new("RGB", (512, 512)).save(buf, format="PNG")
        with pytest.raises(httpx.HTTPStatusError) as e:
            w.complete(job_id, lease.lease_token, buf.getvalue())
        assert e.value.response.status_code == 400
        assert "jpeg" in e.value.response.json()["error"]["message"]
        buf = io.BytesIO()
        Image.new("RGB", (512, 512)).save(buf, format="JPEG")
        w.complete(job_id, lease.lease_token, buf.getvalue(), "image/jpeg")
    finally:
        w.close()
    assert gateway.job(job_id)["status"] == "succeeded"
    assert gateway.http.get(f"/v1/inference/jobs/{job_id}/result").headers["content-type"] == "image/jpeg"
