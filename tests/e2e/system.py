"""The whole system on the local cluster: `helm install` with real processes behind the pods.

Shared by the end-to-end tests (tests/e2e) and bench/e2e.py.

The pod runner plays the kubelet for one node, where the chart's gateway and
operator and the tiny models' workers run as local processes; every other node is
KWOK's. The gateway uses the tests' real PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from remotegpu_base.catalog import load_models_file

from tests.e2e.podrunner import PodRunner
from tests.fixtures.cluster import REPO, Kube
from tests.fixtures.postgres import create_database, drop_database
from tests.waiting import wait_for

RELEASE = "rg"
VENV_BIN = Path(sys.executable).parent
# Short idle windows so scale-to-zero happens within a test.
IDLE_SECONDS = 6


@dataclass
class System:
    kube: Kube
    runner: PodRunner
    namespace: str
    database_url: str
    api_key: str
    tiny_models: dict[str, str]  # architecture -> public model ID

    @property
    def gateway_url(self) -> str:
        """The gateway pod's own address (clients outside the cluster would use an Ingress)."""
        gw = wait_for(
            lambda: [
                p
                for p in self.runner.processes(self.namespace, f"{RELEASE}-remotegpu-gateway")
                if p.ready and not p.stopping
            ],
            60,
            "a ready gateway",
        )
        return f"http://{gw[0].ip}:8000"

    def pods(self, prefix: str) -> list[str]:
        return [p.name for p in self.runner.processes(self.namespace, prefix) if not p.stopping]

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.gateway_url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30
        )

    def models(self) -> dict[str, dict]:
        r = httpx.get(f"{self.gateway_url}/v1/inference/models", timeout=10)
        r.raise_for_status()
        return {m["model"]: m for m in r.json()["image"]}

    def state(self, model: str) -> str:
        return self.models()[model]["runtime"]["state"]

    def submit(self, model: str, **fields) -> str:
        with self.http() as http:
            r = http.post("/v1/inference/image", json={"model": model, "prompt": "a lighthouse", **fields})
            assert r.status_code in (200, 201, 202), r.text
            return r.json()["job_id"]

    def job(self, job_id: str) -> dict:
        with self.http() as http:
            r = http.get(f"/v1/inference/jobs/{job_id}")
            r.raise_for_status()
            return r.json()

    def wait_job(self, job_id: str, timeout: float = 180.0) -> dict:
        """The finished job; on timeout, fails with its last state and every pod's log."""
        try:
            return wait_for(
                lambda: (j := self.job(job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                timeout,
                f"job {job_id} to finish",
                every=0.3,
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast state: {self.job(job_id)}\n{self.logs()}") from None

    def imagemodel(self, name: str) -> dict:
        return self.kube.get_json("imagemodel", name, "-n", self.namespace)

    def deployment(self, name: str) -> dict | None:
        dep = self.imagemodel(name).get("status", {}).get("deployment")
        if not dep:
            return None
        out = self.kube.kubectl("get", "deployment", dep, "-n", self.namespace, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def deployment_replicas(self, name: str) -> int:
        dep = self.deployment(name)
        return dep["spec"].get("replicas", 0) if dep else 0

    def workers(self, name: str) -> list:
        dep = self.imagemodel(name).get("status", {}).get("deployment") or name
        return [p for p in self.runner.processes(self.namespace, dep) if not p.stopping]

    def logs(self, tail: int | None = 4000) -> str:
        return self.runner.logs(self.namespace, "", tail)


def tiny_imagemodels(models_dir: Path, node: str) -> tuple[list[dict], dict[str, str]]:
    """The catalog's tiny models as ImageModels whose workers run on the runner's node."""
    docs, ids = [], {}
    for m in load_models_file():
        if not m.spec.weights.random or m.spec.architecture.value not in ("flux1", "flux1-kontext"):
            continue
        doc = m.to_resource()
        spec = doc["spec"]
        spec["weights"]["source"] = str(models_dir / Path(spec["weights"]["source"]).name)
        spec["worker"] = {
            "gpu": {"count": 0},
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 60,  # the worker drains for 45 s
        }
        spec["scaling"] = {
            "minReplicas": 0,
            "maxReplicas": 2,
            "idleSeconds": IDLE_SECONDS,
            "jobsPerReplica": 1,
        }
        docs.append(doc)
        ids[m.spec.architecture.value] = m.spec.model
    return docs, ids


@contextmanager
def deploy(kube: Kube, postgres_url: str, tiny_models_dir: Path, work: Path) -> Iterator[System]:
    """Installs the chart with a pod runner node; yields the System; removes everything after."""
    work.mkdir(parents=True, exist_ok=True)
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    node = f"runner-{uuid.uuid4().hex[:6]}"
    runner = PodRunner(kube.kubeconfig, node, work, VENV_BIN)
    runner.start()
    database_url = create_database(postgres_url)
    kube.kubectl("create", "namespace", namespace)
    pin = {"kubernetes.io/hostname": node}
    # A static volume for the results claim (no provisioner here); the runner maps it to a folder.
    claim = f"results-{namespace}"
    kube.kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump_all(
            [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": claim},
                    "spec": {
                        "capacity": {"storage": "1Gi"},
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": "",
                        "hostPath": {"path": str(work / "pv")},
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
        ),
    )
    values = {
        "postgresql": {"enabled": False},
        "database": {"url": database_url},
        "results": {"persistence": {"enabled": True, "existingClaim": claim}},
        "gateway": {"nodeSelector": pin},
        "operator": {"nodeSelector": pin, "intervalSeconds": 1},
    }
    values_file = work / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    kube.helm(
        "install",
        RELEASE,
        str(REPO / "charts/remotegpu"),
        "-n",
        namespace,
        "-f",
        str(values_file),
        "--wait",
        "--timeout",
        "240s",
    )
    docs, ids = tiny_imagemodels(tiny_models_dir, node)
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
    keys = subprocess.run(
        [
            str(VENV_BIN / "remotegpu"),
            "keys",
            "create",
            "--name",
            "e2e",
            "--scope",
            "inference",
            "--database-url",
            database_url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    system = System(kube, runner, namespace, database_url, keys.stdout.strip().splitlines()[-1], ids)
    try:
        yield system
    except Exception:
        print(system.logs())
        raise
    finally:
        kube.helm("uninstall", RELEASE, "-n", namespace, check=False)
        runner.stop()
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        kube.kubectl("delete", "pv", claim, "--wait=false", check=False)
        kube.kubectl("delete", "node", node, "--wait=false", check=False)
        drop_database(postgres_url, database_url)
