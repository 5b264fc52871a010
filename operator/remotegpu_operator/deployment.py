"""ImageModel -> worker Deployment manifest, as a pure function.

The operator owns the whole pod template and the Deployment's labels, selector and
owner reference; it never owns `spec.replicas` here (the autoscaler sets that, see
handlers.py). `TEMPLATE_HASH` on the Deployment records which desired manifest it
was last written from, so a reconcile that finds the same hash changes nothing and
a spec change that touches the pod (image, parameters, GPU count, ...) rolls it.
Scaling settings and `spec.replicas` are left out of the pod on purpose: changing
how a model scales must not restart its workers.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from remotegpu_base.catalog import (
    API_GROUP,
    RESTRICTED_SECURITY_CONTEXT,
    ImageModelSpec,
    QoS,
    WorkerPod,
    owner_reference,
)
from remotegpu_base.protocol import WORKER_TOKEN_ENV

from remotegpu_operator import modelcache

WORKER_PORT = 8001
CONTAINER_NAME = "worker"
MANAGED_BY = "remotegpu-operator"
LABEL_IMAGEMODEL = f"{API_GROUP}/imagemodel"
LABEL_MODEL = f"{API_GROUP}/model"
ANNOTATION_MODEL = f"{API_GROUP}/model"
TEMPLATE_HASH = f"{API_GROUP}/template-hash"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
MODEL_SPEC_ENV = "REMOTEGPU_MODEL_SPEC"
GATEWAY_URL_ENV = "REMOTEGPU_GATEWAY_URL"
WORKER_ID_ENV = "REMOTEGPU_WORKER_ID"
# The resources whose limits equal their requests in a Guaranteed pod.
GUARANTEED_RESOURCES = ("cpu", "memory")
# A worker whose ImageModel sets no CPU or memory (Burstable: requests, no limits).
DEFAULT_REQUESTS = {"cpu": "1", "memory": "2Gi"}

_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class WorkerSettings:
    """Operator-wide settings that go into every worker pod."""

    gateway_url: str
    token_secret: str = "remotegpu-worker-token"
    token_secret_key: str = "token"


def label_value(text: str) -> str:
    """A valid label value (<= 63 chars, [A-Za-z0-9_.-], alphanumeric ends) naming `text`."""
    value = _LABEL_VALUE.sub("_", text).strip("_.-")
    if len(value) > 63:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        value = value[:54].rstrip("_.-") + "-" + digest
    return value or "x"


def deployment_name(imagemodel: str) -> str:
    return (
        f"{imagemodel}-worker" if len(imagemodel) <= 56 else f"{imagemodel[:47]}-{_short_hash(imagemodel)}-w"
    )


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:7]


def selector_labels(imagemodel: str) -> dict[str, str]:
    """The Deployment's immutable selector (and the scale subresource's)."""
    return {"app.kubernetes.io/name": "remotegpu-worker", LABEL_IMAGEMODEL: label_value(imagemodel)}


def selector_string(imagemodel: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(imagemodel).items())


def labels(imagemodel: str, spec: ImageModelSpec) -> dict[str, str]:
    return {
        **selector_labels(imagemodel),
        "app.kubernetes.io/instance": label_value(imagemodel),
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/part-of": "remotegpu",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_MODEL: label_value(spec.model),
    }


def worker_spec_json(spec: ImageModelSpec) -> str:
    """The model's catalog entry as the worker receives it (no scaling, no pin). With a
    model cache the weights are the read-only folder the cache volume mounts."""
    entry = spec.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"replicas", "scaling"})
    if spec.cache is not None:
        entry["weights"] = {**entry["weights"], "source": modelcache.WEIGHTS_MOUNT}
        entry["weights"].pop("revision", None)
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def _container(name: str, namespace: str, spec: ImageModelSpec, settings: WorkerSettings) -> dict[str, Any]:
    w = spec.worker
    command = list(w.command) if w.command else [
        "remotegpu", "worker", "--model", spec.model, "--gateway-url", settings.gateway_url,
        "--host", "0.0.0.0", "--port", str(WORKER_PORT),
    ]  # fmt: skip
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": WORKER_ID_ENV, "value": "$(POD_NAME)"},
        {"name": MODEL_SPEC_ENV, "value": worker_spec_json(spec)},
        {"name": GATEWAY_URL_ENV, "value": settings.gateway_url},
        {
            "name": WORKER_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": settings.token_secret, "key": settings.token_secret_key}},
        },
        *(modelcache.worker_env() if spec.cache is not None else []),
        *w.env,  # the model's own env comes last, so it can override ours
    ]
    mounts = list(w.volume_mounts)
    resources = container_resources(w)
    if spec.cache is not None:
        mounts += modelcache.worker_mounts(namespace, name)
        resources = modelcache.without_ephemeral_storage(resources)
    return {
        "name": CONTAINER_NAME,
        "image": w.image,
        "command": command,
        "env": env,
        "ports": [{"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"}],
        **({"volumeMounts": mounts} if mounts else {}),
        "resources": resources,
        "securityContext": _copy(
            RESTRICTED_SECURITY_CONTEXT if w.security_context is None else w.security_context
        ),
        # Ready once the weights are loaded and warmed up; alive while loading. 5 s, not
        # the default 1 s: a worker busy on the GPU may answer slowly without being stuck.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": WORKER_PORT},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": WORKER_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(obj))  # a deep copy
    return out


def container_resources(w: WorkerPod) -> dict[str, Any]:
    """The worker container's requests and limits: the catalog's, the GPU, and the QoS class.

    Guaranteed: CPU and memory limits equal the requests (a request given only as a limit
    is a request too, as Kubernetes does), so the pod is evicted and OOM-killed last.
    Without any CPU or memory: DEFAULT_REQUESTS (Burstable), never BestEffort.
    """
    resources = _copy(w.resources)
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    if not any(k in requests or k in limits for k in GUARANTEED_RESOURCES):
        # Nothing given: requests so the pod is never BestEffort (evicted first), and no
        # limit, since a guessed limit could OOM-kill a large model.
        requests.update(DEFAULT_REQUESTS)
    elif w.qos is QoS.GUARANTEED:
        for name in GUARANTEED_RESOURCES:
            value = requests.get(name, limits.get(name))
            if value is not None:
                requests[name] = limits[name] = value
    if w.gpu.count > 0:
        limits[w.gpu.resource_name] = w.gpu.count
        if w.gpu.resource_name in requests:
            requests[w.gpu.resource_name] = w.gpu.count
    return {**({"requests": requests} if requests else {}), **({"limits": limits} if limits else {})}


def pod_template(name: str, namespace: str, spec: ImageModelSpec, settings: WorkerSettings) -> dict[str, Any]:
    w = spec.worker
    container = _container(name, namespace, spec, settings)
    pod: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": w.termination_grace_period_seconds,
    }
    if spec.cache is not None:
        resources = modelcache.cpu_memory(container["resources"])
        pod["initContainers"] = [
            modelcache.fetch_container(namespace, name, spec, resources, verify=spec.cache.verify)
        ]
    if w.node_selector:
        pod["nodeSelector"] = dict(w.node_selector)
    if w.tolerations:
        pod["tolerations"] = list(w.tolerations)
    if w.volumes or spec.cache is not None:
        pod["volumes"] = list(w.volumes) + (modelcache.volumes(spec) if spec.cache is not None else [])
    if w.service_account_name:
        pod["serviceAccountName"] = w.service_account_name
    if w.affinity:
        pod["affinity"] = dict(w.affinity)
    if w.priority_class_name:
        pod["priorityClassName"] = w.priority_class_name
    if w.runtime_class_name:
        pod["runtimeClassName"] = w.runtime_class_name
    if w.image_pull_secrets:
        pod["imagePullSecrets"] = list(w.image_pull_secrets)
    return {
        "metadata": {
            "labels": labels(name, spec),
            "annotations": {**w.pod_annotations, ANNOTATION_MODEL: spec.model},
        },
        "spec": pod,
    }


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def build(body: dict[str, Any], settings: WorkerSettings, replicas: int) -> dict[str, Any]:
    """The desired worker Deployment of an ImageModel resource (`body`)."""
    name = body["metadata"]["name"]
    spec = ImageModelSpec.model_validate(body["spec"])
    template = pod_template(name, body["metadata"]["namespace"], spec, settings)
    digest = template_hash(template)
    template["metadata"]["annotations"][TEMPLATE_HASH] = digest
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name),
            "namespace": body["metadata"]["namespace"],
            "labels": labels(name, spec),
            "annotations": {TEMPLATE_HASH: digest, ANNOTATION_MODEL: spec.model},
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # Never fewer serving workers during a rollout: a new pod starts (if a GPU
            # is free) before an old one drains.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def differs(existing: dict[str, Any], desired: dict[str, Any]) -> list[str]:
    """What must be written to make `existing` match `desired` (replicas aside); [] when nothing."""
    problems = []
    em, dm = existing.get("metadata", {}), desired["metadata"]
    digest = dm["annotations"][TEMPLATE_HASH]
    tmpl_ann = existing.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
    if (em.get("annotations") or {}).get(TEMPLATE_HASH) != digest or tmpl_ann.get(TEMPLATE_HASH) != digest:
        problems.append("pod template")
    labels_now = em.get("labels") or {}
    if any(labels_now.get(k) != v for k, v in dm["labels"].items()):
        problems.append("labels")
    if (em.get("annotations") or {}).get(ANNOTATION_MODEL) != dm["annotations"][ANNOTATION_MODEL]:
        problems.append("annotations")
    want_uid = dm["ownerReferences"][0]["uid"]
    if not any(r.get("uid") == want_uid and r.get("controller") for r in em.get("ownerReferences") or []):
        problems.append("owner reference")
    if existing.get("spec", {}).get("strategy") != desired["spec"]["strategy"]:
        problems.append("strategy")
    return problems


def merged(existing: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """`existing` with everything the operator owns replaced by `desired`, for a PUT.

    Keeps the live replica count, the resourceVersion (optimistic concurrency) and
    whatever labels and annotations others put on the Deployment.
    """
    out = json.loads(json.dumps(existing))
    meta = out["metadata"]
    meta["labels"] = {**(meta.get("labels") or {}), **desired["metadata"]["labels"]}
    meta["annotations"] = {**(meta.get("annotations") or {}), **desired["metadata"]["annotations"]}
    others = [r for r in meta.get("ownerReferences") or [] if not r.get("controller")]
    meta["ownerReferences"] = desired["metadata"]["ownerReferences"] + others
    spec = out.setdefault("spec", {})
    spec["template"] = desired["spec"]["template"]
    spec["strategy"] = desired["spec"]["strategy"]
    spec["revisionHistoryLimit"] = desired["spec"]["revisionHistoryLimit"]
    out.pop("status", None)
    return out
