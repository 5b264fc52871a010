"""Blob storage for input and result images, behind a small interface.

`LocalDirStorage` serves both the embedded default (a folder in the data dir) and the
cluster (a mounted volume path shared by the gateway replicas). An S3-compatible
implementation only needs the same three methods.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Protocol

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,400}$")


# A result's storage key ends with its format's extension, which gives the media type the
# result URL serves (results stored before output formats existed are .png).
RESULT_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


def result_key(job_id: str, tag: str, output_format: str) -> str:
    return f"results/{job_id}/{tag}.{RESULT_EXTENSIONS[output_format]}"


def result_media_type(key: str) -> str:
    return _MEDIA_TYPES.get(key.rpartition(".")[2], "application/octet-stream")


class StorageError(Exception):
    pass


class BlobStorage(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def size(self, key: str) -> int: ...
    def delete(self, key: str) -> None: ...


class LocalDirStorage:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key.split("/"):
            raise StorageError(f"invalid storage key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers never see a partial file
        except OSError as e:
            raise StorageError(f"could not store {key}: {e}") from e

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as e:
            raise StorageError(f"could not read {key}: {e}") from e

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except OSError as e:
            raise StorageError(f"could not read {key}: {e}") from e

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"could not delete {key}: {e}") from e
        if path.parent != self.root:  # the job's own folder (inputs/ID, results/ID), once empty
            try:
                path.parent.rmdir()
            except OSError:
                pass  # not empty, or already gone


class UrlSigner:
    """HMAC-signed, expiring result URLs: `?expires=UNIX&signature=...`."""

    def __init__(self, secret: str):
        self._secret = secret.encode()

    def signature(self, job_id: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"result:{job_id}:{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def verify(self, job_id: str, expires: int | None, signature: str | None) -> bool:
        if expires is None or not signature:
            return False
        if expires < time.time():
            return False
        return hmac.compare_digest(self.signature(job_id, expires).encode(), signature.encode())
