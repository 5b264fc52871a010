"""`remotegpu cache fetch` from an S3-compatible bucket, as a real process against a real
SeaweedFS (its own request metrics count what the fetcher sent): the manifest, the
verify modes, partial and corrupted caches, and errors that say what to check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fixtures.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS

REMOTEGPU = str(Path(sys.executable).parent / "remotegpu")
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(seaweedfs: SeaweedFS, tiny_models_dir: Path) -> tuple[str, str, dict[str, bytes]]:
    """The tiny FLUX.1 folder uploaded under a prefix of its own: (bucket, prefix, files)."""
    bucket, prefix = seaweedfs.bucket(), f"models/{uuid.uuid4().hex[:8]}/flux1"
    folder = tiny_models_dir / "flux1"
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    client = seaweedfs.client()
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    client.put_object(Bucket=bucket, Key=f"{prefix}/", Body=b"")  # a folder marker, as consoles make
    return bucket, prefix, files


def fetch(
    s3: SeaweedFS, dest: Path, bucket: str, prefix: str, *args: str, secret: str = SECRET_KEY
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret}
    for var in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        env.pop(var, None)
    cmd = [REMOTEGPU, "cache", "fetch", "--dest", str(dest), "--s3-bucket", bucket, "--s3-prefix", prefix]
    cmd += ["--s3-endpoint", s3.endpoint, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def sent(s3: SeaweedFS, bucket: str, before: dict[str, int]) -> dict[str, int]:
    """Requests of each type since `before` (the server's own count)."""
    now = s3.s3_requests(bucket)
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


def test_first_fetch_downloads_every_object_and_a_second_sends_nothing(
    seaweedfs: SeaweedFS, model: tuple[str, str, dict[str, bytes]], tmp_path: Path
):
    bucket, prefix, files = model
    dest, record = tmp_path / "cache" / "weights", tmp_path / "record.json"
    before, bytes_before = seaweedfs.s3_requests(bucket), seaweedfs.s3_bytes_sent(bucket)
    r = fetch(seaweedfs, dest, bucket, prefix, "--record", str(record))
    assert r.returncode == 0, r.stderr
    assert "fetched" in r.stdout and f"s3://{bucket}/{prefix}/" in r.stdout
    for rel, data in files.items():  # the cache holds the folder, byte for byte
        assert (dest / rel).read_bytes() == data
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(
        [*files, ".remotegpu-cache.json"]
    )
    first = sent(seaweedfs, bucket, before)
    assert first.get("GET", 0) >= len(files), first  # every object (a big one may take ranges)
    assert seaweedfs.s3_bytes_sent(bucket) - bytes_before == sum(len(d) for d in files.values())
    manifest = json.loads((dest / ".remotegpu-cache.json").read_text())
    assert manifest["source"] == f"s3://{bucket}/{prefix}/ at {seaweedfs.endpoint}"
    assert manifest["sizeBytes"] == sum(len(d) for d in files.values())
    rec = json.loads(record.read_text())
    assert rec["fetched"] is True and rec["files"] == len(files)

    before = seaweedfs.s3_requests(bucket)
    r = fetch(seaweedfs, dest, bucket, prefix, "--record", str(record), "--verify", "full")
    assert r.returncode == 0 and "nothing downloaded" in r.stdout, r.stderr
    assert sent(seaweedfs, bucket, before) == {}  # not even a LIST
    assert json.loads(record.read_text())["fetched"] is False


def test_a_partial_cache_fetches_only_what_is_missing(
    seaweedfs: SeaweedFS, model: tuple[str, str, dict[str, bytes]], tmp_path: Path
):
    bucket, prefix, files = model
    dest = tmp_path / "weights"
    assert fetch(seaweedfs, dest, bucket, prefix).returncode == 0
    weights = dest / WEIGHTS
    weights.write_bytes(files[WEIGHTS][: len(files[WEIGHTS]) // 3])  # an interrupted copy
    (dest / "model_index.json").unlink()
    (dest / "vae" / "x.part.1a2b").write_bytes(b"left by a killed download")
    before, bytes_before = seaweedfs.s3_requests(bucket), seaweedfs.s3_bytes_sent(bucket)
    r = fetch(seaweedfs, dest, bucket, prefix, "--termination-log", str(tmp_path / "term"))
    assert r.returncode == 0, r.stderr
    assert sent(seaweedfs, bucket, before).get("LIST") == 1
    # the two bad files' bytes, nothing else
    assert seaweedfs.s3_bytes_sent(bucket) - bytes_before == len(files[WEIGHTS]) + len(
        files["model_index.json"]
    )
    assert (
        weights.read_bytes() == files[WEIGHTS]
        and (dest / "model_index.json").read_bytes() == files["model_index.json"]
    )
    assert not (dest / "vae" / "x.part.1a2b").exists()
    term = json.loads((tmp_path / "term").read_text())
    assert term["fetched"] is True and any(WEIGHTS in p for p in term["problems"])


def test_a_corrupted_file_is_caught_by_the_full_check_and_fetched_again(
    seaweedfs: SeaweedFS, model: tuple[str, str, dict[str, bytes]], tmp_path: Path
):
    bucket, prefix, files = model
    dest = tmp_path / "weights"
    assert fetch(seaweedfs, dest, bucket, prefix).returncode == 0
    flipped = bytearray(files[WEIGHTS])
    flipped[-10] ^= 0xFF  # same size, one byte flipped
    (dest / WEIGHTS).write_bytes(bytes(flipped))
    before, bytes_before = seaweedfs.s3_requests(bucket), seaweedfs.s3_bytes_sent(bucket)
    assert fetch(seaweedfs, dest, bucket, prefix).returncode == 0  # sizes only: cannot see it
    assert sent(seaweedfs, bucket, before) == {}
    r = fetch(seaweedfs, dest, bucket, prefix, "--verify", "full")
    assert r.returncode == 0, r.stderr
    assert seaweedfs.s3_bytes_sent(bucket) - bytes_before == len(files[WEIGHTS])  # that file only
    assert (dest / WEIGHTS).read_bytes() == files[WEIGHTS]


def test_another_prefix_is_another_source_fetched_in_full(
    seaweedfs: SeaweedFS, model: tuple[str, str, dict[str, bytes]], tmp_path: Path
):
    bucket, prefix, files = model
    other = f"{prefix}-v2"
    client = seaweedfs.client()
    for rel, data in files.items():  # the same files, one changed at the same size
        body = data if rel != WEIGHTS else bytes(reversed(data))
        client.put_object(Bucket=bucket, Key=f"{other}/{rel}", Body=body)
    dest = tmp_path / "weights"
    assert fetch(seaweedfs, dest, bucket, prefix).returncode == 0
    before = seaweedfs.s3_requests(bucket)
    assert fetch(seaweedfs, dest, bucket, other).returncode == 0
    assert sent(seaweedfs, bucket, before).get("GET", 0) >= len(files)
    assert (dest / WEIGHTS).read_bytes() == bytes(reversed(files[WEIGHTS]))


def test_errors_say_what_to_check(
    seaweedfs: SeaweedFS, model: tuple[str, str, dict[str, bytes]], tmp_path: Path
):
    bucket, prefix, _ = model
    term = tmp_path / "term"
    r = fetch(seaweedfs, tmp_path / "a", bucket, "models/no-such-model", "--termination-log", str(term))
    assert r.returncode == 1 and "check cache.source.s3.prefix" in r.stderr, r.stderr
    assert json.loads(term.read_text())["ready"] is False
    r = fetch(seaweedfs, tmp_path / "b", bucket, prefix, secret="wrong")
    assert r.returncode == 1 and "cache.source.s3.credentialsSecret" in r.stderr, r.stderr
    r = fetch(seaweedfs, tmp_path / "c", "no-such-bucket-here", prefix)
    assert r.returncode == 1 and "check cache.source.s3.bucket" in r.stderr, r.stderr
    assert not (tmp_path / "c" / ".remotegpu-cache.json").exists()
