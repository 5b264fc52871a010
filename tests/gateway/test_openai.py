"""The OpenAI-compatible Images API, driven by the official `openai` client against the
running gateway (SQLite and PostgreSQL). A worker thread speaks the real internal protocol
and renders a plain image of each job's size and format (the real engine behind these
endpoints: tests/worker/test_openai_worker.py)."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from remotegpu_base.protocol import LeaseLost, RuntimeState, WorkerStatus

from tests.gateway.conftest import KLEIN, KONTEXT, SCHNELL, Clock, RunningGateway, auth, png_bytes


class ProtocolWorker:
    """Leases the jobs of some models and completes them with an image of the requested
    size and format, coloured by the seed (so n images differ). `fail` fails jobs instead."""

    def __init__(self, g: RunningGateway, models: list[str], fail: str | None = None):
        self.g, self.models, self.fail = g, models, fail
        self.stop = threading.Event()
        self.requests: list[Any] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        w = self.g.worker()
        try:
            for m in self.models:
                w.report_status(WorkerStatus(worker_id="pw", model=m, state=RuntimeState.READY))
            while not self.stop.is_set():
                for m in self.models:
                    lease = w.lease(m, "pw", wait_seconds=0.2)
                    if lease is None:
                        continue
                    self.requests.append(lease.request)
                    if self.fail:
                        w.fail(lease.job_id, lease.lease_token, self.fail)
                        continue
                    r = lease.request
                    buf = io.BytesIO()
                    color = (r.seed * 50 % 256, 40, 90)
                    Image.new("RGB", (r.width, r.height), color).save(buf, format=r.output_format.upper())
                    try:
                        w.complete(
                            lease.job_id, lease.lease_token, buf.getvalue(), f"image/{r.output_format}"
                        )
                    except LeaseLost:
                        pass
        finally:
            w.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


@pytest.fixture
def worker(gateway: RunningGateway) -> Iterator[ProtocolWorker]:
    w = ProtocolWorker(gateway, [SCHNELL, KONTEXT, KLEIN])
    yield w
    w.close()


def client(g: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0, timeout=120)


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_generate_url_and_b64_json(gateway: RunningGateway, key: str, worker: ProtocolWorker) -> None:
    c = client(gateway, key)
    r = c.images.generate(model=SCHNELL, prompt="a lighthouse", size="1024x1024")
    assert len(r.data) == 1 and r.created > 0
    assert r.data[0].url and r.data[0].b64_json is None
    got = httpx.get(r.data[0].url, timeout=30)  # the signed URL works without a key
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert decode(got.content).size == (1024, 1024)

    r = c.images.generate(model=SCHNELL, prompt="a lighthouse", response_format="b64_json")
    assert r.data[0].b64_json and r.data[0].url is None
    assert decode(base64.b64decode(r.data[0].b64_json)).size == (512, 512)  # the model's default size
    assert r.size == "512x512" and r.output_format == "png"


def test_n_images_are_n_jobs(gateway: RunningGateway, key: str, worker: ProtocolWorker) -> None:
    c = client(gateway, key)
    r = c.images.generate(
        model=SCHNELL,
        prompt="three foxes",
        n=3,
        size="1024x768",
        response_format="b64_json",
        output_format="jpeg",
        output_compression=20,
        quality="hd",
        style="vivid",
        user="user-42",
        extra_body={"seed": 7, "steps": 2},
    )
    images = [decode(base64.b64decode(d.b64_json or "")) for d in r.data]
    assert [(im.format, im.size) for im in images] == [("JPEG", (1024, 768))] * 3
    assert r.output_format == "jpeg"
    seen = sorted(worker.requests, key=lambda q: q.seed)
    assert [q.seed for q in seen] == [7, 8, 9]  # image i: seed + i
    assert {(q.steps, q.output_format, q.output_quality) for q in seen} == {(2, "jpeg", 80)}
    # data[i] is image i (seed 7 + i): its colour says which job rendered it.
    reds = [im.convert("RGB").getpixel((0, 0))[0] for im in images]  # type: ignore[index]
    assert all(abs(red - seed * 50 % 256) <= 8 for red, seed in zip(reds, (7, 8, 9), strict=True)), reds


def test_edit_with_reference_images(gateway: RunningGateway, key: str, worker: ProtocolWorker) -> None:
    c = client(gateway, key)
    source = png_bytes(1024, 1024)
    r = c.images.edit(
        model=KONTEXT,
        image=("source.png", source, "image/png"),
        prompt="make it blue",
        response_format="b64_json",
    )
    # size omitted: the image's own size, since Kontext allows it
    assert decode(base64.b64decode(r.data[0].b64_json or "")).size == (1024, 1024)
    lease = worker.requests[-1]
    assert lease.input_images() == [source]
    # FLUX.2 takes several references: image[] from a list.
    refs = [
        ("a.png", png_bytes(512, 512), "image/png"),
        ("b.png", png_bytes(512, 512, color=(0, 0, 255)), "image/png"),
    ]
    r = c.images.edit(model=KLEIN, image=refs, prompt="combine them", size="512x512", n=2)
    assert len(r.data) == 2 and all(d.url for d in r.data)
    assert [len(q.input_images_base64) for q in worker.requests[-2:]] == [2, 2]


def test_bad_size_model_and_fields(gateway: RunningGateway, key: str) -> None:
    c = client(gateway, key)
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(model=SCHNELL, prompt="x", size="1792x1024")
    assert e.value.status_code == 400
    body = e.value.body
    assert isinstance(body, dict) and body["param"] == "size" and "512x512" in body["message"]
    assert body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as nf:
        c.images.generate(model="dall-e-3", prompt="x")
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(model=SCHNELL, prompt="")
    assert e.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(model=SCHNELL, prompt="x", n=11)
    assert e.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(model=SCHNELL, prompt="x", extra_body={"sampler": "euler"})
    assert "Unrecognized request argument" in e.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:  # Kontext needs exactly one image
        c.images.generate(model=KONTEXT, prompt="x")
    assert e.value.body["param"] == "image"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:  # a reference image outside the presets
        c.images.edit(
            model=KONTEXT, image=("s.png", png_bytes(500, 500), "image/png"), prompt="x", size="512x512"
        )
    assert e.value.body["param"] == "image"  # type: ignore[index]
    assert gateway.gw.store.queue_counts() == {}, "nothing refused was queued"


def test_bad_key(gateway: RunningGateway) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        client(gateway, "rgpu_0123456789abcdef.wrong").images.generate(model=SCHNELL, prompt="x")
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, gateway.key("adm", ["admin"])).images.generate(model=SCHNELL, prompt="x")


def test_failed_job_is_an_error(gateway: RunningGateway, key: str) -> None:
    w = ProtocolWorker(gateway, [SCHNELL], fail="bad input: prompt is 900 text-encoder tokens")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client(gateway, key).images.generate(model=SCHNELL, prompt="x")
    finally:
        w.close()
    assert "text-encoder tokens" in e.value.body["message"]  # type: ignore[index]


def test_rate_limit_through_the_openai_client(
    gateway: RunningGateway, worker: ProtocolWorker, clock: Clock
) -> None:
    key, token = gateway.gw.store.create_key("one-a-minute", ["inference"])
    gateway.gw.limits.set(key.id, {"requests_per_minute": 1})
    clock.advance(60 - clock() % 60 + 1)
    c = client(gateway, token)
    raw = c.images.with_raw_response.generate(model=SCHNELL, prompt="x", n=2)
    assert raw.headers["RateLimit"].startswith('"requests";r=0;t=')
    assert len(raw.parse().data) == 2  # n images, one request
    with pytest.raises(openai.RateLimitError) as e:
        c.images.generate(model=SCHNELL, prompt="x")
    assert e.value.response.headers["Retry-After"]
    assert e.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]


def test_models_list(gateway: RunningGateway, key: str) -> None:
    ids = [m.id for m in client(gateway, key).models.list()]
    assert SCHNELL in ids and KONTEXT in ids


def test_a_client_that_goes_away_cancels_its_jobs(gateway: RunningGateway, key: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        gateway.http.post(
            "/v1/images/generations",
            json={"model": SCHNELL, "prompt": "x", "n": 2},
            headers=auth(key),
            timeout=1.5,
        )

    def cancelled() -> bool:
        with gateway.gw.store.reading() as conn:
            import sqlalchemy as sa
            from remotegpu_gateway.store import jobs

            statuses = conn.execute(sa.select(jobs.c.status)).scalars().all()
        return sorted(statuses) == ["cancelled", "cancelled"]

    from tests.waiting import wait_for

    wait_for(cancelled, 30, "the abandoned jobs to be cancelled", every=0.2)
