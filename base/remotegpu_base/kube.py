"""The project's one Kubernetes client: kr8s (async, over httpx).

The gateway's catalog watcher and the operator's own reads and writes go through it
(kopf watches ImageModels with its own client, logged in with these credentials).
kr8s reads the credentials (a kubeconfig: --kubeconfig, else $KUBECONFIG or
~/.kube/config; else the pod's service account) and reads them again when the API
server answers 401, so rotated service-account tokens need nothing here. Objects
go in and come out as plain dicts, the shapes the pure modules take.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import kr8s
import kr8s.asyncio
from kr8s.asyncio.objects import APIObject, Deployment, Pod, new_class

from remotegpu_base.catalog import API_GROUP, API_VERSION, KIND, PLURAL

ImageModelObject = new_class(KIND, f"{API_GROUP}/{API_VERSION}", namespaced=True, plural=PLURAL)
Lease = new_class("Lease", "coordination.k8s.io/v1", namespaced=True)
Api = kr8s.asyncio.Api
ServerError = kr8s.ServerError
NotFoundError = kr8s.NotFoundError
# What a failed call may raise: an error answer, no answer in time, no connection.
ERRORS = (kr8s.ServerError, kr8s.NotFoundError, kr8s.APITimeoutError, httpx.HTTPError, OSError)

__all__ = [
    "ERRORS",
    "APIObject",
    "Api",
    "Deployment",
    "ImageModelObject",
    "Lease",
    "NotFoundError",
    "Pod",
    "ServerError",
    "connect",
    "status_of",
]


async def connect(kubeconfig: str | None = None, *, timeout: float = 15.0) -> Api:
    """The API of the kubeconfig (or $KUBECONFIG, or the pod's service account).

    kr8s sets no request timeout of its own (and asks the server its version on
    connecting): a server that never answers must not hang the caller.
    """
    api = await asyncio.wait_for(kr8s.asyncio.api(kubeconfig=kubeconfig), timeout)
    api.timeout = timeout
    return api


def status_of(e: Exception) -> int | None:
    """The HTTP status of a failed call (None when the server did not answer)."""
    if isinstance(e, kr8s.NotFoundError):
        return 404
    response = getattr(e, "response", None)
    return response.status_code if response is not None else None


async def get(api: Api, kind: type[APIObject], namespace: str | None, name: str) -> dict[str, Any] | None:
    """The object, or None when it does not exist (namespace None: a cluster-scoped kind).

    Straight from the answer's JSON: kr8s's objects convert every answer to a Box and back,
    which was most of an idle operator's CPU (it reads each model's Deployment every tick).
    """
    try:
        async with api.call_api(
            "GET", version=kind.version, namespace=namespace, url=f"{kind.endpoint}/{name}"
        ) as r:
            return r.json()  # type: ignore[no-any-return]
    except kr8s.ServerError as e:
        if status_of(e) == 404:
            return None
        raise


async def list_of(api: Api, kind: type[APIObject], namespace: str | None, **params: Any) -> dict[str, Any]:
    """One list call (`items` and `metadata.resourceVersion`, for a watch to start from);
    namespace None: every namespace."""
    async with api.call_api(
        "GET", version=kind.version, namespace=namespace, url=kind.endpoint, params=params
    ) as r:
        return r.json()


async def watch(
    api: Api, kind: type[APIObject], namespace: str, resource_version: str, timeout_seconds: int = 60
) -> AsyncIterator[dict[str, Any]]:
    """The events of one watch from `resource_version` (bookmarks included), until the server
    ends it after `timeout_seconds`. kr8s's own watch sets neither timeout and resumes a
    410 Gone from the same, expired version; the caller here lists again instead.
    """
    params = {
        "watch": "true",
        "resourceVersion": resource_version,
        "timeoutSeconds": timeout_seconds,
        "allowWatchBookmarks": "true",
    }
    async with api.call_api(
        "GET",
        version=kind.version,
        namespace=namespace,
        url=kind.endpoint,
        params=params,
        stream=True,
        timeout=httpx.Timeout(10, read=timeout_seconds + 30),  # a silent watch is given up on
    ) as r:
        async for line in r.aiter_lines():
            if line:
                yield json.loads(line)


async def create(api: Api, kind: type[APIObject], body: dict[str, Any]) -> dict[str, Any]:
    obj = kind(body, api=api)
    await obj.create()
    return obj.raw.to_dict()


async def replace(api: Api, kind: type[APIObject], body: dict[str, Any]) -> dict[str, Any]:
    """PUT: the body's resourceVersion makes it fail with 409 when someone wrote first."""
    meta = body["metadata"]
    async with api.call_api(
        "PUT",
        version=kind.version,
        namespace=meta.get("namespace"),
        url=f"{kind.endpoint}/{meta['name']}",
        content=json.dumps(body),
    ) as r:
        return r.json()


async def delete(api: Api, kind: type[APIObject], namespace: str, name: str, *, uid: str) -> None:
    """Deletes that very object (a precondition on its uid: not one re-created under the name)
    and, in the background, what it owns; gone already is fine."""
    body = {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
    try:
        async with api.call_api(
            "DELETE",
            version=kind.version,
            namespace=namespace,
            url=f"{kind.endpoint}/{name}",
            content=json.dumps(body),
        ):
            pass
    except kr8s.ServerError as e:
        if status_of(e) != 404:
            raise


async def patch(
    api: Api,
    kind: type[APIObject],
    namespace: str,
    name: str,
    body: dict[str, Any],
    subresource: str | None = None,
) -> None:
    """A JSON merge patch (raises kr8s.NotFoundError when the object is gone)."""
    url = f"{kind.endpoint}/{name}" + (f"/{subresource}" if subresource else "")
    headers = {"Content-Type": "application/merge-patch+json"}
    try:
        async with api.call_api(
            "PATCH",
            version=kind.version,
            namespace=namespace,
            url=url,
            content=json.dumps(body),
            headers=headers,
        ):
            pass
    except kr8s.ServerError as e:
        if status_of(e) == 404:
            raise kr8s.NotFoundError(f"{kind.kind} {namespace}/{name} does not exist") from e
        raise
