"""The model cache, as pure functions: the pod parts, the pre-warm DaemonSet, the
per-node status and the clean-up Jobs of an ImageModel with `spec.cache`.

Which caches exist is also kept apart from the ImageModels, in a ConfigMap per namespace
(`remotegpu-model-caches`: one entry per model, its spec and the nodes that fetched), so
the caches of a model deleted while the operator was down are still found and removed.

Layout on the cache volume (a node's hostPath or a ReadWriteMany claim):
`<namespace>/<imagemodel>/weights` (the fetched weights, with their manifest) and
`<namespace>/<imagemodel>/compiled` (torch.compile / Inductor artifacts). A worker pod's
init container (`remotegpu cache fetch`) makes `weights` complete, waiting on a lock
while another pod on the node fetches; the worker container mounts it read-only.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from remotegpu_base.catalog import (
    API_GROUP,
    RESTRICTED_SECURITY_CONTEXT,
    CacheVerify,
    ImageModelSpec,
    owner_reference,
)

FETCH_CONTAINER = "fetch-weights"
CACHE_VOLUME = "model-cache"
SOURCE_VOLUME = "weights-source"
RECORD_VOLUME = "fetch-record"
CACHE_MOUNT = "/cache"  # the fetcher's (read-write) view of the cache volume
SOURCE_MOUNT = "/source"
RECORD_DIR = "/var/run/remotegpu"
RECORD_FILE = f"{RECORD_DIR}/fetch.json"
WEIGHTS_MOUNT = "/weights"  # the worker's read-only view of its model's weights
COMPILED_MOUNT = "/compile-cache"  # the worker's compiled-artifact cache (read-write)
FETCH_RECORD_ENV = "REMOTEGPU_FETCH_RECORD"
COMPILE_CACHE_ENV = "REMOTEGPU_COMPILE_CACHE_DIR"  # remotegpu_worker.engine.optimize
LABEL_CACHE = f"{API_GROUP}/model-cache"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
INDEX = "remotegpu-model-caches"  # the ConfigMap of the namespace's model caches
# The pre-warm pods only hold their node's place once the fetch is done.
HOLD_RESOURCES = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "10m", "memory": "32Mi"}}


def model_folder(namespace: str, imagemodel: str) -> str:
    """The model's folder on the cache volume (relative)."""
    return f"{namespace}/{imagemodel}"


def _copy(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def volumes(spec: ImageModelSpec) -> list[dict[str, Any]]:
    cache = spec.cache
    assert cache is not None
    out: list[dict[str, Any]] = [{"name": RECORD_VOLUME, "emptyDir": {"sizeLimit": "1Mi"}}]
    if cache.node_local is not None:
        out.append(
            {"name": CACHE_VOLUME, "hostPath": {"path": cache.node_local.path, "type": "DirectoryOrCreate"}}
        )
    else:
        assert cache.pvc is not None
        out.append({"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache.pvc.claim_name}})
    source = spec.cache_source()
    assert source is not None
    if source.pvc is not None:
        claim = {"claimName": source.pvc.claim_name, "readOnly": True}
        out.append({"name": SOURCE_VOLUME, "persistentVolumeClaim": claim})
    elif source.host_path is not None:
        out.append({"name": SOURCE_VOLUME, "hostPath": {"path": source.host_path.path, "type": "Directory"}})
    return out


def fetch_container(
    namespace: str, imagemodel: str, spec: ImageModelSpec, resources: dict[str, Any], *, verify: CacheVerify
) -> dict[str, Any]:
    """The init container that makes the model's weights folder complete (or waits for the pod that does)."""
    source = spec.cache_source()
    assert source is not None
    folder = f"{CACHE_MOUNT}/{model_folder(namespace, imagemodel)}"
    # --make-dir: the worker's compile cache, made by the fetcher's user (uid 10001), not
    # by the kubelet for the subPath mount (root's, where the worker could not write).
    command = [
        "remotegpu",
        "cache",
        "fetch",
        "--dest",
        f"{folder}/weights",
        "--make-dir",
        f"{folder}/compiled",
    ]
    env: list[dict[str, Any]] = [
        {"name": "HF_HUB_OFFLINE", "value": "0"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "HF_HOME", "value": f"{RECORD_DIR}/hf"},  # the client's own small files; not the weights
    ]
    mounts: list[dict[str, Any]] = [
        {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT},
        {"name": RECORD_VOLUME, "mountPath": RECORD_DIR},
    ]
    if source.hugging_face is not None:
        hf = source.hugging_face
        command += ["--hf-repo", hf.repo, *(["--revision", hf.revision] if hf.revision else [])]
        if hf.endpoint:
            env.append({"name": "HF_ENDPOINT", "value": hf.endpoint})
        if hf.token_secret is not None:
            ref = {"name": hf.token_secret.name, "key": hf.token_secret.key}
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    elif source.s3 is not None:
        s3 = source.s3
        command += ["--s3-bucket", s3.bucket, "--s3-prefix", s3.key_prefix]
        command += [*(["--s3-endpoint", s3.endpoint] if s3.endpoint else [])]
        command += [*(["--s3-region", s3.region] if s3.region else [])]
        if s3.credentials_secret is not None:
            secret = s3.credentials_secret
            for var, key in (
                ("AWS_ACCESS_KEY_ID", secret.access_key_id_key),
                ("AWS_SECRET_ACCESS_KEY", secret.secret_access_key_key),
            ):
                env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
    else:
        sub = source.pvc.path if source.pvc is not None else ""
        command += ["--from-dir", f"{SOURCE_MOUNT}/{sub}".rstrip("/")]
        mounts.append({"name": SOURCE_VOLUME, "mountPath": SOURCE_MOUNT, "readOnly": True})
    command += [
        "--verify",
        verify.value.lower(),
        "--record",
        RECORD_FILE,
        "--termination-log",
        "/dev/termination-log",
    ]
    w = spec.worker
    return {
        "name": FETCH_CONTAINER,
        "image": w.image,
        "command": command,
        "env": env,
        "volumeMounts": mounts,
        # The pod's QoS counts init containers too: the worker's CPU and memory keep it Guaranteed.
        "resources": _copy(resources),
        "securityContext": _copy(
            RESTRICTED_SECURITY_CONTEXT if w.security_context is None else w.security_context
        ),
    }


def worker_mounts(namespace: str, imagemodel: str) -> list[dict[str, Any]]:
    folder = model_folder(namespace, imagemodel)
    return [
        {"name": CACHE_VOLUME, "mountPath": WEIGHTS_MOUNT, "subPath": f"{folder}/weights", "readOnly": True},
        {"name": CACHE_VOLUME, "mountPath": COMPILED_MOUNT, "subPath": f"{folder}/compiled"},
        {"name": RECORD_VOLUME, "mountPath": RECORD_DIR, "readOnly": True},
    ]


def worker_env() -> list[dict[str, Any]]:
    return [
        {"name": FETCH_RECORD_ENV, "value": RECORD_FILE},
        {"name": COMPILE_CACHE_ENV, "value": COMPILED_MOUNT},
        {"name": "HF_HUB_OFFLINE", "value": "1"},  # the weights are local: never download in the worker
    ]


def without_ephemeral_storage(resources: dict[str, Any]) -> dict[str, Any]:
    """The weights live on the cache volume, not in the container's writable layer."""
    out = _copy(resources)
    for part in ("requests", "limits"):
        if part in out:
            out[part].pop("ephemeral-storage", None)
            if not out[part]:
                del out[part]
    return out


def cpu_memory(resources: dict[str, Any]) -> dict[str, Any]:
    """Only the CPU and memory of a container's resources (an init container needs no GPU)."""
    out: dict[str, Any] = {}
    for part in ("requests", "limits"):
        kept = {k: v for k, v in (resources.get(part) or {}).items() if k in ("cpu", "memory")}
        if kept:
            out[part] = kept
    return out


def daemonset_name(imagemodel: str) -> str:
    return f"{imagemodel}-cache" if len(imagemodel) <= 57 else f"{imagemodel[:48]}-{_short(imagemodel)}-c"


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:7]


def prewarm_daemonset(
    body: dict[str, Any], spec: ImageModelSpec, pod_spec: dict[str, Any], labels: dict[str, str]
) -> dict[str, Any]:
    """One pod per node the workers may use: the fetch (checked in full), then it holds still.

    `pod_spec` is the worker pod's spec: its placement (node selector, affinity,
    tolerations, priority, runtime class, pull secrets) and volumes are reused.
    """
    name = body["metadata"]["name"]
    fetch = next(c for c in pod_spec["initContainers"] if c["name"] == FETCH_CONTAINER)
    fetch = _copy(fetch)
    fetch["command"][fetch["command"].index("--verify") + 1] = "full"
    fetch["resources"] = _copy(HOLD_RESOURCES)
    pod = {
        k: _copy(v)
        for k, v in pod_spec.items()
        if k
        in (
            "nodeSelector",
            "affinity",
            "tolerations",
            "priorityClassName",
            "runtimeClassName",
            "imagePullSecrets",
        )
    }
    if spec.worker.gpu.count > 0 and not ("nodeSelector" in pod or "affinity" in pod):
        # The workers go wherever their GPU resource is, which a pod that holds no GPU
        # cannot ask for: the nodes GPU Feature Discovery labels with their GPU product.
        term = {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "Exists"}]}
        pod["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
        }
    pod["volumes"] = [
        v for v in pod_spec["volumes"] if v["name"] in (CACHE_VOLUME, SOURCE_VOLUME, RECORD_VOLUME)
    ]
    pod["initContainers"] = [fetch]
    pod["containers"] = [
        {
            "name": "hold",
            "image": spec.worker.image,
            "command": ["sleep", "infinity"],
            "resources": _copy(HOLD_RESOURCES),
            "securityContext": _copy(fetch["securityContext"]),
        }
    ]
    pod["terminationGracePeriodSeconds"] = 0
    selector = {
        "app.kubernetes.io/name": "remotegpu-model-cache",
        LABEL_CACHE: labels[f"{API_GROUP}/imagemodel"],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": daemonset_name(name),
            "namespace": body["metadata"]["namespace"],
            "labels": {**selector, "app.kubernetes.io/part-of": "remotegpu"},
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "100%"}},
            "template": {"metadata": {"labels": selector}, "spec": pod},
        },
    }


def node_status(
    pods: list[dict[str, Any]], previous: list[dict[str, Any]] | None, now: datetime
) -> list[dict[str, Any]]:
    """The cache on each node, from the fetch containers of the pods there (kept for nodes
    whose pods are gone): ready, size and when it was fetched, or why not."""
    nodes = {n["node"]: dict(n) for n in previous or [] if n.get("node")}
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        node = pod.get("spec", {}).get("nodeName")
        if not node:
            continue
        for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if cs.get("name") != FETCH_CONTAINER:
                continue
            entry = nodes.setdefault(node, {"node": node, "ready": False})
            state = cs.get("state") or {}
            done = state.get("terminated")
            if done is None:
                if not entry.get("ready"):
                    entry["message"] = "fetching" if "running" in state else "waiting to fetch"
                continue
            try:
                result = json.loads(done.get("message") or "{}")
            except ValueError:
                result = {}
            if done.get("exitCode") == 0:
                entry.update(
                    ready=True,
                    sizeBytes=int(result.get("sizeBytes") or 0),
                    fetchedAt=result.get("fetchedAt") or entry.get("fetchedAt"),
                )
                entry.pop("message", None)
            else:
                entry.update(
                    ready=False, message=str(result.get("message") or done.get("reason") or "fetch failed")
                )
    return [nodes[n] for n in sorted(nodes)]


def gc_jobs(
    namespace: str, imagemodel: str, spec: ImageModelSpec, nodes: list[str], keep: list[str]
) -> list[dict[str, Any]]:
    """Jobs that delete a deleted model's cache folder: one per node for a node-local cache
    (pinned with nodeName), one for a shared claim. `keep`: the namespace's other models."""
    cache = spec.cache
    assert cache is not None
    volume = (
        {"name": CACHE_VOLUME, "hostPath": {"path": cache.node_local.path, "type": "DirectoryOrCreate"}}
        if cache.node_local is not None
        else {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache.pvc.claim_name}}  # type: ignore[union-attr]
    )
    targets: list[str | None] = list(nodes) if cache.node_local is not None else [None]
    jobs = []
    for node in targets:
        suffix = _short(f"{imagemodel}/{node or ''}")
        pod: dict[str, Any] = {
            "restartPolicy": "OnFailure",
            "volumes": [volume],
            "containers": [
                {
                    "name": "gc",
                    "image": spec.worker.image,
                    "command": [
                        "remotegpu",
                        "cache",
                        "gc",
                        "--root",
                        f"{CACHE_MOUNT}/{namespace}",
                        "--keep",
                        ",".join(sorted(keep)),
                    ],  # fmt: skip
                    "volumeMounts": [{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT}],
                    "resources": _copy(HOLD_RESOURCES),
                    "securityContext": _copy(
                        RESTRICTED_SECURITY_CONTEXT
                        if spec.worker.security_context is None
                        else spec.worker.security_context
                    ),
                }
            ],
            "tolerations": [{"operator": "Exists"}],  # wherever the cache is, tainted or not
        }
        if node is not None:
            pod["nodeName"] = node
        if spec.worker.image_pull_secrets:
            pod["imagePullSecrets"] = _copy(spec.worker.image_pull_secrets)
        jobs.append(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "name": f"{imagemodel[:40]}-cache-gc-{suffix}",
                    "namespace": namespace,
                    "labels": {
                        "app.kubernetes.io/name": "remotegpu-model-cache-gc",
                        LABEL_CACHE: imagemodel[:63],
                    },
                },
                "spec": {"backoffLimit": 3, "ttlSecondsAfterFinished": 600, "template": {"spec": pod}},
            }
        )
    return jobs


def index_entry(body: dict[str, Any], nodes: list[dict[str, Any]], known: str | None) -> str:
    """A model's entry in the cache index: its uid, spec and every node it was fetched on
    (`known`: the entry as written before; no node is ever dropped from it)."""
    before = json.loads(known) if known else {}
    if before.get("uid") != body["metadata"]["uid"]:
        before = {}
    names = {n["node"] for n in nodes if n.get("node")} | set(before.get("nodes") or [])
    entry = {"uid": body["metadata"]["uid"], "spec": body.get("spec") or {}, "nodes": sorted(names)}
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def index_configmap(namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": INDEX,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": INDEX, "app.kubernetes.io/part-of": "remotegpu"},
        },
        "data": data,
    }


def read_entry(text: str) -> tuple[ImageModelSpec | None, list[str]]:
    """An index entry's spec and nodes; (None, []) for an entry that no longer parses."""
    try:
        entry = json.loads(text)
        spec = ImageModelSpec.model_validate(entry.get("spec") or {})
    except ValueError:
        return None, []
    return spec, [str(n) for n in entry.get("nodes") or []]


def orphans(index: dict[str, str], live: set[str]) -> list[tuple[str, ImageModelSpec | None, list[str]]]:
    """The index's caches that no ImageModel owns: (name, spec, nodes), for gc_jobs. An
    entry that no longer parses is an orphan with nothing to clean (it is dropped)."""
    return [(name, *read_entry(text)) for name, text in sorted(index.items()) if name not in live]
