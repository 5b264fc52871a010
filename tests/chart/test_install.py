"""`helm install` into the local control plane (a real API server; KWOK nodes), `helm
upgrade` keeping the generated secrets, and `helm uninstall` leaving nothing behind."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from remotegpu_base.catalog import ImageModelSpec, load_models_file

from tests.chart.helm import CHART
from tests.fixtures.cluster import REPO, Kube, is_ready
from tests.fixtures.processes import stop
from tests.waiting import wait_for

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
    "serviceaccounts,roles,rolebindings,imagemodels,servicemonitors,podmonitors,prometheusrules,ingresses,"
    "poddisruptionbudgets,networkpolicies,jobs"
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
        if kube.find("crd", name) is None:
            kube.kubectl("create", "-f", "-", input=json.dumps(minimal_crd(kind, plural)))
            created.append(name)
        kube.wait_established(name)
    yield
    for name in created:
        kube.kubectl("delete", "crd", name, "--wait=false", check=False)


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


def secret(kube: Kube, namespace: str, name: str, key: str) -> str:
    obj = kube.get_json("secret", name, namespace=namespace)
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


def sa_kubeconfig(kube: Kube, namespace: str, sa: str, out: Path) -> Path:
    """A kubeconfig that acts as one of the release's ServiceAccounts (its RBAC, nothing more)."""
    token = kube.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    out.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [
                    {"name": sa, "context": {"cluster": "local", "user": sa, "namespace": namespace}}
                ],
                "current-context": sa,
            }
        )
    )
    return out


def run_operator_as_release(kube: Kube, namespace: str, tmp: Path) -> subprocess.Popen:
    """The real operator process with the installed Deployment's settings, logged in as its
    ServiceAccount (KWOK runs no containers, so the pod itself does nothing)."""
    deploy = kube.get_json("deployment", f"{PREFIX}-operator", namespace=namespace)
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REMOTEGPU_") and k != "KUBERNETES_SERVICE_HOST"
    }
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env.update(
        KUBECONFIG=str(sa_kubeconfig(kube, namespace, f"{PREFIX}-operator", tmp / "operator.kubeconfig")),
        POD_NAME="operator-0",
        POD_NAMESPACE=namespace,
        REMOTEGPU_WORKER_TOKEN=secret(kube, namespace, f"{PREFIX}-worker-token", "token"),
    )
    args = [a for a in container["args"] if not a.startswith(("--host=", "--port=", "--gateway-url="))]
    # Nothing serves the gateway here: queue reads fail and the models stay asleep.
    args += ["--host=127.0.0.1", "--port=0", "--gateway-url=http://127.0.0.1:9"]
    log = open(tmp / "operator.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "remotegpu.cli", *args],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def run_hook(
    kube: Kube, namespace: str, component: str, tmp: Path, args: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Runs one of the release's hook Jobs (`helm get hooks`; by its component label) here,
    as its own ServiceAccount with its own RBAC (KWOK runs no containers, so the Job itself
    does nothing): its RBAC objects are applied for the run and deleted after, as helm does."""
    hooks = [
        d
        for d in yaml.safe_load_all(kube.helm("get", "hooks", RELEASE, "-n", namespace).stdout)
        if d and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    rbac = json.dumps({"apiVersion": "v1", "kind": "List", "items": [h for h in hooks if h["kind"] != "Job"]})
    (job,) = [h for h in hooks if h["kind"] == "Job"]
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=rbac)
    try:
        container = job["spec"]["template"]["spec"]["containers"][0]
        sa = job["spec"]["template"]["spec"]["serviceAccountName"]
        hook_env = {
            **os.environ,
            **{e["name"]: e["value"] for e in container.get("env", [])},
            "KUBECONFIG": str(sa_kubeconfig(kube, namespace, sa, tmp / f"{sa}.kubeconfig")),
        }
        hook_env.pop("KUBERNETES_SERVICE_HOST", None)
        assert container["command"] == ["remotegpu"], container["command"]
        return subprocess.run(
            [sys.executable, "-m", "remotegpu.cli", *container["args"], *(args or [])],
            env=hook_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        kube.kubectl("delete", "-n", namespace, "-f", "-", input=rbac)


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

        # The pre-install hook generated the secrets nobody gave (run here: KWOK runs no
        # containers), as its own ServiceAccount, which may create Secrets but read none.
        token, password = f"{PREFIX}-worker-token", f"{PREFIX}-postgresql"
        ran = run_hook(kube, namespace, "secrets", tmp_path)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ran.stdout.split("\n")[:2] == [f"generated Secret {token}", f"generated Secret {password}"]
        generated = {n: secret(kube, namespace, n, k) for n, k in ((token, "token"), (password, "password"))}
        assert all(len(v) == 48 for v in generated.values()) and len(set(generated.values())) == 2
        assert not can_i(kube, namespace, f"{PREFIX}-secrets", "get", "secrets")  # its RBAC is gone again
        gw_env = {
            e["name"]: e
            for e in kube.get_json("deployment", f"{PREFIX}-gateway", namespace=namespace)["spec"][
                "template"
            ]["spec"]["containers"][0]["env"]
        }
        assert gw_env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": password, "key": "password"}

        # PodDisruptionBudgets and NetworkPolicies pass the API server's validation.
        assert sorted(p["metadata"]["name"] for p in kube.get_json("pdb", namespace=namespace)["items"]) == [
            f"{PREFIX}-{c}" for c in ("gateway", "operator", "workers")
        ]
        assert sorted(
            p["metadata"]["name"] for p in kube.get_json("networkpolicies", namespace=namespace)["items"]
        ) == [f"{PREFIX}-{c}" for c in ("postgresql", "workers")]

        # Every workload is up and every pod (KWOK) Ready; the claims are bound.
        for name in (f"{PREFIX}-gateway", f"{PREFIX}-operator"):
            d = kube.get_json("deployment", name, namespace=namespace)
            assert d["status"].get("readyReplicas") == d["spec"]["replicas"] == 1, name
        sts = kube.get_json("statefulset", f"{PREFIX}-postgresql", namespace=namespace)
        assert sts["status"].get("readyReplicas") == 1
        pods = kube.get_json("pods", namespace=namespace, selector=f"app.kubernetes.io/instance={RELEASE}")[
            "items"
        ]
        components = sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods)
        assert components == ["gateway", "operator", "postgresql"]
        assert all(is_ready(p) for p in pods), [p["metadata"]["name"] for p in pods if not is_ready(p)]
        for pvc in kube.get_json("pvc", namespace=namespace)["items"]:
            assert pvc["status"]["phase"] == "Bound", pvc["metadata"]["name"]
        assert len(kube.get_json("pvc", namespace=namespace)["items"]) == 2

        # The presets passed the CRD's validation (CEL rules included) and read back as the catalog.
        catalog = {
            m.name: m.spec.model_dump(mode="json") for m in load_models_file(CHART / "files" / "models.yaml")
        }
        stored = kube.get_json("imagemodels", namespace=namespace)["items"]
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
            assert len(kube.get_json(kind, namespace=namespace)["items"]) == count, kind
        dashboards = kube.get_json("configmaps", namespace=namespace, selector="grafana_dashboard=1")["items"]
        assert len(dashboards) == 3

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

        # Upgrade with changed presets: the pre-upgrade hook keeps the generated secrets, the presets change.
        values["presets"] = {
            "flux-2-dev": {"maxReplicas": 4, "gpuCount": 2},
            "flux-1-dev": {"enabled": False},
        }
        # ... and the images move to object storage: two gateways, rolled, without the claim.
        values["objectStorage"] = {"enabled": True, "bucket": "images", "endpoint": "http://s3.storage:8333"}
        vfile.write_text(yaml.safe_dump(values))
        kube.helm(
            "upgrade", RELEASE, str(CHART), "-n", namespace, "-f", str(vfile), "--wait", "--timeout", "180s"
        )
        # helm's --wait returns once the new ReplicaSet is ready, while an old pod may still be
        # terminating: the rollout's own status says when it has finished.
        kube.kubectl("rollout", "status", f"deployment/{PREFIX}-gateway", "-n", namespace, "--timeout=120s")
        gw = kube.get_json("deployment", f"{PREFIX}-gateway", namespace=namespace)
        assert gw["spec"]["strategy"]["type"] == "RollingUpdate"
        assert (
            gw["spec"]["replicas"] == gw["status"].get("readyReplicas") == gw["status"].get("replicas") == 2
        )
        # The results claim goes once no pod mounts it (its protection finalizer).
        wait_for(
            lambda: (
                [c["metadata"]["name"] for c in kube.get_json("pvc", namespace=namespace)["items"]]
                == [f"data-{PREFIX}-postgresql-0"]
            ),
            60,
            "the results claim to go",
        )
        ran = run_hook(kube, namespace, "secrets", tmp_path)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ran.stdout.split("\n")[:2] == [f"kept Secret {token}", f"kept Secret {password}"]
        assert {
            n: secret(kube, namespace, n, k) for n, k in ((token, "token"), (password, "password"))
        } == generated
        names = sorted(
            m["metadata"]["name"] for m in kube.get_json("imagemodels", namespace=namespace)["items"]
        )
        assert names == sorted(set(PRESETS) - {"flux-1-dev"})
        flux2 = kube.get_json("imagemodel", "flux-2-dev", namespace=namespace)["spec"]
        assert flux2["scaling"]["maxReplicas"] == 4 and flux2["worker"]["gpu"]["count"] == 2

        # The operator (as its ServiceAccount) takes the presets over: worker Deployments, status
        # (and no finalizer, so an uninstall that removes the operator first never leaves them stuck).
        operator = run_operator_as_release(kube, namespace, tmp_path)
        try:
            models = sorted(set(PRESETS) - {"flux-1-dev"})

            def reconciled() -> bool:
                assert operator.poll() is None, (tmp_path / "operator.log").read_text()[-4000:]
                items = kube.get_json("imagemodels", namespace=namespace)["items"]
                return len(items) == len(models) and all(
                    not m["metadata"].get("finalizers") and (m.get("status") or {}).get("state") == "sleeping"
                    for m in items
                )

            wait_for(reconciled, 90, "the operator to reconcile the presets", every=0.5)
            workers = kube.get_json(
                "deployments", namespace=namespace, selector="app.kubernetes.io/name=remotegpu-worker"
            )
            assert sorted(d["metadata"]["name"] for d in workers["items"]) == [f"{m}-worker" for m in models]

            # The pre-delete hook, run here as its own ServiceAccount: it deletes the presets
            # while the operator runs, and their worker Deployments go with them (owner references).
            ran = run_hook(kube, namespace, "uninstall", tmp_path, ["--timeout-seconds=60"])
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert f"deleted {len(models)} ImageModel(s)" in ran.stdout
            assert not kube.get_json("imagemodels", namespace=namespace)["items"]
            wait_for(
                lambda: not kube.get_json("deployments", namespace=namespace, selector="app.kubernetes.io/name=remotegpu-worker")["items"],
                60, "the worker Deployments to be collected", every=0.5,
            )  # fmt: skip
        finally:
            stop(operator)
    finally:
        kube.helm("uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "180s", check=False)

    # Nothing of the release is left, the database's claim included (whenDeleted: Delete).
    wait_for(lambda: not leftovers(kube, namespace), 120, "the release's objects to go", every=1)
    wait_for(lambda: not kube.get_json("pvc", namespace=namespace)["items"], 60, "the claims to go", every=1)
    assert kube.helm("status", RELEASE, "-n", namespace, check=False).returncode != 0
    # The generated secrets stay (helm.sh/resource-policy: keep): a retained database needs its password.
    kept = kube.get_json("secrets", namespace=namespace, selector=f"remotegpu.ai/release={RELEASE}")["items"]
    assert sorted(k["metadata"]["name"] for k in kept) == sorted(
        [f"{PREFIX}-worker-token", f"{PREFIX}-postgresql"]
    )
    kube.kubectl("delete", "secrets", "-n", namespace, "-l", f"remotegpu.ai/release={RELEASE}")


def test_helm_upgrade_upgrades_the_crd(kube: Kube, namespace: str, tmp_path: Path):
    """A new chart version adds a CRD field: after `helm upgrade` (and its pre-upgrade hook,
    run as its own ServiceAccount) the API server keeps the field instead of pruning it.
    The CRD gets a group of its own here, so other tests keep the real one."""
    group = f"t{uuid.uuid4().hex[:8]}.remotegpu.ai"
    crd_text = (
        (CHART / "crds" / "imagemodels.yaml").read_text().replace("group: remotegpu.ai", f"group: {group}")
    )
    crd_text = crd_text.replace("name: imagemodels.remotegpu.ai", f"name: imagemodels.{group}")
    field = re.compile(r"^ +priority: \{type: integer, default: 0,.*\n", re.M)
    assert len(field.findall(crd_text)) == 1
    charts = {}
    for version, text in (("old", field.sub("", crd_text)), ("new", crd_text)):
        charts[version] = tmp_path / version
        shutil.copytree(CHART, charts[version])
        (charts[version] / "crds" / "imagemodels.yaml").write_text(text)
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "presets": {p: {"enabled": False} for p in PRESETS},
                "results": {"persistence": {"enabled": False}},
                "postgresql": {"persistence": {"enabled": False}},
                "operator": {"cleanupOnUninstall": False},
            }
        )
    )
    crd_name = f"imagemodels.{group}"
    model = next(d for d in yaml.safe_load_all((CHART / "files" / "models.yaml").read_text()) if d)
    model["apiVersion"] = f"{group}/v1alpha1"
    model["spec"].setdefault("scaling", {})["priority"] = 7

    def create_model(name: str) -> str:
        """The API server's answer to an ImageModel that sets the new field."""
        model["metadata"] = {"name": name, "namespace": namespace}
        out = kube.kubectl("create", "-f", "-", input=json.dumps(model), check=False)
        if out.returncode:
            return out.stderr
        # kubectl, not Kube.get_json: kr8s (0.20) resolves a group-qualified kind that its
        # discovery cache predates without the group, which is the real CRD's here.
        got = json.loads(kube.kubectl("get", crd_name, name, "-n", namespace, "-o", "json").stdout)
        return f"priority {got['spec']['scaling']['priority']}"

    unknown = 'unknown field "spec.scaling.priority"'

    try:
        kube.helm("install", RELEASE, str(charts["old"]), "-n", namespace, "-f", str(values))
        assert unknown in create_model("before")
        kube.helm("upgrade", RELEASE, str(charts["new"]), "-n", namespace, "-f", str(values))
        # helm itself left the CRD as it was (crds/ is installed once) ...
        assert unknown in create_model("helm-alone")
        # ... its pre-upgrade hook replaces it, and may touch no other CRD.
        hook_sa = f"system:serviceaccount:{namespace}:{PREFIX}-crd-upgrade"
        ran = run_hook(kube, namespace, "crd-upgrade", tmp_path)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert f"updated CustomResourceDefinition {crd_name}" in ran.stdout
        # The API server takes a replaced CRD's schema in a moment after the update returns.
        tries = itertools.count()
        wait_for(
            lambda: create_model(f"after-{next(tries)}") == "priority 7", 30, "the new field to be served"
        )
        assert kube.kubectl(
            "auth", "can-i", "update", "customresourcedefinitions/imagemodels.remotegpu.ai", f"--as={hook_sa}",
            check=False,
        ).stdout.strip() == "no"  # fmt: skip
        hooks = kube.helm("get", "hooks", RELEASE, "-n", namespace).stdout
        assert "helm.sh/hook: pre-upgrade" in hooks and f"resourceNames: [{crd_name}]" in hooks
    finally:
        kube.helm("uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "120s", check=False)
        kube.kubectl("delete", "crd", crd_name, "--wait=false", check=False)
