"""`remotegpu cache fetch` (the model cache's fetcher) as a real process, with the real
Hugging Face client downloading from a local stand-in for the Hub that counts requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.hub import FakeHub

REMOTEGPU = str(Path(sys.executable).parent / "remotegpu")
REPO = "remotegpu/tiny-random-flux1"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def hub(tiny_models_dir: Path) -> Iterator[FakeHub]:
    h = FakeHub({REPO: tiny_models_dir / "flux1"}).start()
    yield h
    h.stop()


def fetch(
    hub: FakeHub, dest: Path, *args: str, token: str | None = None, wait: bool = True
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    cmd = [REMOTEGPU, "cache", "fetch", "--dest", str(dest), "--hf-repo", REPO, *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_first_fetch_downloads_and_a_second_sends_no_request(
    hub: FakeHub, tiny_models_dir: Path, tmp_path: Path
):
    dest, record = tmp_path / "cache" / "m", tmp_path / "record.json"
    r = fetch(hub, dest, "--record", str(record))
    assert r.returncode == 0, r.stderr
    files = [p for p in (tiny_models_dir / "flux1").rglob("*") if p.is_file()]
    assert hub.file_downloads() == len(files)
    for src in files:  # the cache holds the repo, byte for byte
        assert (dest / src.relative_to(tiny_models_dir / "flux1")).read_bytes() == src.read_bytes()
    rec = json.loads(record.read_text())
    assert rec["fetched"] is True and rec["files"] == len(files) and rec["finished_at"] >= rec["started_at"]
    hub.reset()
    r = fetch(hub, dest, "--record", str(record))
    assert r.returncode == 0 and "nothing downloaded" in r.stdout, r.stderr
    assert hub.total() == 0  # not even the repo's metadata
    assert json.loads(record.read_text())["fetched"] is False


def test_a_partial_file_is_detected_and_only_it_is_fetched_again(hub: FakeHub, tmp_path: Path):
    dest = tmp_path / "m"
    assert fetch(hub, dest).returncode == 0
    weights = dest / WEIGHTS
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    hub.reset()
    r = fetch(hub, dest, "--termination-log", str(tmp_path / "term"))
    assert r.returncode == 0, r.stderr
    assert hub.file_downloads() == 1 and weights.read_bytes() == whole
    term = json.loads((tmp_path / "term").read_text())
    assert term["fetched"] is True and any(WEIGHTS in p for p in term["problems"])


def test_a_corrupted_file_is_caught_by_the_full_check_and_fetched_again(hub: FakeHub, tmp_path: Path):
    dest = tmp_path / "m"
    assert fetch(hub, dest).returncode == 0
    weights = dest / WEIGHTS
    whole = bytearray(weights.read_bytes())
    whole[-10] ^= 0xFF  # same size, one byte flipped
    weights.write_bytes(bytes(whole))
    hub.reset()
    assert fetch(hub, dest).returncode == 0 and hub.total() == 0  # the size check cannot see it
    r = fetch(hub, dest, "--verify", "full")
    assert r.returncode == 0, r.stderr
    assert hub.file_downloads() == 1 and bytes(whole) != weights.read_bytes()


def test_a_missing_manifest_means_a_fetch_never_finished(hub: FakeHub, tmp_path: Path):
    dest = tmp_path / "m"
    assert fetch(hub, dest).returncode == 0
    (dest / ".remotegpu-cache.json").unlink()
    hub.reset()
    assert fetch(hub, dest).returncode == 0
    assert hub.total() > 0 and (dest / ".remotegpu-cache.json").is_file()


def test_pods_fetching_at_once_download_once(hub: FakeHub, tmp_path: Path):
    dest = tmp_path / "m"
    procs = [fetch(hub, dest, wait=False) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]  # type: ignore[union-attr]
    assert all(p.returncode == 0 for p in procs), outs  # type: ignore[union-attr]
    files = len([p for p in hub.repos[REPO].files])
    assert hub.file_downloads() == files
    assert sum("nothing downloaded" in out for out, _ in outs) == 2


def test_a_gated_repo_needs_the_token(tiny_models_dir: Path, tmp_path: Path):
    hub = FakeHub({REPO: tiny_models_dir / "flux1"}, token="hf_secret").start()
    try:
        r = fetch(hub, tmp_path / "m", "--termination-log", str(tmp_path / "term"))
        assert r.returncode == 1
        assert "could not fetch hf://remotegpu/tiny-random-flux1@main" in r.stderr
        assert json.loads((tmp_path / "term").read_text())["ready"] is False
        r = fetch(hub, tmp_path / "m", token="hf_secret")
        assert r.returncode == 0, r.stderr
    finally:
        hub.stop()


def test_a_folder_source_and_gc(tiny_models_dir: Path, tmp_path: Path):
    root = tmp_path / "root"
    cmd = [
        REMOTEGPU,
        "cache",
        "fetch",
        "--dest",
        str(root / "keep-me" / "weights"),
        "--from-dir",
        str(tiny_models_dir / "flux1"),
        "--make-dir",
        str(root / "keep-me" / "compiled"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "fetched" in r.stdout, r.stderr
    weights = root / "keep-me" / "weights" / WEIGHTS
    assert weights.read_bytes() == (tiny_models_dir / "flux1" / WEIGHTS).read_bytes()
    assert (root / "keep-me" / "compiled").is_dir()
    (root / "deleted-model" / "compiled").mkdir(parents=True)
    r = subprocess.run(
        [REMOTEGPU, "cache", "gc", "--root", str(root), "--keep", "keep-me"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "deleted-model" in r.stdout
    assert (root / "keep-me").is_dir() and not (root / "deleted-model").exists()
