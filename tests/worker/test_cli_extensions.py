"""The extensions through the `remotegpu` command against a real `remotegpu serve`:
`generate --output-format`, a key's GPU-seconds quota (`keys create|update`), the 429
hint, and `keys usage`."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from tests.fixtures.processes import Proc
from tests.fixtures.tiny_models import copy_tiny_models
from tests.waiting import wait_http
from tests.worker.conftest import REMOTEGPU, base_env, free_port

TINY = "remotegpu/tiny-random-flux1"


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REMOTEGPU, *args], env=env or base_env(), capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_formats_quota_and_usage_from_the_command_line(
    procs: Callable[..., Proc], tmp_path: Path, tiny_data_dir: Path
) -> None:
    data = tmp_path / "data"
    copy_tiny_models(tiny_data_dir, data)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = procs(
        [REMOTEGPU, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data)],
        base_env(),
        tmp_path / "serve.log",
    )
    wait_http(f"{url}/readyz", 240, serve)
    # A quota the first job uses up: the second is refused until midnight UTC.
    made = cli(
        "keys", "create", "me", "--gpu-seconds-per-day", "0.001", "--data-dir", str(data), cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    env = base_env(REMOTEGPU_URL=url, REMOTEGPU_API_KEY=made.stdout.strip().splitlines()[-1])

    gen = cli(
        "generate",
        "--model",
        TINY,
        "a lighthouse",
        "--steps",
        "2",
        "--output-format",
        "webp",
        cwd=tmp_path,
        env=env,
    )
    assert gen.returncode == 0, gen.stderr + serve.log()[-3000:]
    with Image.open(tmp_path / "out.webp") as im:  # no -o: out.<the format's extension>
        assert (im.format, im.size) == ("WEBP", (512, 512))

    refused = cli("generate", "--model", TINY, "again", "--steps", "2", cwd=tmp_path, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "HTTP 429" in refused.stderr and "GPU-seconds today" in refused.stderr
    assert "retry in" in refused.stderr and "remotegpu keys update" in refused.stderr

    usage = cli("keys", "usage", "me", "--data-dir", str(data), cwd=tmp_path)
    assert usage.returncode == 0, usage.stderr
    total = usage.stdout.splitlines()[-1].split()
    assert total[:5] == ["total", "1", "1", "0", "0"], usage.stdout
    assert float(total[5]) > 0

    updated = cli(
        "keys", "update", "me", "--gpu-seconds-per-day", "default", "--data-dir", str(data), cwd=tmp_path
    )
    assert updated.returncode == 0 and "default" in updated.stdout, updated.stdout + updated.stderr
    gen = cli(
        "generate",
        "--model",
        TINY,
        "again",
        "--steps",
        "2",
        "--output-format",
        "jpeg",
        "--output-quality",
        "40",
        "-o",
        "again.jpg",
        cwd=tmp_path,
        env=env,
    )
    assert gen.returncode == 0, gen.stderr
    with Image.open(tmp_path / "again.jpg") as im:
        assert im.format == "JPEG"
