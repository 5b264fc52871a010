"""The model cache's fetcher: weights into a cache folder once, checked at every start.

`remotegpu cache fetch` runs as the worker pod's init container (and in the pre-warm
DaemonSet's pods) with the cache volume mounted read-write; the worker container then
mounts the same folder read-only. Several pods on one node wait on one lock, so one of
them fetches and the others find the folder complete: they send no request at all.

A complete folder has a manifest (`MANIFEST`) listing every file with its size and
SHA-256, written only after the fetch. At each start the folder is checked against it
(sizes, or with `--verify full` every byte); files that are missing, short or corrupted
are deleted and fetched again (the Hugging Face client re-downloads exactly those).

Sources: a Hugging Face repo at a revision (`huggingface_hub.snapshot_download`, with
`HF_ENDPOINT` and `HF_TOKEN`), an S3-compatible bucket (boto3: every object under a
prefix; `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or the pod's identity), or a folder
(a PVC or host path mounted in the pod).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotegpu_base import s3

log = logging.getLogger("remotegpu_worker.cache")

MANIFEST = ".remotegpu-cache.json"
# The Hugging Face client's own bookkeeping in a local_dir download: not weights.
_HF_LOCAL_META = ".cache"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""  # "" or ending in "/"
    endpoint: str | None = None
    region: str | None = None

    def __str__(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


@dataclass(frozen=True)
class Source:
    hf_repo: str | None = None
    revision: str | None = None
    folder: Path | None = None
    s3: S3Location | None = None

    @property
    def key(self) -> str:
        """What the manifest records: a cache for another source is refetched."""
        if self.hf_repo:
            return f"hf://{self.hf_repo}@{self.revision or 'main'}"
        if self.s3 is not None:
            return str(self.s3)
        return f"dir://{self.folder}"


@dataclass
class FetchResult:
    fetched: bool  # anything downloaded or copied
    problems: list[str]  # what the check found before fetching
    size_bytes: int
    files: int
    started_at: float
    finished_at: float
    fetched_at: str  # when the cache was last completed (UTC)

    def record(self) -> dict[str, object]:
        return {
            "fetched": self.fetched,
            "problems": self.problems[:20],
            "sizeBytes": self.size_bytes,
            "files": self.files,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "fetchedAt": self.fetched_at,
        }


class FetchError(Exception):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _weight_files(dest: Path) -> list[Path]:
    return sorted(
        p
        for p in dest.rglob("*")
        if p.is_file() and p.name != MANIFEST and _HF_LOCAL_META not in p.relative_to(dest).parts
    )


def read_manifest(dest: Path) -> dict[str, object] | None:
    try:
        data = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check(dest: Path, source: Source, full: bool) -> tuple[list[str], list[str]]:
    """(problems, bad files): what keeps the folder from being a complete cache of `source`."""
    manifest = read_manifest(dest)
    if manifest is None:
        return ["no manifest: never fetched completely"], []
    if manifest.get("source") != source.key:
        # The Hub client compares each file with the repo; a folder or bucket copy only
        # compares sizes: every file of another source is fetched again.
        bad = [] if source.hf_repo else [str(p.relative_to(dest)) for p in _weight_files(dest)]
        return [f"cached {manifest.get('source')}, want {source.key}"], bad
    files = manifest.get("files")
    if not isinstance(files, dict):
        return ["unreadable manifest"], []
    problems, bad = [], []
    for rel, meta in files.items():
        path = dest / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, want {meta['size']}")
        elif full and _sha256(path) != meta["sha256"]:
            problems.append(f"{rel}: SHA-256 differs (corrupted)")
        else:
            continue
        bad.append(rel)
    return problems, bad


def _forget(dest: Path, rels: list[str]) -> None:
    """Deletes files so the next fetch gets them again (with the Hub client's record of them)."""
    for rel in rels:
        for path in (dest / rel, dest / _HF_LOCAL_META / "huggingface" / "download" / f"{rel}.metadata"):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One fetch per folder at a time (per node for a hostPath; flock works on most RWX volumes)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(dest: Path, source: Source) -> None:
    if source.hf_repo:
        from huggingface_hub import snapshot_download

        snapshot_download(
            source.hf_repo,
            revision=source.revision,
            local_dir=dest,
            token=os.environ.get("HF_TOKEN") or None,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
        return
    if source.s3 is not None:
        _download_s3(dest, source.s3)
        return
    assert source.folder is not None
    if not source.folder.is_dir():
        raise FetchError(f"source folder {source.folder} does not exist (is the volume mounted?)")
    for path in sorted(p for p in source.folder.rglob("*") if p.is_file()):
        target = dest / path.relative_to(source.folder)
        if target.is_file() and target.stat().st_size == path.stat().st_size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(path, tmp)
        tmp.replace(target)


def _s3_client(loc: S3Location) -> Any:
    return s3.client(loc.endpoint, loc.region, timeout_seconds=10, read_timeout_seconds=60, attempts=5)


def _s3_hint(e: Exception, loc: S3Location) -> str:
    """The error, and what to check in cache.source.s3."""
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
    hint = {
        "NoSuchBucket": "check cache.source.s3.bucket (and endpoint: the bucket must exist on that server)",
        "AccessDenied": "check the key in cache.source.s3.credentialsSecret: it needs s3:ListBucket and s3:GetObject",
        "InvalidAccessKeyId": "check the access key ID in cache.source.s3.credentialsSecret",
        "SignatureDoesNotMatch": "check the secret access key in cache.source.s3.credentialsSecret",
    }.get(code)
    if hint is None and "credentials" in str(e).lower():
        hint = "set cache.source.s3.credentialsSecret, or give the worker's ServiceAccount an identity"
    if hint is None and type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError"):
        hint = "check cache.source.s3.endpoint: is the server reachable from the node?"
    return f"{loc}: {e}" + (f" ({hint})" if hint else "")


def _download_s3(dest: Path, loc: S3Location) -> None:
    """Every object under the prefix into `dest`; a file already there at the object's
    size is kept (downloads land in `.part` files first: a complete name is a complete file)."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client(loc)
    transfer = TransferConfig(multipart_chunksize=64 << 20, max_concurrency=8)
    try:
        objects = [
            (o["Key"], int(o["Size"]))
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix)
            for o in page.get("Contents", [])
            if not o["Key"].endswith("/")  # folder markers
        ]
        if not objects:
            raise FetchError(
                f"no objects under {loc}: check cache.source.s3.prefix (the model's folder, with model_index.json)"
            )
        for key, size in objects:
            rel = key[len(loc.prefix) :]
            if rel.startswith("/") or ".." in rel.split("/"):
                raise FetchError(f"{loc}: object key {key!r} leaves the model's folder")
            target = dest / rel
            if target.is_file() and target.stat().st_size == size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            client.download_file(loc.bucket, key, str(tmp), Config=transfer)
            if tmp.stat().st_size != size:
                raise FetchError(f"{loc}: {key}: got {tmp.stat().st_size} bytes, the object has {size}")
            tmp.replace(target)
        wanted = {key[len(loc.prefix) :] for key, _ in objects}
        for path in _weight_files(dest):  # what an interrupted download left, or the bucket no longer has
            if str(path.relative_to(dest)) not in wanted:
                path.unlink()
    except (BotoCoreError, ClientError) as e:
        raise FetchError(_s3_hint(e, loc)) from e


def _write_manifest(dest: Path, source: Source) -> tuple[int, int]:
    files = {
        str(p.relative_to(dest)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _weight_files(dest)
    }
    manifest = {
        "source": source.key,
        "files": files,
        "sizeBytes": sum(int(m["size"]) for m in files.values()),  # type: ignore[call-overload]
        "fetchedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = dest / f"{MANIFEST}.part"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(dest / MANIFEST)
    return int(manifest["sizeBytes"]), len(files)  # type: ignore[call-overload]


def fetch(dest: Path, source: Source, *, full: bool = False) -> FetchResult:
    """Makes `dest` a complete, checked cache of `source`; downloads only what is missing or bad."""
    started = time.time()
    with _locked(dest):
        problems, bad = check(dest, source, full)
        if problems:
            log.info("fetching %s into %s: %s", source.key, dest, "; ".join(problems[:5]))
            (dest / MANIFEST).unlink(missing_ok=True)
            _forget(dest, bad)
            dest.mkdir(parents=True, exist_ok=True)
            _download(dest, source)
            size, count = _write_manifest(dest, source)
            again, _ = check(dest, source, full=False)
            if again:
                raise FetchError(f"the fetched cache is still incomplete: {'; '.join(again[:5])}")
        else:
            manifest = read_manifest(dest) or {}
            size, count = int(manifest.get("sizeBytes") or 0), len(manifest.get("files") or {})  # type: ignore[call-overload, arg-type]
        fetched_at = str((read_manifest(dest) or {}).get("fetchedAt") or "")
    return FetchResult(bool(problems), problems, size, count, started, time.time(), fetched_at)


def gc(root: Path, keep: list[str]) -> tuple[list[str], list[str]]:
    """Deletes the model folders under `root` (one per ImageModel) not named in `keep`;
    returns (removed, what could not be deleted)."""
    removed: list[str] = []
    errors: list[str] = []
    if not root.is_dir():
        return removed, errors
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, onerror=lambda _fn, path, info: errors.append(f"{path}: {info[1]}"))
            (errors if child.exists() else removed).append(child.name)
    return removed, errors


def fetch_command(args: argparse.Namespace) -> int:
    """`remotegpu cache fetch`: exit 0 with the cache complete, 1 with the reason."""
    logging.basicConfig(
        level=os.environ.get("REMOTEGPU_LOG_LEVEL", "INFO"), format="%(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per file request otherwise
    if sum(bool(x) for x in (args.hf_repo, args.from_dir, args.s3_bucket)) != 1:
        print(
            "remotegpu cache fetch: give exactly one of --hf-repo, --s3-bucket, --from-dir", file=sys.stderr
        )
        return 2
    s3 = None
    if args.s3_bucket:
        prefix = (args.s3_prefix or "").strip("/")
        s3 = S3Location(args.s3_bucket, f"{prefix}/" if prefix else "", args.s3_endpoint, args.s3_region)
    source = Source(args.hf_repo, args.revision, Path(args.from_dir) if args.from_dir else None, s3)
    for folder in args.make_dir or []:
        # Made by this (non-root) user: a folder the kubelet makes for a subPath mount is root's.
        Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        result = fetch(Path(args.dest), source, full=args.verify == "full")
    except Exception as e:  # noqa: BLE001 - the pod's status shows this line
        message = f"could not fetch {source.key}: {type(e).__name__}: {e}"
        print(f"remotegpu cache fetch: {message}", file=sys.stderr)
        _write(args.termination_log, json.dumps({"ready": False, "message": message[:2000]}))
        return 1
    record = json.dumps(result.record())
    for path in (args.record, args.termination_log):
        _write(path, record)
    verb = "fetched" if result.fetched else "already cached (nothing downloaded)"
    print(f"{source.key}: {verb}: {result.files} files, {result.size_bytes / 1e9:.3f} GB in {args.dest}")
    return 0


def _write(path: str | None, text: str) -> None:
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(text)


def gc_command(args: argparse.Namespace) -> int:
    removed, errors = gc(Path(args.root), [k for k in (args.keep or "").split(",") if k])
    print(f"removed {len(removed)} model cache(s) under {args.root}: {', '.join(removed) or 'none'}")
    for line in errors:
        print(f"remotegpu cache gc: could not delete {line}", file=sys.stderr)
    return 1 if errors else 0
