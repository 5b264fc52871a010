"""The chart without a cluster: lint, rendering with varied values, the schema, and the
contracts it shares with the rest of the repository (CRD, catalog, operator RBAC)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import yaml
from remotegpu_base.catalog import ImageModelSpec, load_models_file

from cluster.localcluster import pinned
from tests.chart.helm import (
    CHART,
    REPO,
    dashboards,
    find,
    one,
    render,
    run_helm,
    template,
)

PRESETS = ["flux-1-schnell", "flux-1-kontext-dev", "flux-1-dev", "flux-2-klein-9b", "flux-2-dev"]
MONITORING_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "additionalAlertLabels": {"team": "imaging"}},
    }
}


def secret_value(obj: dict, key: str) -> str:
    return base64.b64decode(obj["data"][key]).decode()


def env_of(deploy: dict) -> dict[str, dict]:
    return {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}


# ---- lint and the files shared with the repository -------------------------------------


@pytest.mark.parametrize("values", [{}, MONITORING_ON, {"gateway": {"ingress": {"enabled": True}}}])
def test_helm_lint_strict(values, tmp_path: Path):
    args = ["lint", str(CHART), "--strict"]
    if values:
        (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
        args += ["-f", str(tmp_path / "v.yaml")]
    out = run_helm(*args)
    assert "0 chart(s) failed" in out.stdout


def test_helm_is_built_like_a_release_so_plain_template_works(tmp_path: Path):
    """cluster/build.sh builds helm with its release ldflags: it knows its version and
    assumes a current Kubernetes, so the chart's `kubeVersion: >=1.30` passes without
    `--kube-version` (a bare `go install` build assumes v1.20 and fails it)."""
    assert run_helm("version", "--template", "{{.Version}}").stdout == pinned("HELM")
    out = run_helm("template", "demo", str(CHART), "--show-only", "templates/gateway-service.yaml")
    assert "kind: Service" in out.stdout
    caps = tmp_path / "caps"
    shutil.copytree(CHART, caps)
    (caps / "templates" / "zz-caps.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: caps}\n"
        "data: {kube: {{ .Capabilities.KubeVersion.Version | quote }}}\n"
    )
    kube = yaml.safe_load(
        run_helm("template", "demo", str(caps), "--show-only", "templates/zz-caps.yaml").stdout
    )
    minor = int(kube["data"]["kube"].split(".")[1])
    assert minor >= int(pinned("KUBE").split(".")[1]), kube


def test_chart_crd_is_the_repository_crd():
    assert (CHART / "crds" / "imagemodels.yaml").read_bytes() == (
        REPO / "crds" / "imagemodels.yaml"
    ).read_bytes()


def test_chart_catalog_is_the_repository_catalog():
    """The presets are rendered from files/models.yaml: the very file the embedded default serves."""
    assert (CHART / "files" / "models.yaml").read_bytes() == (
        REPO / "base" / "remotegpu_base" / "models.yaml"
    ).read_bytes()


def test_values_schema_is_valid_json_and_closed():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False

    def closed(node: dict, path: str) -> None:
        props = node.get("properties")
        if props is not None and node.get("type") == "object":
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for k, v in props.items():
                closed(v, f"{path}.{k}")
        if isinstance(node.get("items"), dict):
            closed(node["items"], f"{path}[]")

    closed(schema, "values")


def test_every_value_is_documented():
    """helm-docs style: each leaf key in values.yaml has a `# --` comment above it (or above its parent)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        # documented if the previous non-blank line is a `# --` comment at the same indent,
        # or an ancestor key (lower indent) is documented that way
        j, doc_found = i - 1, False
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        if j >= 0 and lines[j].strip().startswith("# --"):
            doc_found = True
        if not doc_found:
            value = stripped.split(":", 1)[1].strip()
            if value == "":  # a section: its keys carry the docs
                continue
            # a leaf inside a documented parent map (e.g. resources.requests.cpu)
            k = i - 1
            while k >= 0:
                prev = lines[k]
                if prev.strip() and not prev.strip().startswith("#"):
                    pind = len(prev) - len(prev.lstrip())
                    if pind < indent:
                        kk = k - 1
                        while (
                            kk >= 0
                            and lines[kk].strip().startswith("#")
                            and not lines[kk].strip().startswith("# --")
                        ):
                            kk -= 1
                        if kk >= 0 and lines[kk].strip().startswith("# --"):
                            doc_found = True
                            break
                        indent = pind
                        if pind == 0:
                            break
                k -= 1
        if not doc_found:
            undocumented.append(f"{i + 1}: {stripped}")
    assert not undocumented, "values without a `# --` description:\n" + "\n".join(undocumented)


# ---- default rendering -----------------------------------------------------------------


def test_defaults_render_every_component(tmp_path: Path):
    objs = render()
    kinds = sorted({o["kind"] for o in objs})
    assert kinds == sorted(
        ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "ImageModel", "Job", "NetworkPolicy",
         "PersistentVolumeClaim",
         "PodDisruptionBudget", "Role", "RoleBinding", "Service", "ServiceAccount", "StatefulSet"]
    )  # fmt: skip
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for want in [
        ("Deployment", "remotegpu-gateway"), ("Deployment", "remotegpu-operator"),
        ("Service", "remotegpu-gateway"), ("Service", "remotegpu-operator-metrics"),
        ("Service", "remotegpu-postgresql"), ("StatefulSet", "remotegpu-postgresql"),
        ("Job", "remotegpu-secrets"), ("PodDisruptionBudget", "remotegpu-gateway"),
        ("PodDisruptionBudget", "remotegpu-operator"), ("PodDisruptionBudget", "remotegpu-workers"),
        ("NetworkPolicy", "remotegpu-workers"), ("NetworkPolicy", "remotegpu-postgresql"),
        ("PersistentVolumeClaim", "remotegpu-results"),
        ("ServiceAccount", "remotegpu-gateway"), ("ServiceAccount", "remotegpu-operator"),
        ("Role", "remotegpu-operator"), ("Role", "remotegpu-operator-leader-election"), ("Role", "remotegpu-gateway"),
    ]:  # fmt: skip
        assert want in names, want
    assert not find(objs, "Ingress")
    for o in objs:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "imaging", o["metadata"]["name"]
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "remotegpu"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "remotegpu"
        assert labels["helm.sh/chart"] == "remotegpu-0.1.0"


def test_disruption_budgets(tmp_path: Path):
    """A drain takes one pod of each component at a time; the workers' budget selects the
    pods the operator creates, whatever their model (labels from deployment.py)."""
    from remotegpu_operator import deployment

    objs = render()
    for name in ("gateway", "operator"):
        pdb = one(objs, "PodDisruptionBudget", f"remotegpu-{name}")["spec"]
        assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        pods = one(objs, "Deployment", f"remotegpu-{name}")["spec"]["template"]["metadata"]["labels"]
        assert pdb["selector"]["matchLabels"].items() <= pods.items()
    workers = one(objs, "PodDisruptionBudget", "remotegpu-workers")["spec"]
    spec = load_models_file(CHART / "files" / "models.yaml")[0].spec
    worker_pod = deployment.pod_template(
        "flux-1-dev", "imaging", spec, deployment.WorkerSettings(gateway_url="http://gw")
    )
    assert workers["selector"]["matchLabels"].items() <= worker_pod["metadata"]["labels"].items()
    # A busy worker evicted by the drain gets time to finish its job.
    assert worker_pod["spec"]["terminationGracePeriodSeconds"] >= 300

    objs = render({"podDisruptionBudgets": {"workers": {"maxUnavailable": "25%"}}}, tmp_path)
    assert one(objs, "PodDisruptionBudget", "remotegpu-workers")["spec"]["maxUnavailable"] == "25%"
    assert not find(render({"podDisruptionBudgets": {"enabled": False}}, tmp_path), "PodDisruptionBudget")


def test_network_policies(tmp_path: Path):
    from remotegpu_operator import deployment

    objs = render()
    gateway_pods = one(objs, "Deployment", "remotegpu-gateway")["spec"]["template"]["metadata"]["labels"]
    workers = one(objs, "NetworkPolicy", "remotegpu-workers")["spec"]
    spec = load_models_file(CHART / "files" / "models.yaml")[0].spec
    worker_pod = deployment.pod_template(
        "m", "imaging", spec, deployment.WorkerSettings(gateway_url="http://gw")
    )
    assert workers["podSelector"]["matchLabels"].items() <= worker_pod["metadata"]["labels"].items()
    assert workers["policyTypes"] == ["Ingress", "Egress"]
    to_gateway, dns, model_source = workers["egress"]
    assert to_gateway["to"][0]["podSelector"]["matchLabels"].items() <= gateway_pods.items()
    assert to_gateway["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    assert model_source["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert "10.0.0.0/8" in model_source["to"][0]["ipBlock"]["except"]  # not the cluster's own services
    assert workers["ingress"] == [{"ports": [{"port": 8001, "protocol": "TCP"}]}]
    pg = one(objs, "NetworkPolicy", "remotegpu-postgresql")["spec"]
    assert pg["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() <= gateway_pods.items()
    assert pg["ingress"][0]["ports"] == [{"port": 5432, "protocol": "TCP"}] and pg["egress"] == []

    mirror = [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "hf-mirror"}}}]}]
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    objs = render(
        {
            "networkPolicy": {"workerModelSourceEgress": mirror, "metricsFrom": monitoring},
            "postgresql": {"enabled": False},
            "database": {"url": "postgresql://a:b@db/x"},
        },
        tmp_path,
    )
    workers = one(objs, "NetworkPolicy", "remotegpu-workers")["spec"]
    assert workers["egress"][2:] == mirror and workers["ingress"][0]["from"] == monitoring
    assert not find(objs, "NetworkPolicy", "remotegpu-postgresql")
    assert not find(render({"networkPolicy": {"enabled": False}}, tmp_path), "NetworkPolicy")


def test_crd_upgrade_hook(tmp_path: Path):
    """The pre-upgrade hook carries the chart's very CRD and may update that one only
    (an upgrade adding a field, against the API server: test_install.py)."""
    objs = render()
    job = one(objs, "Job", "remotegpu-crd-upgrade")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade"
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["CRD"]) == yaml.safe_load((CHART / "crds" / "imagemodels.yaml").read_text())
    (role,) = find(objs, "ClusterRole")
    assert role["metadata"]["name"] == "remotegpu-crd-upgrade-imaging"  # cluster-wide: one per namespace
    assert role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "resourceNames": ["imagemodels.remotegpu.ai"],
            "verbs": ["get", "update"],
        }
    ]
    off = render({"crds": {"upgrade": False}}, tmp_path)
    assert not find(off, "ClusterRole") and not find(off, "Job", "remotegpu-crd-upgrade")


def test_hook_jobs_run_where_the_operator_runs(tmp_path: Path):
    """A hook Job that lands on a node it cannot run on blocks install, upgrade or uninstall."""
    place = {"nodeSelector": {"pool": "system"}, "tolerations": [{"key": "system", "operator": "Exists"}]}
    objs = render({"operator": place}, tmp_path)
    jobs = find(objs, "Job")
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        "remotegpu-crd-upgrade", "remotegpu-secrets", "remotegpu-uninstall"
    ]  # fmt: skip
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert {k: pod.get(k) for k in place} == place, job["metadata"]["name"]


def test_priority_class_and_probe_timeouts(tmp_path: Path):
    objs = render({"priorityClassName": "remotegpu-critical"}, tmp_path)
    pods = [o["spec"]["template"]["spec"] for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert len(pods) == 6 and all(p["priorityClassName"] == "remotegpu-critical" for p in pods)
    assert all(
        "priorityClassName" not in o.get("spec", {}).get("template", {}).get("spec", {}) for o in render()
    )
    for o in objs:
        for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in c:
                    assert c[probe].get("timeoutSeconds", 1) >= 5, (o["metadata"]["name"], probe)


def test_release_name_prefixes_every_object():
    objs = render(release="imgs")
    for o in objs:
        if o["kind"] != "ImageModel":  # presets keep the catalog's resource names
            assert o["metadata"]["name"].startswith("imgs-remotegpu"), o["metadata"]["name"]


def test_gateway_wiring():
    objs = render()
    gw = one(objs, "Deployment", "remotegpu-gateway")
    pod = gw["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "ghcr.io/remotegpu/remotegpu:0.1.0"
    assert c["args"][:2] == ["gateway", "--host=0.0.0.0"] and "--namespace=imaging" in c["args"]
    env = env_of(gw)
    assert env["REMOTEGPU_DATABASE_URL"]["value"].startswith("postgresql://remotegpu@remotegpu-postgresql.")
    assert env["REMOTEGPU_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "remotegpu-worker-token",
        "key": "token",
    }
    assert env["REMOTEGPU_RESULTS_DIR"]["value"] == "/data/results"
    assert "REMOTEGPU_PUBLIC_URL" not in env
    assert "REMOTEGPU_CORS_ORIGINS" not in env  # CORS off by default
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "remotegpu-results"
    assert gw["spec"]["strategy"]["type"] == "Recreate"  # a ReadWriteOnce volume
    assert pod["serviceAccountName"] == "remotegpu-gateway"
    probes = {k: c[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe")}
    assert probes == {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    svc = one(objs, "Service", "remotegpu-gateway")
    assert svc["spec"]["selector"] == gw["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == 8000
    role = one(objs, "Role", "remotegpu-gateway")
    assert role["rules"] == [
        {"apiGroups": ["remotegpu.ai"], "resources": ["imagemodels"], "verbs": ["get", "list", "watch"]}
    ]


def test_cors_origins_reach_the_gateway(tmp_path: Path):
    objs = render(
        {"gateway": {"corsOrigins": ["https://app.example.com", "http://localhost:5173"]}}, tmp_path
    )
    env = env_of(one(objs, "Deployment", "remotegpu-gateway"))
    assert env["REMOTEGPU_CORS_ORIGINS"]["value"] == "https://app.example.com,http://localhost:5173"


def test_webhook_allowed_networks_reach_the_gateway(tmp_path: Path):
    assert "REMOTEGPU_WEBHOOK_ALLOWED_NETWORKS" not in env_of(
        one(render(), "Deployment", "remotegpu-gateway")
    )
    objs = render({"gateway": {"webhookAllowedNetworks": ["10.20.0.0/16", "fd00::/8"]}}, tmp_path)
    env = env_of(one(objs, "Deployment", "remotegpu-gateway"))
    assert env["REMOTEGPU_WEBHOOK_ALLOWED_NETWORKS"]["value"] == "10.20.0.0/16,fd00::/8"


def test_operator_wiring():
    objs = render()
    op = one(objs, "Deployment", "remotegpu-operator")
    c = op["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][0] == "operator"
    assert "--namespace=imaging" in c["args"]
    assert "--gateway-url=http://remotegpu-gateway.imaging.svc:8000" in c["args"]
    env = env_of(op)
    assert env["REMOTEGPU_WORKER_TOKEN_SECRET"]["value"] == "remotegpu-worker-token"
    assert env["REMOTEGPU_WORKER_TOKEN_SECRET_KEY"]["value"] == "token"
    assert env["REMOTEGPU_WORKER_GATEWAY_URL"]["value"] == "http://remotegpu-gateway.imaging.svc:8000"
    assert env["REMOTEGPU_OPERATOR_LEASE_NAME"]["value"] == "remotegpu-operator"
    assert env["REMOTEGPU_OPERATOR_LEADER_ELECT"]["value"] == "true"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert op["spec"]["template"]["spec"]["serviceAccountName"] == "remotegpu-operator"
    metrics = one(objs, "Service", "remotegpu-operator-metrics")
    assert metrics["spec"]["selector"] == op["spec"]["selector"]["matchLabels"]
    # the two Deployments' selectors must not overlap
    gw = one(objs, "Deployment", "remotegpu-gateway")
    assert gw["spec"]["selector"]["matchLabels"] != op["spec"]["selector"]["matchLabels"]


def _rules(rules: list[dict]) -> list[tuple]:
    return sorted(
        (tuple(r.get("apiGroups", [])), tuple(r.get("resources", [])), tuple(r.get("resourceNames", [])),
         tuple(sorted(r.get("verbs", []))))
        for r in rules
    )  # fmt: skip


def test_operator_rbac_equals_operator_rbac_yaml():
    """The chart grants the operator exactly the rules its cluster tests run under."""
    source = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((REPO / "operator" / "rbac.yaml").read_text())
        if d
    }
    objs = render()
    assert _rules(one(objs, "Role", "remotegpu-operator")["rules"]) == _rules(
        source["remotegpu-operator"]["rules"]
    )
    assert _rules(one(objs, "Role", "remotegpu-operator-leader-election")["rules"]) == _rules(
        source["remotegpu-operator-leader-election"]["rules"]
    )
    for name in ("remotegpu-operator", "remotegpu-operator-leader-election"):
        rb = one(objs, "RoleBinding", name)
        assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert rb["subjects"] == [
            {"kind": "ServiceAccount", "name": "remotegpu-operator", "namespace": "imaging"}
        ]
    # No cluster-wide grants but the CRD upgrade hook's on that one CRD (test_crd_upgrade_hook).
    assert [o["metadata"]["name"] for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")] == [
        "remotegpu-crd-upgrade-imaging"
    ] * 2


def test_several_operators_need_leader_election(tmp_path: Path):
    out = template({"operator": {"replicaCount": 2, "leaderElection": False}}, tmp_path, check=False)
    assert out.returncode != 0 and "needs operator.leaderElection=true" in out.stderr
    op = one(render({"operator": {"replicaCount": 2}}, tmp_path), "Deployment", "remotegpu-operator")
    assert op["spec"]["replicas"] == 2


def test_leader_election_off_drops_its_role(tmp_path: Path):
    objs = render({"operator": {"leaderElection": False}}, tmp_path)
    assert not find(objs, "Role", "remotegpu-operator-leader-election")
    assert (
        env_of(one(objs, "Deployment", "remotegpu-operator"))["REMOTEGPU_OPERATOR_LEADER_ELECT"]["value"]
        == "false"
    )


# ---- presets ---------------------------------------------------------------------------


def _catalog_specs() -> dict[str, dict]:
    return {m.name: m.spec.model_dump(mode="json") for m in load_models_file(CHART / "files" / "models.yaml")}


def test_default_presets_equal_the_catalog_specs():
    """With the default values each preset's spec is the catalog file's spec, field for field."""
    catalog = _catalog_specs()
    presets = find(render(), "ImageModel")
    assert sorted(p["metadata"]["name"] for p in presets) == sorted(PRESETS)
    for p in presets:
        assert p["apiVersion"] == "remotegpu.ai/v1alpha1"
        spec = ImageModelSpec.model_validate(p["spec"]).model_dump(mode="json")
        assert spec == catalog[p["metadata"]["name"]], p["metadata"]["name"]
    assert {catalog[n]["model"] for n in PRESETS} == {
        "black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-Kontext-dev", "black-forest-labs/FLUX.1-dev",
        "black-forest-labs/FLUX.2-klein-9B", "black-forest-labs/FLUX.2-dev",
    }  # fmt: skip


def test_presets_switch_and_override(tmp_path: Path):
    values = {
        "workerImage": {"repository": "registry.example/rg-worker", "tag": "7"},
        "presets": {
            "flux-1-dev": {"enabled": False},
            "flux-2-dev": {"gpuCount": 2, "minReplicas": 1, "maxReplicas": 4},
            "worker": {
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
            },
        },
    }
    presets = {p["metadata"]["name"]: p["spec"] for p in find(render(values, tmp_path), "ImageModel")}
    assert sorted(presets) == sorted(set(PRESETS) - {"flux-1-dev"})
    flux2 = presets["flux-2-dev"]
    assert flux2["worker"]["gpu"]["count"] == 2
    assert (flux2["scaling"]["minReplicas"], flux2["scaling"]["maxReplicas"]) == (1, 4)
    catalog = _catalog_specs()
    for name, spec in presets.items():
        assert spec["worker"]["image"] == "registry.example/rg-worker:7"
        assert spec["worker"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["worker"]["env"][0]["name"] == "HF_TOKEN"
        # everything the values do not touch is still the catalog's
        parsed = ImageModelSpec.model_validate(spec).model_dump(mode="json")
        for key in ("model", "architecture", "parameters", "weights", "serving"):
            assert parsed[key] == catalog[name][key]
    assert presets["flux-1-schnell"]["worker"]["gpu"]["count"] == 1


def test_preset_serving_overrides_merge_into_the_catalog(tmp_path: Path):
    """The lossy speed-ups are opt-in per preset; what a preset does not set stays the catalog's."""
    values = {
        "presets": {
            "flux-1-dev": {"serving": {"quantization": "fp8", "stepCache": {"type": "first-block"}}},
            "flux-2-dev": {"serving": {"memory": "text-encoder-offload"}},
        }
    }
    presets = {p["metadata"]["name"]: p["spec"] for p in find(render(values, tmp_path), "ImageModel")}
    catalog = _catalog_specs()
    dev = ImageModelSpec.model_validate(presets["flux-1-dev"]).serving
    assert dev.quantization.value == "fp8" and dev.step_cache is not None
    assert dev.step_cache.type.value == "first-block"
    assert presets["flux-1-schnell"]["serving"]["maxSequenceLength"] == 256  # untouched preset
    flux2 = presets["flux-2-dev"]["serving"]
    assert flux2["memory"] == "text-encoder-offload"
    assert catalog["flux-2-dev"]["serving"]["memory"] == "auto"
    out = template({"presets": {"flux-1-dev": {"serving": {"quantization": "int3"}}}}, tmp_path, check=False)
    assert out.returncode != 0 and "quantization" in out.stderr


def test_preset_scaling_overrides_merge_into_the_catalog(tmp_path: Path):
    values = {"presets": {"flux-1-dev": {"scaling": {"mode": "External", "priority": 5}, "maxReplicas": 3}}}
    presets = {p["metadata"]["name"]: p["spec"] for p in find(render(values, tmp_path), "ImageModel")}
    dev = ImageModelSpec.model_validate(presets["flux-1-dev"]).scaling
    assert (dev.mode.value, dev.priority, dev.max_replicas) == ("External", 5, 3)
    assert "mode" not in presets["flux-1-schnell"]["scaling"]  # untouched preset: the catalog's
    out = template({"presets": {"flux-1-dev": {"scaling": {"mode": "Sometimes"}}}}, tmp_path, check=False)
    assert out.returncode != 0 and "mode" in out.stderr


def test_all_presets_off_renders_none(tmp_path: Path):
    objs = render({"presets": {n: {"enabled": False} for n in PRESETS}}, tmp_path)
    assert not find(objs, "ImageModel")
    assert one(objs, "Deployment", "remotegpu-gateway")


def test_preset_min_above_max_is_refused(tmp_path: Path):
    out = template({"presets": {"flux-1-dev": {"minReplicas": 3, "maxReplicas": 1}}}, tmp_path, check=False)
    assert out.returncode != 0 and "minReplicas (3) must not exceed maxReplicas (1)" in out.stderr


# ---- secrets, database, storage ----------------------------------------------------------


def generated_secrets(hook: dict) -> list[str]:
    """The NAME=KEY pairs the secrets hook is told to generate."""
    (container,) = hook["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["remotegpu"] and container["args"][:2] == ["chart-hook", "secrets"]
    return [a.removeprefix("--secret=") for a in container["args"] if a.startswith("--secret=")]


def test_generated_secrets_come_from_a_hook_so_renders_are_identical():
    """Argo CD and Flux render with `helm template` (no `lookup`): nothing random is rendered.
    The secrets nobody gave are the hook's to generate (run for real in test_install.py)."""
    first, second = template().stdout, template().stdout
    assert first == second
    objs = render()
    assert not find(objs, "Secret")
    hook = one(objs, "Job", "remotegpu-secrets")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert generated_secrets(hook) == ["remotegpu-worker-token=token", "remotegpu-postgresql=password"]
    # It may create Secrets and patch only those two; it reads none.
    rules = one(objs, "Role", "remotegpu-secrets")["rules"]
    assert rules == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["remotegpu-worker-token", "remotegpu-postgresql"],
            "verbs": ["patch"],
        },
    ]
    # The bundled database: the URL names no password, libpq takes it from PGPASSWORD.
    env = env_of(one(objs, "Deployment", "remotegpu-gateway"))
    assert env["REMOTEGPU_DATABASE_URL"]["value"] == (
        "postgresql://remotegpu@remotegpu-postgresql.imaging.svc:5432/remotegpu"
    )
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "remotegpu-postgresql",
        "key": "password",
    }
    sts = one(objs, "StatefulSet", "remotegpu-postgresql")
    pg_env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "remotegpu-postgresql",
        "key": "password",
    }
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_given_secrets_need_no_hook(tmp_path: Path):
    objs = render(
        {
            "workerToken": {"value": "tok-123"},
            "postgresql": {"auth": {"existingSecret": "pg-pass", "existingSecretKey": "pw"}},
        },
        tmp_path,
    )
    assert not find(objs, "Job", "remotegpu-secrets") and not find(objs, "Role", "remotegpu-secrets")
    assert secret_value(one(objs, "Secret", "remotegpu-worker-token"), "token") == "tok-123"
    assert [o["metadata"]["name"] for o in find(objs, "Secret")] == ["remotegpu-worker-token"]
    ref = {"name": "pg-pass", "key": "pw"}
    assert (
        env_of(one(objs, "Deployment", "remotegpu-gateway"))["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    )
    sts = one(objs, "StatefulSet", "remotegpu-postgresql")
    pg_env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    # A given password is rendered (the same every time); only the token is left to generate.
    objs = render({"postgresql": {"auth": {"password": "pw-1"}}}, tmp_path)
    assert secret_value(one(objs, "Secret", "remotegpu-postgresql"), "password") == "pw-1"
    assert generated_secrets(one(objs, "Job", "remotegpu-secrets")) == ["remotegpu-worker-token=token"]


def test_given_worker_token_and_external_database(tmp_path: Path):
    url = "postgresql://rg:s3cret@db.example:5432/rg"
    objs = render(
        {"workerToken": {"value": "tok-123"}, "database": {"url": url}, "postgresql": {"enabled": False}},
        tmp_path,
    )
    assert secret_value(one(objs, "Secret", "remotegpu-worker-token"), "token") == "tok-123"
    assert secret_value(one(objs, "Secret", "remotegpu-database"), "url") == url
    assert not find(objs, "StatefulSet") and not find(objs, "Secret", "remotegpu-postgresql")
    assert not find(objs, "Service", "remotegpu-postgresql")


def test_existing_secrets_are_referenced_not_created(tmp_path: Path):
    objs = render(
        {
            "workerToken": {"existingSecret": "my-token", "existingSecretKey": "t"},
            "database": {"existingSecret": "my-db", "existingSecretKey": "dsn"},
            "postgresql": {"enabled": False},
            "gateway": {
                "existingSigningSecret": "my-signing",
                "publicUrl": "https://img.example",
                "retentionHours": 24,
                "startTimeoutSeconds": 120,
            },
        },
        tmp_path,
    )
    assert not find(objs, "Secret")
    env = env_of(one(objs, "Deployment", "remotegpu-gateway"))
    assert env["REMOTEGPU_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "my-db", "key": "dsn"}
    assert env["REMOTEGPU_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-token", "key": "t"}
    assert env["REMOTEGPU_SIGNING_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "my-signing",
        "key": "secret",
    }
    assert env["REMOTEGPU_PUBLIC_URL"]["value"] == "https://img.example"
    assert env["REMOTEGPU_RETENTION_HOURS"]["value"] == "24"
    assert env["REMOTEGPU_START_TIMEOUT_SECONDS"]["value"] == "120"
    op_env = env_of(one(objs, "Deployment", "remotegpu-operator"))
    assert op_env["REMOTEGPU_WORKER_TOKEN_SECRET"]["value"] == "my-token"
    assert op_env["REMOTEGPU_WORKER_TOKEN_SECRET_KEY"]["value"] == "t"


@pytest.mark.parametrize(
    "values",
    [
        {"postgresql": {"enabled": False}},  # no database at all
        {"database": {"url": "postgresql://a:b@c/d"}},  # an external URL and the bundled one
    ],
)
def test_exactly_one_database_is_required(values, tmp_path: Path):
    out = template(values, tmp_path, check=False)
    assert out.returncode != 0 and "set exactly one database" in out.stderr


def test_results_without_persistence_and_with_existing_claim(tmp_path: Path):
    objs = render({"results": {"persistence": {"enabled": False}}}, tmp_path)
    assert not find(objs, "PersistentVolumeClaim")
    gw = one(objs, "Deployment", "remotegpu-gateway")
    assert {"name": "data", "emptyDir": {}} in gw["spec"]["template"]["spec"]["volumes"]
    assert gw["spec"]["strategy"]["type"] == "RollingUpdate" and gw["spec"]["replicas"] == 1
    # Two gateways with a folder each would each miss the other's images.
    out = template(
        {"results": {"persistence": {"enabled": False}}, "gateway": {"replicaCount": 2}},
        tmp_path,
        check=False,
    )
    assert out.returncode != 0 and "needs shared images: objectStorage.enabled=true" in out.stderr
    objs = render(
        {"results": {"persistence": {"existingClaim": "shared", "accessModes": ["ReadWriteMany"]}}}, tmp_path
    )
    assert not find(objs, "PersistentVolumeClaim")
    gw = one(objs, "Deployment", "remotegpu-gateway")
    vols = {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "shared"
    assert gw["spec"]["strategy"]["type"] == "RollingUpdate"  # ReadWriteMany: rolling updates are fine


def test_object_storage_makes_the_gateway_highly_available(tmp_path: Path):
    s3 = {"enabled": True, "bucket": "images", "endpoint": "http://s3.storage:8333", "prefix": "rg",
          "existingSecret": "s3-keys"}  # fmt: skip
    objs = render({"objectStorage": s3}, tmp_path)
    assert not find(objs, "PersistentVolumeClaim", "remotegpu-results")
    gw = one(objs, "Deployment", "remotegpu-gateway")
    spec, pod = gw["spec"], gw["spec"]["template"]["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    env = env_of(gw)
    assert {k: env[k]["value"] for k in ("REMOTEGPU_S3_BUCKET", "REMOTEGPU_S3_ENDPOINT_URL", "REMOTEGPU_S3_PREFIX")} == {
        "REMOTEGPU_S3_BUCKET": "images", "REMOTEGPU_S3_ENDPOINT_URL": "http://s3.storage:8333", "REMOTEGPU_S3_PREFIX": "rg"
    }  # fmt: skip
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-keys", "key": "accessKeyId"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-keys",
        "key": "secretAccessKey",
    }
    assert "REMOTEGPU_RESULTS_DIR" not in env
    assert {"name": "data", "emptyDir": {}} in pod["volumes"]
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    selector = spec["selector"]["matchLabels"]
    assert [(c["topologyKey"], c["whenUnsatisfiable"], c["labelSelector"]["matchLabels"]) for c in pod["topologySpreadConstraints"]] == [
        ("kubernetes.io/hostname", "ScheduleAnyway", selector), ("topology.kubernetes.io/zone", "ScheduleAnyway", selector)
    ]  # fmt: skip
    assert not find(objs, "HorizontalPodAutoscaler")

    objs = render(
        {"objectStorage": s3, "gateway": {"autoscaling": {"enabled": True, "maxReplicas": 9}}}, tmp_path
    )
    hpa = one(objs, "HorizontalPodAutoscaler", "remotegpu-gateway")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 9)
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "remotegpu-gateway",
    }
    assert "replicas" not in one(objs, "Deployment", "remotegpu-gateway")["spec"]  # the HPA owns it

    out = template({"objectStorage": {"enabled": True}}, tmp_path, check=False)
    assert out.returncode != 0 and "needs objectStorage.bucket" in out.stderr
    out = template(
        {"gateway": {"autoscaling": {"enabled": True}}}, tmp_path, check=False
    )  # a ReadWriteOnce volume
    assert out.returncode != 0 and "needs shared images" in out.stderr


def test_results_claim_settings(tmp_path: Path):
    pvc = one(
        render(
            {"results": {"persistence": {"storageClass": "fast", "size": "10Gi", "keepOnUninstall": True}}},
            tmp_path,
        ),
        "PersistentVolumeClaim",
    )
    assert pvc["spec"]["storageClassName"] == "fast"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pvc = one(render({"results": {"persistence": {"storageClass": "-"}}}, tmp_path), "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == ""


# ---- ingress, monitoring, dashboards -------------------------------------------------------


def test_ingress(tmp_path: Path):
    objs = render(
        {
            "gateway": {
                "ingress": {
                    "enabled": True,
                    "className": "nginx",
                    "hosts": [{"host": "img.example", "paths": [{"path": "/v1", "pathType": "Prefix"}]}],
                    "tls": [{"secretName": "img-tls", "hosts": ["img.example"]}],
                }
            }
        },
        tmp_path,
    )
    env = env_of(one(objs, "Deployment", "remotegpu-gateway"))
    assert env["REMOTEGPU_PUBLIC_URL"]["value"] == "https://img.example"  # result_url through the Ingress
    ing = one(objs, "Ingress", "remotegpu-gateway")
    assert ing["spec"]["ingressClassName"] == "nginx"
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "img.example"
    path = rule["http"]["paths"][0]
    assert path["path"] == "/v1"
    assert path["backend"]["service"] == {"name": "remotegpu-gateway", "port": {"number": 8000}}
    assert ing["spec"]["tls"][0]["secretName"] == "img-tls"


def test_monitoring_objects(tmp_path: Path):
    objs = render(MONITORING_ON, tmp_path)
    sms = {o["metadata"]["name"]: o for o in find(objs, "ServiceMonitor")}
    assert sorted(sms) == ["remotegpu-gateway", "remotegpu-operator"]
    for name, port in (("remotegpu-gateway", "http"), ("remotegpu-operator", "metrics")):
        sm = sms[name]
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["metadata"]["labels"]["release"] == "kps"
        assert sm["spec"]["endpoints"][0]["port"] == port and sm["spec"]["endpoints"][0]["path"] == "/metrics"
        # the ServiceMonitor selects exactly the Service whose port it names
        svc = [
            s for s in find(objs, "Service")
            if all(s["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
        ]  # fmt: skip
        assert len(svc) == 1 and port in [p["name"] for p in svc[0]["spec"]["ports"]], name
    pm = one(objs, "PodMonitor")
    # the worker pods the operator creates carry these labels and this port name
    from remotegpu_operator import deployment as d

    worker_labels = d.labels("flux-1-dev", ImageModelSpec.model_validate(_catalog_specs()["flux-1-dev"]))
    assert all(worker_labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    rule = one(objs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) >= {
        "RemoteGPUJobsWaitingTooLong", "RemoteGPUModelStuckStarting", "RemoteGPUHighJobFailureRate",
        "RemoteGPUNoGPUCapacity",
    }  # fmt: skip
    for a in alerts.values():
        assert a["labels"]["team"] == "imaging" and a["labels"]["severity"] in ("warning", "critical")
        assert 'namespace="imaging"' in a["expr"]
        assert a["annotations"]["summary"] and a["annotations"]["description"]


def test_monitoring_is_off_by_default():
    objs = render()
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        assert not find(objs, kind)


def test_dashboards_as_configmaps(tmp_path: Path):
    objs = render()
    cms = find(objs, "ConfigMap")
    files = dashboards()
    assert sorted(files) == ["fleet-overview.json", "gpu-cost.json", "model.json"]
    assert len(cms) == len(files)
    seen = {}
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((fname, text),) = cm["data"].items()
        seen[fname] = json.loads(text)
    assert seen == files
    uids = {d["uid"] for d in files.values()}
    assert uids == {"remotegpu-fleet", "remotegpu-model", "remotegpu-gpu-cost"}
    assert not find(render({"metrics": {"dashboards": {"enabled": False}}}, tmp_path), "ConfigMap")


def render_notes(tmp_path: Path, values: dict | None = None) -> str:
    """NOTES.txt as helm renders it: `helm template` never prints it, so a copy of the chart
    renders it through `tpl` into a ConfigMap (`helm install` prints it: see test_install.py)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "files" / "NOTES.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ tpl (.Files.Get "files/NOTES.txt") . | toJson }}}\n'
    )
    args = ["template", "remotegpu", str(chart), "--namespace", "imaging"]
    if values:
        (tmp_path / "notes-values.yaml").write_text(yaml.safe_dump(values))
        args += ["-f", str(tmp_path / "notes-values.yaml")]
    out = run_helm(*args, "--show-only", "templates/zz-notes.yaml")
    return yaml.safe_load(out.stdout)["data"]["notes"]


def test_notes_tell_how_to_create_a_key_and_send_a_request(tmp_path: Path):
    text = render_notes(tmp_path)
    assert (
        "kubectl exec -n imaging deploy/remotegpu-gateway -- remotegpu keys create --name me --scope inference"
        in text
    )
    assert 'curl -s -X POST "$REMOTEGPU_URL/v1/inference/image"' in text
    assert '"model": "black-forest-labs/FLUX.1-schnell"' in text
    assert "kubectl port-forward -n imaging svc/remotegpu-gateway 8000:8000" in text
    assert "flux-1-schnell" in text and "bundled single-instance PostgreSQL" in text
    text = render_notes(
        tmp_path / "b",
        {"gateway": {"ingress": {"enabled": True, "tls": [{"secretName": "t", "hosts": ["img.example"]}],
                                 "hosts": [{"host": "img.example", "paths": [{"path": "/v1", "pathType": "Prefix"}]}]}}},
    )  # fmt: skip
    assert "export REMOTEGPU_URL=https://img.example" in text and "port-forward" not in text


# ---- the schema refuses what it must -------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"gateway": {"replicaCount": "two"}}, "/gateway/replicaCount"),
        ({"presets": {"flux-1-dev": {"gpuCount": 1.5}}}, "/presets/flux-1-dev/gpuCount"),
        ({"presets": {"flux-1-dev": {"enabled": "yes"}}}, "/presets/flux-1-dev/enabled"),
        ({"presets": {"flux-1-dev": {"maxReplicas": -1}}}, "/presets/flux-1-dev/maxReplicas"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"gateway": {"replicas": 2}}, "replicas"),
        ({"presets": {"flux-3": {"enabled": True}}}, "flux-3"),
        (
            {"metrics": {"serviceMonitor": {"enabled": True, "interval": "often"}}},
            "/metrics/serviceMonitor/interval",
        ),
        ({"gateway": {"service": {"type": "Headless"}}}, "/gateway/service/type"),
        ({"database": {"url": "mysql://x"}, "postgresql": {"enabled": False}}, "/database/url"),
        (
            {"results": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}},
            "/results/persistence/accessModes",
        ),
        ({"commonLabels": {"team": 7}}, "/commonLabels/team"),
        ({"gateway": {"retentionHours": -1}}, "/gateway/retentionHours"),
        ({"gateway": {"webhookAllowedNetworks": ["everything"]}}, "/gateway/webhookAllowedNetworks/0"),
        ({"gateway": {"corsOrigins": ["https://app.example.com/path"]}}, "/gateway/corsOrigins/0"),
        ({"gateway": {"startTimeoutSeconds": 0}}, "/gateway/startTimeoutSeconds"),
    ],
)
def test_schema_rejects(values, message, tmp_path: Path):
    out = template(values, tmp_path, check=False)
    assert out.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in out.stderr or "schema" in out.stderr
    assert message in out.stderr, out.stderr


def test_uninstall_hook_deletes_the_presets_first(tmp_path: Path):
    objs = render()
    hook = [o for o in objs if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "pre-delete"]
    assert sorted(o["kind"] for o in hook) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    assert all(o["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete" for o in hook)
    job = one(hook, "Job")
    weights = {o["kind"]: int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for o in hook}
    assert all(weights[k] < weights["Job"] for k in ("ServiceAccount", "Role", "RoleBinding"))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["chart-hook", "uninstall"]
    (selector,) = [a.removeprefix("--selector=") for a in container["args"] if a.startswith("--selector=")]
    assert selector == "app.kubernetes.io/instance=remotegpu,app.kubernetes.io/component=imagemodel"
    # the selector matches exactly the presets
    presets = find(objs, "ImageModel")
    for p in presets:
        assert all(p["metadata"]["labels"][k] == v for k, v in (kv.split("=") for kv in selector.split(",")))
    assert one(hook, "Role")["rules"] == [
        {"apiGroups": ["remotegpu.ai"], "resources": ["imagemodels"], "verbs": ["list", "delete"]}
    ]
    assert (
        job["spec"]["template"]["spec"]["serviceAccountName"]
        == one(hook, "ServiceAccount")["metadata"]["name"]
    )
    assert not find(
        render({"operator": {"cleanupOnUninstall": False}}, tmp_path), "Job", "remotegpu-uninstall"
    )


def test_readme_values_table_is_current():
    from tests.chart.values_doc import render_readme

    readme = (CHART / "README.md").read_text()
    assert render_readme(readme) == readme, "run `.venv/bin/python -m tests.chart.values_doc`"


def test_preset_worker_pod_settings_and_per_model_resources(tmp_path: Path):
    """Scheduling and security settings reach every preset; resources are the catalog's unless a preset sets its own."""
    worker = {
        "priorityClassName": "gpu-high",
        "runtimeClassName": "nvidia",
        "imagePullSecrets": [{"name": "regcred"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        "securityContext": {"runAsUser": 10001, "runAsNonRoot": True},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    values = {
        "presets": {
            "worker": worker,
            "flux-1-dev": {"resources": {"requests": {"cpu": "6", "memory": "64Gi"}}},
        }
    }
    presets = {p["metadata"]["name"]: p["spec"] for p in find(render(values, tmp_path), "ImageModel")}
    catalog = _catalog_specs()
    for name, spec in presets.items():
        parsed = ImageModelSpec.model_validate(spec).worker
        assert parsed.priority_class_name == "gpu-high" and parsed.runtime_class_name == "nvidia"
        assert parsed.image_pull_secrets == [{"name": "regcred"}]
        assert parsed.affinity == worker["affinity"] and parsed.tolerations == worker["tolerations"]
        assert parsed.security_context == worker["securityContext"]
        if name != "flux-1-dev":
            assert parsed.resources == catalog[name]["worker"]["resources"]
    assert presets["flux-1-dev"]["worker"]["resources"] == {"requests": {"cpu": "6", "memory": "64Gi"}}
    # the catalog's per-model memory: FLUX.2-dev far above FLUX.1
    assert presets["flux-2-dev"]["worker"]["resources"] != presets["flux-1-schnell"]["worker"]["resources"]
    out = template({"presets": {"worker": {"qos": "Sometimes"}}}, tmp_path, check=False)
    assert out.returncode != 0 and "qos" in out.stderr


def test_presets_model_cache(tmp_path: Path):
    """presets.modelCache gives every preset a cache of its Hub repo, with the token Secret."""
    values = {"presets": {"modelCache": {"enabled": True, "prewarm": True, "hfTokenSecret": "hf"}}}
    presets = {p["metadata"]["name"]: p["spec"] for p in find(render(values, tmp_path), "ImageModel")}
    assert sorted(presets) == sorted(PRESETS)
    for spec in presets.values():
        cache = ImageModelSpec.model_validate(spec).cache
        assert cache is not None and cache.prewarm and cache.node_local is not None
        assert cache.source is not None and cache.source.hugging_face is not None
        assert cache.source.hugging_face.repo == spec["weights"]["source"]
        assert cache.source.hugging_face.token_secret is not None
        assert cache.source.hugging_face.token_secret.name == "hf"
    values = {"presets": {"modelCache": {"enabled": True, "pvcClaimName": "rwx-models"}}}
    spec = find(render(values, tmp_path), "ImageModel")[0]["spec"]
    assert spec["cache"]["pvc"] == {"claimName": "rwx-models"} and "nodeLocal" not in spec["cache"]
    assert all("cache" not in p["spec"] for p in find(render(), "ImageModel"))  # off by default
