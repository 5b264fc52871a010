"""Blob storage for input and result images, behind a small interface.

`LocalDirStorage` serves the embedded default (a folder in the data dir) and a mounted
volume; `S3Storage` an S3-compatible bucket (AWS S3, SeaweedFS, Ceph RGW, ...), which
any number of gateway replicas share. Either way the gateway serves the results itself,
under its own signed URLs, so the storage never needs to be reachable from outside.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from remotegpu_base import s3

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


class S3Storage:
    """Keys as objects under `prefix` in an S3-compatible bucket (which must exist).

    Credentials come from boto3's usual chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
    a web identity (IRSA, workload identity), or the instance's role. Any failure to reach
    the store is a StorageError: the caller answers 500 and keeps nothing half-done.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str = "",
        timeout_seconds: float = 10.0,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client = s3.client(endpoint_url, region, timeout_seconds=timeout_seconds, attempts=2)

    def _key(self, key: str) -> str:
        if not _KEY.match(key) or ".." in key.split("/"):
            raise StorageError(f"invalid storage key {key!r}")
        return self.prefix + key

    def _call(self, what: str, key: str, fn: Callable[..., Any], **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, Key=self._key(key), **kw)
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"could not {what} {key} in bucket {self.bucket}: {e}") from e

    def put(self, key: str, data: bytes) -> None:
        self._call("store", key, self._client.put_object, Body=data)

    def get(self, key: str) -> bytes:
        body = self._call("read", key, self._client.get_object)["Body"]
        try:
            return bytes(body.read())
        except Exception as e:  # noqa: BLE001 - a connection cut mid-body
            raise StorageError(f"could not read {key} in bucket {self.bucket}: {e}") from e
        finally:
            body.close()

    def size(self, key: str) -> int:
        return int(self._call("read", key, self._client.head_object)["ContentLength"])

    def delete(self, key: str) -> None:
        self._call("delete", key, self._client.delete_object)  # a missing key is no error in S3


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
