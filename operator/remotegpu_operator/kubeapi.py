"""A small async Kubernetes REST client (httpx) for the operator's own reads and writes.

kopf watches ImageModels with its own client; the handlers read and write
Deployments, Pods, Leases and ImageModel status through this one: plain JSON dicts
(the same shapes the pure modules take), explicit patch content types, and one
shared connection pool on kopf's event loop. Credentials are read the way kopf
reads them (the pod's service account in a cluster, else $KUBECONFIG), and the
same `ConnectionInfo` logs kopf in, so both act as one identity.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
import time
from typing import Any

import httpx
import kopf

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def connection_info() -> kopf.ConnectionInfo:
    """The pod's service account in a cluster, else the current context of $KUBECONFIG."""
    settings = kopf.OperatorSettings()
    info = None
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(f"{SA_DIR}/token"):
        info = kopf.login_with_service_account(settings=settings)
        if info is not None:
            host, port = (
                os.environ["KUBERNETES_SERVICE_HOST"],
                os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
            )
            host = f"[{host}]" if ":" in host else host
            info = _replace_server(info, f"https://{host}:{port}")
    if info is None:
        info = kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig ($KUBECONFIG, ~/.kube/config)")
    return info


def _replace_server(info: kopf.ConnectionInfo, server: str) -> kopf.ConnectionInfo:
    import dataclasses

    return dataclasses.replace(info, server=server)


def _pem(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    if info.ca_path:
        ctx = ssl.create_default_context(cafile=os.fspath(info.ca_path))
    elif info.ca_data:
        ctx = ssl.create_default_context(cadata=_pem(info.ca_data).decode())
    else:
        ctx = ssl.create_default_context()
    cert, key = info.certificate_path, info.private_key_path
    tmp: list[str] = []
    if info.certificate_data:
        cert = _tempfile(_pem(info.certificate_data), tmp)
    if info.private_key_data:
        key = _tempfile(_pem(info.private_key_data), tmp)
    if cert:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
    for path in tmp:
        os.unlink(path)
    return ctx


def _tempfile(data: bytes, created: list[str]) -> str:
    fd, path = tempfile.mkstemp(prefix="remotegpu-operator-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    created.append(path)
    return path


class KubeAPI:
    def __init__(self, info: kopf.ConnectionInfo | None = None, timeout: float = 15.0):
        self.info = info or connection_info()
        self._token = self.info.token
        self._token_read = time.monotonic()
        self._http = httpx.AsyncClient(
            base_url=self.info.server,
            verify=_ssl_context(self.info),
            timeout=timeout,
            limits=httpx.Limits(max_connections=32),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _headers(self) -> dict[str, str]:
        # Projected service-account tokens rotate: re-read the file every minute.
        if os.path.exists(f"{SA_DIR}/token") and time.monotonic() - self._token_read > 60:
            with open(f"{SA_DIR}/token") as f:
                self._token = f.read().strip()
            self._token_read = time.monotonic()
        if self._token:
            return {"Authorization": f"Bearer {self._token}"}
        return {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content_type: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        headers = self._headers()
        if content_type:
            headers["Content-Type"] = content_type
        r = await self._http.request(method, path, json=json, params=params, headers=headers)
        if r.status_code >= 400:
            try:
                body = r.json()
                raise ApiError(r.status_code, body.get("reason", ""), body.get("message", r.text))
            except ValueError:
                raise ApiError(r.status_code, r.reason_phrase, r.text) from None
        return r.json() if r.content else {}

    async def get(self, path: str, **params: Any) -> dict[str, Any] | None:
        """The object at `path`, or None when it does not exist."""
        try:
            return await self.request("GET", path, params=params or None)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, json=body)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, json=body)

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, json=body, content_type=MERGE_PATCH)


def deployments(ns: str, name: str | None = None) -> str:
    return f"/apis/apps/v1/namespaces/{ns}/deployments" + (f"/{name}" if name else "")


def pods(ns: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else "")


def leases(ns: str, name: str | None = None) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases" + (f"/{name}" if name else "")


def imagemodel_status(ns: str, name: str) -> str:
    from remotegpu_base.catalog import API_GROUP, API_VERSION, PLURAL

    return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{ns}/{PLURAL}/{name}/status"
