"""`remotegpu serve` (the embedded default) and `remotegpu generate`, as real processes."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.fixtures.processes import Proc
from tests.waiting import wait_http
from tests.worker.conftest import REMOTEGPU, base_env, free_port, png_size


def models(url: str) -> dict[str, dict]:
    return {m["model"]: m for m in httpx.get(f"{url}/v1/inference/models", timeout=10).json()["image"]}


def test_serve_then_generate_writes_a_png(procs: Callable[..., Proc], tmp_path: Path) -> None:
    data = tmp_path / "data"  # a clean data directory: first start builds the tiny models
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(REMOTEGPU_IDLE_SECONDS="4")
    serve = procs(
        [REMOTEGPU, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data)],
        env,
        tmp_path / "serve.log",
    )
    wait_http(f"{url}/readyz", 240, serve)
    deadline = time.monotonic() + 30
    while "remotegpu keys create --name me --scope inference" not in serve.log():
        assert time.monotonic() < deadline, serve.log()
        time.sleep(0.2)
    out = serve.log()
    assert url in out and "building" in out
    assert (data / "tiny-models" / "flux1" / "model_index.json").is_file()

    catalog = models(url)
    assert catalog["remotegpu/tiny-random-flux1"]["runtime"]["state"] == "sleeping"
    flux = catalog["black-forest-labs/FLUX.1-dev"]["runtime"]
    assert flux["available"] is False and "weights" in flux["unavailable_reason"]

    keys = subprocess.run(
        [REMOTEGPU, "keys", "create", "--name", "me", "--scope", "inference", "--data-dir", str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert keys.returncode == 0, keys.stderr
    secret = keys.stdout.strip().splitlines()[-1]
    client_env = base_env(REMOTEGPU_URL=url, REMOTEGPU_API_KEY=secret)

    png = tmp_path / "out.png"
    gen = subprocess.run(
        [REMOTEGPU, "generate", "--model", "remotegpu/tiny-random-flux1", "a lighthouse", "-o", str(png)]
        + [
            "--size",
            "1024x768",
            "--steps",
            "3",
            "--seed",
            "11",
            "--guidance",
            "2.5",
            "--negative-prompt",
            "fog",
        ],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert gen.returncode == 0, gen.stderr + serve.log()[-3000:]
    assert png_size(png.read_bytes()) == (1024, 768)
    assert "warming" in gen.stderr and "succeeded" in gen.stderr and "wrote" in gen.stderr

    # An input-image model, with the first image as its source.
    edited = tmp_path / "edited.png"
    gen = subprocess.run(
        [
            REMOTEGPU,
            "generate",
            "--model",
            "remotegpu/tiny-random-flux1-kontext",
            "bluer",
            "--image",
            str(png),
        ]
        + ["-o", str(edited), "--size", "512x512"],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert gen.returncode == 0, gen.stderr
    assert png_size(edited.read_bytes()) == (512, 512)

    # Errors say what to do next.
    gen = subprocess.run(
        [
            REMOTEGPU,
            "generate",
            "--model",
            "black-forest-labs/FLUX.1-dev",
            "x",
            "-o",
            str(tmp_path / "no.png"),
        ],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gen.returncode == 2 and "503" in gen.stderr and "hint:" in gen.stderr
    gen = subprocess.run(
        [REMOTEGPU, "generate", "--model", "remotegpu/tiny-random-flux1", "x"],
        env=base_env(REMOTEGPU_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gen.returncode == 2 and "keys create" in gen.stderr

    listing = subprocess.run(
        [REMOTEGPU, "models", "list", "--url", url], env=env, capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0 and "remotegpu/tiny-random-flux2-klein" in listing.stdout

    # After the idle window the model unloads (sleeping).
    deadline = time.monotonic() + 60
    while (
        models(url)["remotegpu/tiny-random-flux1"]["runtime"]["state"] != "sleeping"
        or "remotegpu/tiny-random-flux1: idle for 4s, unloaded (sleeping)" not in serve.log()
    ):
        assert time.monotonic() < deadline, serve.log()[-2000:]
        time.sleep(0.5)

    serve.signal(signal.SIGINT)
    assert serve.wait(timeout=60) == 0, serve.log()[-2000:]


def test_generate_without_a_service_says_how_to_start_one(tmp_path: Path) -> None:
    r = subprocess.run(
        [REMOTEGPU, "generate", "--model", "m", "x", "-o", str(tmp_path / "x.png")],
        env=base_env(REMOTEGPU_URL=f"http://127.0.0.1:{free_port()}", REMOTEGPU_API_KEY="k"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3 and "make run" in r.stderr
