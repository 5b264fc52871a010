"""The OpenAI-compatible endpoints end to end: the official `openai` client, the real
gateway and the real worker loop rendering with the tiny random-weight pipelines."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
from PIL import Image

from tests.worker.conftest import RunningGateway, png_b64
from tests.worker.test_loop import KONTEXT, TINY, LoopThread


def test_generate_and_edit_with_the_real_engine(engines: Any, gateway: RunningGateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.api_key, max_retries=0, timeout=300)
    loops = [LoopThread(engines("flux1"), gateway), LoopThread(engines("flux1-kontext"), gateway)]
    try:
        r = client.images.generate(
            model=TINY,
            prompt="a lighthouse",
            n=2,
            size="512x512",
            response_format="b64_json",
            output_format="webp",
            extra_body={"steps": 2, "seed": 3},
        )
        images = [base64.b64decode(d.b64_json or "") for d in r.data]
        for data in images:
            with Image.open(io.BytesIO(data)) as im:
                assert (im.format, im.size) == ("WEBP", (512, 512))
        assert images[0] != images[1], "seeds 3 and 4 render different images"

        source = base64.b64decode(png_b64(1024, 768))
        r = client.images.edit(
            model=KONTEXT,
            image=("in.png", source, "image/png"),
            prompt="make it blue",
            extra_body={"steps": 2},
        )
        assert r.data[0].url
        got = httpx.get(r.data[0].url, timeout=60)
        assert got.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(got.content)) as im:
            assert im.size == (1024, 768)  # the reference image's size (size omitted)
    finally:
        for lt in loops:
            lt.stop()
