"""The model cache's thin handler: applies what modelcache.py decides.

Each tick: the pre-warm DaemonSet runs on the workers' nodes while `cache.prewarm` is
set (switched off, it is parked on no node; the operator deletes nothing), and the
status's per-node cache entries follow the fetch containers of the model's pods. When an
ImageModel with a cache is deleted, Jobs delete its folder on every node that had it.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from kr8s.asyncio.objects import DaemonSet, Job
from remotegpu_base import kube
from remotegpu_base.catalog import ImageModelSpec
from remotegpu_base.kube import Api, Pod

from remotegpu_operator import deployment, modelcache

log = logging.getLogger(__name__)


async def ensure_prewarm(
    api: Api, body: dict[str, Any], spec: ImageModelSpec, worker_dep: dict[str, Any]
) -> None:
    """Creates, updates or removes the pre-warm DaemonSet."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    existing = await kube.get(api, DaemonSet, ns, modelcache.daemonset_name(name))
    want = spec.cache is not None and spec.cache.prewarm
    if not want and existing is None:
        return
    template = worker_dep["spec"]["template"]
    if spec.cache is not None:
        desired = modelcache.prewarm_daemonset(body, spec, template["spec"], template["metadata"]["labels"])
    else:
        desired = json.loads(json.dumps(existing))
        desired.pop("status", None)
    if not want:  # parked: its pods go, the DaemonSet stays until the ImageModel does
        desired["spec"]["template"]["spec"]["nodeSelector"] = dict(modelcache.PARKED)
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


async def collect_garbage(api: Api, body: dict[str, Any], others: list[dict[str, Any]]) -> None:
    """A deleted ImageModel's cache: Jobs remove its folder (`others`: the namespace's live models)."""
    try:
        spec = ImageModelSpec.model_validate(body.get("spec") or {})
    except ValueError:
        return
    if spec.cache is None:
        return
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    nodes = [
        n["node"] for n in ((body.get("status") or {}).get("cache") or {}).get("nodes") or [] if n.get("node")
    ]
    if spec.cache.node_local is not None and not nodes:
        return
    keep = [o["metadata"]["name"] for o in others if o["metadata"]["name"] != name]
    for job in modelcache.gc_jobs(ns, name, spec, nodes, keep):
        try:
            await kube.create(api, Job, job)
            log.info("%s/%s: cleaning the model cache with Job %s", ns, name, job["metadata"]["name"])
        except kube.ERRORS as e:
            if kube.status_of(e) != 409:  # already there: a Job of an earlier deletion of this name
                log.warning("%s/%s: could not create cache clean-up Job: %s", ns, name, e)
