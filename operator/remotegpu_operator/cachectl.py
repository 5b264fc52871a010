"""The model cache's thin handler: applies what modelcache.py decides.

Each tick: the pre-warm DaemonSet runs on the workers' nodes while `cache.prewarm` is
set (switched off, or the cache removed, it is deleted), the status's per-node cache
entries follow the fetch containers of the model's pods, and the namespace's cache index
(a ConfigMap) keeps the model's spec and nodes. When an ImageModel with a cache is
deleted, Jobs delete its folder on every node that had it; `sweep` does the same for the
index's entries whose ImageModel is gone (deleted while the operator was down).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from kr8s.asyncio.objects import ConfigMap, DaemonSet, Job
from remotegpu_base import kube
from remotegpu_base.catalog import ImageModelSpec
from remotegpu_base.kube import Api, ImageModelObject, Pod

from remotegpu_operator import deployment, modelcache

log = logging.getLogger(__name__)


async def ensure_prewarm(
    api: Api, body: dict[str, Any], spec: ImageModelSpec, worker_dep: dict[str, Any]
) -> None:
    """Creates, updates or deletes the pre-warm DaemonSet."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    existing = await kube.get(api, DaemonSet, ns, modelcache.daemonset_name(name))
    if spec.cache is None or not spec.cache.prewarm:
        if existing is not None and _owned(existing, body):
            await kube.delete(
                api, DaemonSet, ns, existing["metadata"]["name"], uid=existing["metadata"]["uid"]
            )
            log.info(
                "%s/%s: pre-warm switched off: deleted DaemonSet %s", ns, name, existing["metadata"]["name"]
            )
        return
    template = worker_dep["spec"]["template"]
    desired = modelcache.prewarm_daemonset(body, spec, template["spec"], template["metadata"]["labels"])
    digest = deployment.template_hash(desired["spec"])
    desired["metadata"]["annotations"] = {deployment.TEMPLATE_HASH: digest}
    if existing is None:
        await kube.create(api, DaemonSet, desired)
        log.info("%s/%s: created pre-warm DaemonSet %s", ns, name, desired["metadata"]["name"])
    elif (
        _owned(existing, body)
        and (existing["metadata"].get("annotations") or {}).get(deployment.TEMPLATE_HASH) != digest
    ):
        desired["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
        await kube.replace(api, DaemonSet, desired)


def _owned(obj: dict[str, Any], body: dict[str, Any]) -> bool:
    uid = body["metadata"]["uid"]
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


async def cache_status(
    api: Api, body: dict[str, Any], spec: ImageModelSpec, worker_pods: list[dict[str, Any]], now: datetime
) -> dict[str, Any] | None:
    """`status.cache`: the cache on each node (None without a cache)."""
    if spec.cache is None:
        return None
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    selector = f"{modelcache.LABEL_CACHE}={deployment.label_value(name)}"
    prewarm = (await kube.list_of(api, Pod, ns, labelSelector=selector)).get("items", [])
    previous = ((body.get("status") or {}).get("cache") or {}).get("nodes")
    return {
        "path": modelcache.model_folder(ns, name),
        "nodes": modelcache.node_status([*worker_pods, *prewarm], previous, now),
    }


# -- the cache index: which caches exist, apart from the ImageModels -------------------


async def _index(api: Api, ns: str) -> dict[str, str]:
    cm = await kube.get(api, ConfigMap, ns, modelcache.INDEX)
    return dict((cm or {}).get("data") or {})


async def remember(api: Api, body: dict[str, Any], nodes: list[dict[str, Any]], written: str | None) -> str:
    """Writes the model's entry in its namespace's cache index when it changed (`written`:
    what this operator wrote last, None after a start); returns the entry."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if written is None:
        written = (await _index(api, ns)).get(name)
    entry = modelcache.index_entry(body, nodes, written)
    if entry == written:
        return entry
    try:
        await kube.patch(api, ConfigMap, ns, modelcache.INDEX, {"data": {name: entry}})
    except kube.NotFoundError:
        await kube.create(api, ConfigMap, modelcache.index_configmap(ns, {name: entry}))
    return entry


async def _forget(api: Api, ns: str, name: str) -> None:
    try:
        await kube.patch(api, ConfigMap, ns, modelcache.INDEX, {"data": {name: None}})
    except kube.NotFoundError:
        pass


async def _clean(
    api: Api, ns: str, name: str, spec: ImageModelSpec, nodes: list[str], keep: list[str]
) -> bool:
    """Jobs that delete the model's cache folders; False when one could not be created."""
    if spec.cache is None or (spec.cache.node_local is not None and not nodes):
        return True
    ok = True
    for job in modelcache.gc_jobs(ns, name, spec, nodes, keep):
        try:
            await kube.create(api, Job, job)
            log.info("%s/%s: cleaning the model cache with Job %s", ns, name, job["metadata"]["name"])
        except kube.ERRORS as e:
            if kube.status_of(e) != 409:  # already there: a Job of an earlier deletion of this name
                log.warning("%s/%s: could not create cache clean-up Job: %s", ns, name, e)
                ok = False
    return ok


async def collect_garbage(api: Api, body: dict[str, Any], others: list[dict[str, Any]]) -> None:
    """A deleted ImageModel's cache: Jobs remove its folder on every node of its status and
    of its index entry (`others`: the namespace's live models); then the entry goes. The
    entry's spec serves when the last spec had no cache (removed before the deletion)."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        spec: ImageModelSpec | None = ImageModelSpec.model_validate(body.get("spec") or {})
    except ValueError:
        spec = None
    try:
        index = await _index(api, ns)
    except kube.ERRORS:
        index = {}  # the periodic sweep tries again from the index
    nodes = [n.get("node") for n in ((body.get("status") or {}).get("cache") or {}).get("nodes") or []]
    if name in index:
        indexed_spec, indexed_nodes = modelcache.read_entry(index[name])
        nodes += indexed_nodes
        if spec is None or spec.cache is None:
            spec = indexed_spec
    if spec is None or spec.cache is None:
        return
    keep = [o["metadata"]["name"] for o in others if o["metadata"]["name"] != name]
    if await _clean(api, ns, name, spec, sorted({n for n in nodes if n}), keep) and name in index:
        await _forget(api, ns, name)


async def sweep(api: Api, namespaces: list[str]) -> None:
    """Removes the caches of the index's models that no ImageModel owns any more (deleted
    while the operator was down); `namespaces`: those served, [] for all."""
    if namespaces:
        indexes = {ns: await _index(api, ns) for ns in namespaces}
    else:
        listed = await kube.list_of(api, ConfigMap, None, fieldSelector=f"metadata.name={modelcache.INDEX}")
        indexes = {cm["metadata"]["namespace"]: dict(cm.get("data") or {}) for cm in listed.get("items", [])}
    for ns, index in indexes.items():
        if not index:
            continue
        # Listed after the index: a model in the index was already there, so it is listed too.
        live = {
            m["metadata"]["name"] for m in (await kube.list_of(api, ImageModelObject, ns)).get("items", [])
        }
        for name, spec, nodes in modelcache.orphans(index, live):
            log.info(
                "%s/%s: the model is gone; cleaning its cache on %s",
                ns,
                name,
                ", ".join(nodes) or "its volume",
            )
            if spec is None or await _clean(api, ns, name, spec, nodes, sorted(live)):
                await _forget(api, ns, name)
