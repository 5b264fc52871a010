"""`helm install` into the local control plane (a real API server; KWOK nodes), `helm
upgrade` keeping the generated secrets, and `helm uninstall` leaving nothing behind."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from remotegpu.catalog import ImageModelSpec, load_models_file
from tests.chart.helm import CHART
from tests.fixtures.cluster import Kube

pytestmark = pytest.mark.cluster

RELEASE = "rg"
PREFIX = f"{RELEASE}-remotegpu"
PRESETS = ["flux-1-schnell", "flux-1-kontext-dev", "flux-1-dev", "flux-2-klein-9b", "flux-2-dev"]
# The prometheus-operator kinds the chart creates, as minimal CRDs (the local cluster has
# no prometheus-operator): enough for the API server to store the chart's objects.
MONITORING_KINDS = {
    "ServiceMonitor": "servicemonitors",
    "PodMonitor": "podmonitors",
    "PrometheusRule": "prometheusrules",
}
LABELED_KINDS = (
    "deployments,statefulsets,replicasets,pods,services,secrets,configmaps,persistentvolumeclaims,"
    "serviceaccounts,roles,rolebindings,imagemodels,servicemonitors,podmonitors,prometheusrules,ingresses"
)


def minimal_crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def monitoring_crds(kube: Kube) -> Iterator[None]:
    created = []
    for kind, plural in MONITORING_KINDS.items():
        name = f"{plural}.monitoring.coreos.com"
        if kube.kubectl("get", "crd", name, check=False).returncode != 0:
            kube.kubectl("create", "-f", "-", input=json.dumps(minimal_crd(kind, plural)))
            created.append(name)
        kube.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    yield
    for name in created:
        kube.kubectl("delete", "crd", name, "--wait=false", check=False)


def wait_for(cond, timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def persistent_volume(name: str, namespace: str, claim: str) -> dict[str, Any]:
    """A pre-bound volume for one claim: the local cluster has no storage provisioner."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"remotegpu-test": namespace}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": f"/tmp/{name}"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }


def is_ready(pod: dict) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", [])
    )


def secret(kube: Kube, namespace: str, name: str, key: str) -> str:
    obj = kube.get_json("secret", name, "-n", namespace)
    return base64.b64decode(obj["data"][key]).decode()


def can_i(kube: Kube, namespace: str, sa: str, verb: str, resource: str, *extra: str) -> bool:
    out = kube.kubectl(
        "auth", "can-i", verb, resource, "-n", namespace, f"--as=system:serviceaccount:{namespace}:{sa}", *extra,
        check=False,
    )  # fmt: skip
    return out.stdout.strip() == "yes"


def leftovers(kube: Kube, namespace: str) -> list[str]:
    out = kube.kubectl(
        "get", LABELED_KINDS, "-n", namespace, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
    )
    return out.stdout.split()


@pytest.fixture
def volumes(kube: Kube, namespace: str) -> Iterator[None]:
    pvs = [
        persistent_volume(f"{namespace}-results", namespace, f"{PREFIX}-results"),
        persistent_volume(f"{namespace}-pg", namespace, f"data-{PREFIX}-postgresql-0"),
    ]
    for pv in pvs:
        kube.kubectl("create", "-f", "-", input=json.dumps(pv))
    yield
    kube.kubectl("delete", "pv", "-l", f"remotegpu-test={namespace}", "--wait=false", check=False)


def test_install_upgrade_uninstall(
    kube: Kube, namespace: str, monitoring_crds: None, volumes: None, tmp_path: Path
):
    values: dict[str, Any] = {
        "results": {"persistence": {"storageClass": "-", "size": "1Gi"}},
        "postgresql": {"persistence": {"storageClass": "-", "size": "1Gi", "whenDeleted": "Delete"}},
        "gateway": {"ingress": {"enabled": True}},
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
        },
    }
    vfile = tmp_path / "values.yaml"
    vfile.write_text(yaml.safe_dump(values))
    try:
        out = kube.helm(
            "install", RELEASE, str(CHART), "-n", namespace, "-f", str(vfile), "--wait", "--timeout", "180s"
        )
        # NOTES: how to create a key and send a first request
        assert f"kubectl exec -n {namespace} deploy/{PREFIX}-gateway -- remotegpu keys create" in out.stdout
        assert "/v1/inference/image" in out.stdout

        # Every workload is up and every pod (KWOK) Ready; the claims are bound.
        for name in (f"{PREFIX}-gateway", f"{PREFIX}-operator"):
            d = kube.get_json("deployment", name, "-n", namespace)
            assert d["status"].get("readyReplicas") == d["spec"]["replicas"] == 1, name
        sts = kube.get_json("statefulset", f"{PREFIX}-postgresql", "-n", namespace)
        assert sts["status"].get("readyReplicas") == 1
        pods = kube.get_json("pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
        components = sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods)
        assert components == ["gateway", "operator", "postgresql"]
        assert all(is_ready(p) for p in pods), [p["metadata"]["name"] for p in pods if not is_ready(p)]
        for pvc in kube.get_json("pvc", "-n", namespace)["items"]:
            assert pvc["status"]["phase"] == "Bound", pvc["metadata"]["name"]
        assert len(kube.get_json("pvc", "-n", namespace)["items"]) == 2

        # The presets passed the CRD's validation (CEL rules included) and read back as the catalog.
        catalog = {
            m.name: m.spec.model_dump(mode="json") for m in load_models_file(CHART / "files" / "models.yaml")
        }
        stored = kube.get_json("imagemodels", "-n", namespace)["items"]
        assert sorted(m["metadata"]["name"] for m in stored) == sorted(PRESETS)
        for m in stored:
            assert (
                ImageModelSpec.model_validate(m["spec"]).model_dump(mode="json")
                == catalog[m["metadata"]["name"]]
            )

        for kind, count in (
            ("servicemonitors", 2),
            ("podmonitors", 1),
            ("prometheusrules", 1),
            ("ingresses", 1),
        ):
            assert len(kube.get_json(kind, "-n", namespace)["items"]) == count, kind
        dashboards = kube.get_json("configmaps", "-n", namespace, "-l", "grafana_dashboard=1")["items"]
        assert len(dashboards) == 2

        # Least privilege, as the API server sees it.
        op = f"{PREFIX}-operator"
        assert can_i(kube, namespace, op, "watch", "imagemodels.remotegpu.ai")
        assert can_i(kube, namespace, op, "patch", "imagemodels.remotegpu.ai", "--subresource=status")
        assert can_i(kube, namespace, op, "create", "deployments.apps")
        assert can_i(kube, namespace, op, "update", f"leases.coordination.k8s.io/{op}")
        assert not can_i(kube, namespace, op, "update", "leases.coordination.k8s.io/someone-else")
        assert not can_i(kube, namespace, op, "delete", "deployments.apps")
        assert not can_i(kube, namespace, op, "get", "secrets")
        assert not can_i(kube, "default", op, "list", "imagemodels.remotegpu.ai")
        gw = f"{PREFIX}-gateway"
        assert can_i(kube, namespace, gw, "watch", "imagemodels.remotegpu.ai")
        assert not can_i(kube, namespace, gw, "patch", "imagemodels.remotegpu.ai")
        assert not can_i(kube, namespace, gw, "list", "pods")

        # Upgrade with changed presets: the generated secrets stay (lookup), the presets change.
        before = {
            "token": secret(kube, namespace, f"{PREFIX}-worker-token", "token"),
            "password": secret(kube, namespace, f"{PREFIX}-postgresql", "password"),
            "url": secret(kube, namespace, f"{PREFIX}-database", "url"),
        }
        assert before["password"] in before["url"]
        values["presets"] = {
            "flux-2-dev": {"maxReplicas": 4, "gpuCount": 2},
            "flux-1-dev": {"enabled": False},
        }
        vfile.write_text(yaml.safe_dump(values))
        kube.helm(
            "upgrade", RELEASE, str(CHART), "-n", namespace, "-f", str(vfile), "--wait", "--timeout", "180s"
        )
        after = {
            "token": secret(kube, namespace, f"{PREFIX}-worker-token", "token"),
            "password": secret(kube, namespace, f"{PREFIX}-postgresql", "password"),
            "url": secret(kube, namespace, f"{PREFIX}-database", "url"),
        }
        assert after == before
        names = sorted(m["metadata"]["name"] for m in kube.get_json("imagemodels", "-n", namespace)["items"])
        assert names == sorted(set(PRESETS) - {"flux-1-dev"})
        flux2 = kube.get_json("imagemodel", "flux-2-dev", "-n", namespace)["spec"]
        assert flux2["scaling"]["maxReplicas"] == 4 and flux2["worker"]["gpu"]["count"] == 2
    finally:
        kube.helm("uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "180s", check=False)

    # Nothing of the release is left, the database's claim included (whenDeleted: Delete).
    wait_for(lambda: not leftovers(kube, namespace), 120, "the release's objects to go", every=1)
    wait_for(lambda: not kube.get_json("pvc", "-n", namespace)["items"], 60, "the claims to go", every=1)
    assert kube.helm("status", RELEASE, "-n", namespace, check=False).returncode != 0
