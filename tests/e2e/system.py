"""The whole system on the local cluster's real nodes: `helm install` with the built images.

Shared by the end-to-end tests (tests/e2e) and bench/e2e.py.

The chart's gateway, operator and bundled PostgreSQL (the local stand-in image) and
the tiny models' workers run as containers on the real nodes (kubelet + containerd);
each worker requests one of the nodes' fake GPUs and runs on the CPU. Clients reach
the gateway through its NodePort Service on node 0's bridge address, as users outside
the cluster would through a load balancer.
"""

from __future__ import annotations

import functools
import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from remotegpu_base.catalog import load_models_file

from tests.fixtures.cluster import REPO, Kube, RealNodes, is_ready
from tests.waiting import wait_for

RELEASE = "rg"
GATEWAY = f"{RELEASE}-remotegpu-gateway"
OPERATOR = f"{RELEASE}-remotegpu-operator"
# Short idle windows so scale-to-zero happens within a test.
IDLE_SECONDS = 6
MODELS_MOUNT = "/models"
# The gateway, operator and PostgreSQL stay on node 0; workers go to either node.
INFRA_NODE = "real-node-0"
HUB_REPO = "remotegpu/flux1"  # the Hub stand-in serves each tiny model as remotegpu/<architecture>


@dataclass
class Pod:
    name: str
    node: str
    phase: str
    ready: bool
    deleting: bool
    container_id: str  # containerd://ID of the first container, "" before it started
    raw: dict

    @staticmethod
    def of(p: dict) -> Pod:
        statuses = p.get("status", {}).get("containerStatuses") or [{}]
        return Pod(
            name=p["metadata"]["name"],
            node=p["spec"].get("nodeName", ""),
            phase=p.get("status", {}).get("phase", ""),
            ready=is_ready(p),
            deleting="deletionTimestamp" in p["metadata"],
            container_id=statuses[0].get("containerID", ""),
            raw=p,
        )


class LogCollector:
    """Copies every container log of the namespace from the real nodes' pod log folders.

    The kubelet writes them there (CRI format) and deletes them with the pod; the copy
    keeps the logs of pods that are gone readable (the scale-down test reads what a
    drained worker wrote just before it exited). Read from the node's files, not through
    `kubectl logs -f`, whose stream of a terminating pod can end before its last lines.
    """

    def __init__(self, kube: Kube, namespace: str, folder: Path):
        assert kube.cluster is not None
        self.sources = [n.dir / "pod-logs" for n in kube.cluster.real_nodes().nodes]
        self.namespace, self.folder = namespace, folder
        folder.mkdir(parents=True, exist_ok=True)
        self._offsets: dict[Path, int] = {}
        self._copies: dict[Path, Path] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"logs-{namespace}")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.sync()

    def sync(self) -> None:
        with self._lock:
            for root in self.sources:
                # <namespace>_<pod>_<uid>/<container>/<restart>.log
                for f in sorted(root.glob(f"{self.namespace}_*/*/*.log")):
                    try:
                        with f.open("rb") as src:
                            src.seek(self._offsets.get(f, 0))
                            data = src.read()
                    except OSError:
                        continue
                    if not data:
                        continue
                    self._offsets[f] = self._offsets.get(f, 0) + len(data)
                    pod = f.parent.parent.name.split("_")[1]
                    copy = self._copies.setdefault(f, self.folder / f"{pod}.{f.parent.name}.{f.stem}.log")
                    with copy.open("ab") as dst:
                        dst.write(data)

    def text(self, tail: int | None = 4000) -> str:
        self.sync()
        parts = []
        for copy in list(self._copies.values()):
            pod = copy.name.split(".")[0]
            for line in copy.read_text(errors="replace").splitlines():
                # CRI format: <time> <stream> <P|F> <message>
                parts.append(f"[{pod}] {line.split(' ', 3)[-1]}")
        return "\n".join(parts[-tail:] if tail else parts)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class System:
    kube: Kube
    real: RealNodes
    namespace: str
    api_key: str
    tiny_models: dict[str, str]  # architecture -> public model ID
    gateway_url: str  # the gateway Service's NodePort on node 0's address
    collector: LogCollector

    def pod_list(self, prefix: str = "") -> list[Pod]:
        items = self.kube.get_json("pods", namespace=self.namespace)["items"]
        return [Pod.of(p) for p in items if p["metadata"]["name"].startswith(prefix)]

    def pods(self, prefix: str) -> list[str]:
        return [p.name for p in self.pod_list(prefix) if not p.deleting]

    def wait_gateway(self, timeout: float = 120) -> None:
        """Until a gateway pod is Ready and its Service answers."""
        wait_for(
            lambda: any(p.ready and not p.deleting for p in self.pod_list(GATEWAY)),
            timeout,
            "a ready gateway",
        )
        wait_for(lambda: self._answers(), 30, "the gateway Service to answer")

    def _answers(self) -> bool:
        try:
            return self.http.get("/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    @functools.cached_property
    def http(self) -> httpx.Client:
        """The API client with the test's key. It retries the connection while the Service has no
        ready endpoint (a gateway restarting) and opens one per request (none kept alive across
        a gateway restart); one for every call, as each new client builds an SSL context."""
        return httpx.Client(
            base_url=self.gateway_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=30,
            transport=httpx.HTTPTransport(retries=5, limits=httpx.Limits(max_keepalive_connections=0)),
        )

    def models(self) -> dict[str, dict]:
        r = self.http.get("/v1/inference/models", timeout=10)
        r.raise_for_status()
        return {m["model"]: m for m in r.json()["image"]}

    def state(self, model: str) -> str:
        return self.models()[model]["runtime"]["state"]

    def submit(self, model: str, **fields) -> str:
        r = self.http.post("/v1/inference/image", json={"model": model, "prompt": "a lighthouse", **fields})
        assert r.status_code in (200, 201, 202), r.text
        return r.json()["job_id"]

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/v1/inference/jobs/{job_id}")
        r.raise_for_status()
        return r.json()

    def wait_job(self, job_id: str, timeout: float = 180.0) -> dict:
        """The finished job; on timeout, fails with its last state and every pod's log."""
        try:
            return wait_for(
                lambda: (j := self.job(job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                timeout,
                f"job {job_id} to finish",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast state: {self.job(job_id)}\n{self.logs()}") from None

    def imagemodel(self, name: str) -> dict:
        return self.kube.get_json("imagemodel", name, namespace=self.namespace)

    def deployment(self, name: str) -> dict | None:
        dep = self.imagemodel(name).get("status", {}).get("deployment")
        if not dep:
            return None
        return self.kube.find("deployment", dep, self.namespace)

    def deployment_replicas(self, name: str) -> int:
        dep = self.deployment(name)
        return dep["spec"].get("replicas", 0) if dep else 0

    def workers(self, name: str) -> list[Pod]:
        """The model's worker pods that are not being deleted."""
        dep = self.imagemodel(name).get("status", {}).get("deployment") or name
        return [p for p in self.pod_list(f"{dep}-") if not p.deleting]

    def node_socket(self, node: str) -> Path:
        assert self.kube.cluster is not None
        [n] = [n for n in self.kube.cluster.real_nodes().nodes if n.name == node]
        return n.socket

    def kill_container(self, pod: Pod) -> None:
        """SIGKILL to a container's processes through its node's containerd (an OOM kill, a crash)."""
        cid = pod.container_id.removeprefix("containerd://")
        subprocess.run(
            ["ctr", "--address", str(self.node_socket(pod.node)), "--namespace", "k8s.io", "tasks", "kill",
             "--all", "--signal", "SIGKILL", cid],
            check=True,
            capture_output=True,
        )  # fmt: skip

    def logs(self, tail: int | None = 4000) -> str:
        return self.collector.text(tail)


def tiny_imagemodels(models_dir: Path, real: RealNodes) -> tuple[list[dict], dict[str, str]]:
    """The catalog's tiny models as ImageModels whose workers run on the real nodes' fake GPUs."""
    repository, tag = real.ref("worker")
    docs, ids = [], {}
    for m in load_models_file():
        if not m.spec.weights.random or m.spec.architecture.value not in ("flux1", "flux1-kontext"):
            continue
        doc = m.to_resource()
        spec = doc["spec"]
        spec["weights"]["source"] = f"{MODELS_MOUNT}/{Path(spec['weights']['source']).name}"
        spec["worker"] = {
            "image": f"{repository}:{tag}",
            "gpu": {"count": 1},  # a fake one: the pod lands on a real node and runs on its CPU
            "nodeSelector": dict(real.node_selector),
            "tolerations": list(real.tolerations),
            # the catalog's requests and limits (a tiny model's fit the real nodes)
            "resources": spec["worker"]["resources"],
            "qos": spec["worker"]["qos"],
            "volumes": [{"name": "tiny-models", "hostPath": {"path": str(models_dir), "type": "Directory"}}],
            "volumeMounts": [{"name": "tiny-models", "mountPath": MODELS_MOUNT, "readOnly": True}],
            "terminationGracePeriodSeconds": 60,  # the worker drains for 45 s
        }
        spec["scaling"] = {
            "minReplicas": 0,
            "maxReplicas": 2,
            "idleSeconds": IDLE_SECONDS,
            "jobsPerReplica": 1,
            # No scale-down rate limit (default: 1 replica a minute): a model woken again within
            # a minute of its last scale-down sleeps after the idle window, not up to a minute later.
            "scaleDownPeriodSeconds": 0,
        }
        docs.append(doc)
        ids[m.spec.architecture.value] = m.spec.model
    return docs, ids


def results_volume(namespace: str, path: Path) -> tuple[str, list[dict]]:
    """A static volume for the results claim (no provisioner here), writable by the gateway's user."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "10001:10001", str(path)], check=True)
    claim = f"results-{namespace}"
    return claim, [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": claim},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "hostPath": {"path": str(path)},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": claim,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


def chart_values(real: RealNodes, claim: str) -> dict:
    """What a user sets to install from their own registry, plus this cluster's placement."""
    pin = {"nodeSelector": {**real.node_selector, "kubernetes.io/hostname": INFRA_NODE}}
    on_real = {**pin, "tolerations": list(real.tolerations)}
    (image, tag), (worker, worker_tag), (pg, pg_tag) = (
        real.ref("remotegpu"),
        real.ref("worker"),
        real.ref("postgresql"),
    )
    return {
        "image": {"repository": image, "tag": tag, "pullPolicy": "IfNotPresent"},
        "workerImage": {"repository": worker, "tag": worker_tag},
        "postgresql": {
            "image": {"repository": pg, "tag": pg_tag},
            "persistence": {"enabled": False},
            **on_real,
        },
        "results": {"persistence": {"enabled": True, "existingClaim": claim}},
        "gateway": {"service": {"type": "NodePort"}, **on_real},
        "operator": {"intervalSeconds": 1, **on_real},
    }


@contextmanager
def deploy(kube: Kube, real: RealNodes, tiny_models_dir: Path, work: Path) -> Iterator[System]:
    """Installs the chart on the real nodes; yields the System; removes everything after."""
    work.mkdir(parents=True, exist_ok=True)
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    # The workers (uid 10001) read the tiny models through a hostPath volume.
    subprocess.run(["chmod", "-R", "a+rX", str(tiny_models_dir)], check=True)
    kube.kubectl("create", "namespace", namespace)
    collector = LogCollector(kube, namespace, work / "logs")
    claim, volume = results_volume(namespace, work / "pv")
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(volume))
    values_file = work / "values.yaml"
    values_file.write_text(yaml.safe_dump(chart_values(real, claim)))
    try:
        kube.helm(
            "install", RELEASE, str(REPO / "charts/remotegpu"), "-n", namespace, "-f", str(values_file),
            "--wait", "--timeout", "300s",
        )  # fmt: skip
        docs, ids = tiny_imagemodels(tiny_models_dir, real)
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
        port = kube.get_json("service", GATEWAY, namespace=namespace)["spec"]["ports"][0]["nodePort"]
        # An API key, made where the database is reachable: in the gateway's pod.
        keys = kube.kubectl(
            "exec", "-n", namespace, f"deploy/{GATEWAY}", "-c", "gateway", "--",
            "remotegpu", "keys", "create", "--name", "e2e", "--scope", "inference",
        )  # fmt: skip
        system = System(
            kube,
            real,
            namespace,
            keys.stdout.strip().splitlines()[-1],
            ids,
            f"http://{real.addresses[INFRA_NODE]}:{port}",
            collector,
        )
        system.wait_gateway()
        yield system
    except Exception:
        print(collector.text())
        raise
    finally:
        # The chart's uninstall hook runs (helm waits for hooks); the pods go in the background.
        kube.helm("uninstall", RELEASE, "-n", namespace, "--timeout", "120s", check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        collector.stop()
        kube.kubectl("delete", "pv", claim, "--wait=false", check=False)


def hub_objects(system: System, tiny_models_dir: Path) -> list[dict]:
    """A stand-in for the Hugging Face Hub in a pod (tests/fixtures/hub.py, Service
    `fake-hub`) serving the tiny models as remotegpu/<architecture>; it counts requests."""
    repository, tag = system.real.ref("worker")
    script = (REPO / "tests/fixtures/hub.py").read_text()
    labels = {"app": "fake-hub"}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "fake-hub"},
            "data": {"hub.py": script},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "fake-hub", "labels": labels},
            "spec": {
                "nodeSelector": {**system.real.node_selector, "kubernetes.io/hostname": "real-node-0"},
                "tolerations": list(system.real.tolerations),
                "containers": [
                    {
                        "name": "hub",
                        "image": f"{repository}:{tag}",
                        "command": ["python", "/hub/hub.py", "--root", "/repos", "--port", "8080"],
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/_requests", "port": 8080},
                            "periodSeconds": 1,
                        },
                        "volumeMounts": [
                            {"name": "script", "mountPath": "/hub"},
                            {"name": "models", "mountPath": "/repos/remotegpu", "readOnly": True},
                        ],
                    }
                ],
                "volumes": [
                    {"name": "script", "configMap": {"name": "fake-hub"}},
                    {"name": "models", "hostPath": {"path": str(tiny_models_dir), "type": "Directory"}},
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "fake-hub"},
            "spec": {"selector": labels, "ports": [{"port": 8080, "targetPort": 8080}]},
        },
    ]


def cached_imagemodel(
    system: System, tiny_models_dir: Path, cache_root: Path, name: str, model: str, node: str
) -> dict:
    """The tiny FLUX.1 model with a node-local cache at `cache_root`, fetched from the Hub
    stand-in (hub_objects), its workers pinned to `node`."""
    docs, _ = tiny_imagemodels(tiny_models_dir, system.real)
    doc = next(d for d in docs if d["spec"]["architecture"] == "flux1")
    doc["metadata"] = {"name": name}
    spec = doc["spec"]
    spec["model"] = model
    spec["weights"] = {"source": f"{MODELS_MOUNT}/unused", "random": True}
    spec["worker"].pop("volumes")
    spec["worker"].pop("volumeMounts")
    spec["worker"]["nodeSelector"] = {**spec["worker"]["nodeSelector"], "kubernetes.io/hostname": node}
    endpoint = f"http://fake-hub.{system.namespace}.svc.cluster.local:8080"
    spec["cache"] = {
        "source": {"huggingFace": {"repo": HUB_REPO, "endpoint": endpoint}},
        "nodeLocal": {"path": str(cache_root)},
    }
    return doc


def hub_counts(system: System) -> dict:
    out = system.kube.kubectl(
        "exec", "-n", system.namespace, "fake-hub", "--", "python", "-c",
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/_requests').read().decode())",
    )  # fmt: skip
    return json.loads(out.stdout)


def timeline(system: System, job_id: str) -> dict:
    r = system.http.get(f"/v1/inference/jobs/{job_id}/timeline")
    r.raise_for_status()
    return r.json()
