"""On the real nodes: from the default install (one gateway, results on a volume),
`helm upgrade` to object storage runs 2 gateway replicas, and a rolling restart of the
gateway under a steady submit load loses no request and no job.

The S3 server is SeaweedFS (the pinned `weed` that cluster/build.sh builds) run on the
host, bound to node 0's bridge address: the gateway pods reach it there as they reach
the API server relay and CoreDNS, and the tests reach it too, with no image to build
and nothing routed outside the cluster's own bridges. The release is this module's own
(its own namespace), so the shared system of the other e2e tests keeps its one gateway.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.system import GATEWAY, INFRA_NODE, RELEASE, System, deploy
from tests.fixtures.cluster import REPO, Kube, RealNodes
from tests.fixtures.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS
from tests.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.real_nodes, pytest.mark.timeout(2400)]

SUBMIT_EVERY = 0.4  # seconds between submits: a steady load the two CPU-run workers keep up with


@pytest.fixture(scope="module")
def store(real_nodes: RealNodes) -> Iterator[SeaweedFS]:
    server = SeaweedFS(ip=real_nodes.addresses[INFRA_NODE]).start()
    try:
        server.bucket()
        yield server
    finally:
        server.discard()


@pytest.fixture(scope="module")
def fresh(
    kube: Kube, real_nodes: RealNodes, tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with deploy(kube, real_nodes, tiny_models_dir, tmp_path_factory.mktemp("e2e-s3")) as system:
        yield system


def gateway_deployment(system: System) -> dict:
    return system.kube.get_json("deployment", GATEWAY, namespace=system.namespace)


def upgrade_to_object_storage(system: System, store: SeaweedFS) -> None:
    system.kube.kubectl(
        "create", "secret", "generic", "s3-credentials", "-n", system.namespace,
        f"--from-literal=accessKeyId={ACCESS_KEY}", f"--from-literal=secretAccessKey={SECRET_KEY}",
    )  # fmt: skip
    system.kube.helm(
        "upgrade", RELEASE, str(REPO / "charts/remotegpu"), "-n", system.namespace, "--reuse-values",
        "--set", "objectStorage.enabled=true",
        "--set", f"objectStorage.bucket={store.bucket()}",
        "--set", f"objectStorage.endpoint={store.endpoint}",
        "--set", f"objectStorage.prefix={system.namespace}",
        "--set", "objectStorage.existingSecret=s3-credentials",
        "--wait", "--timeout", "300s",
    )  # fmt: skip


class SteadyLoad:
    """Submits a job every SUBMIT_EVERY seconds, as a client behind a load balancer does:
    a request whose connection breaks is sent again with the same Idempotency-Key (the
    gateway answers it with the same job), so a broken connection loses nothing; any
    answer but 202 counts as refused."""

    def __init__(self, system: System, model: str):
        self.system, self.model = system, model
        self.submitted = 0
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self.resent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        http = self.system.http
        n = 0
        while not self._stop.is_set():
            n += 1
            self.submitted += 1
            self._submit(http, n)
            self._stop.wait(SUBMIT_EVERY)

    def _submit(self, http: httpx.Client, n: int) -> None:
        body = {"model": self.model, "prompt": f"steady load {n}", "steps": 2, "seed": n}
        for _ in range(60):
            try:
                r = http.post("/v1/inference/image", json=body, headers={"Idempotency-Key": f"load-{n}"})
            except httpx.TransportError:
                self.resent += 1
                time.sleep(0.5)
                continue
            if r.status_code == 202:
                self.accepted.append(r.json()["job_id"])
            else:
                self.refused.append(f"{r.status_code} {r.text[:200]}")
            return
        self.refused.append("no answer after 60 attempts")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def test_helm_upgrade_to_object_storage_then_a_rolling_restart_under_load_loses_nothing(
    fresh: System, store: SeaweedFS
) -> None:
    system = fresh
    model = system.tiny_models["flux1"]
    # The default install: one gateway, recreated on upgrades (its results on a ReadWriteOnce volume).
    assert len(system.pods(GATEWAY)) == 1
    assert gateway_deployment(system)["spec"]["strategy"]["type"] == "Recreate"
    before = system.submit(model, seed=1, steps=2)
    assert system.wait_job(before, timeout=300)["status"] == "succeeded"

    upgrade_to_object_storage(system, store)
    dep = gateway_deployment(system)
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    assert not any("persistentVolumeClaim" in v for v in volumes.values()), volumes
    wait_for(
        lambda: len([p for p in system.pod_list(GATEWAY) if p.ready and not p.deleting]) == 2,
        180,
        "2 ready gateway pods",
    )
    # A job through the upgraded gateways: its result is an object in the bucket, served
    # by the gateway under its own signed URL.
    first = system.wait_job(system.submit(model, seed=2, steps=2), timeout=300)
    assert first["status"] == "succeeded", first
    assert httpx.get(first["result_url"], timeout=30).headers["content-type"] == "image/png"
    assert any(f"/results/{first['job_id']}/" in k for k in store.keys(store.bucket(), system.namespace))

    load = SteadyLoad(system, model)
    try:
        wait_for(lambda: len(load.accepted) >= 10, 120, "submits to flow")
        old = set(system.pods(GATEWAY))
        system.kube.kubectl("rollout", "restart", f"deployment/{GATEWAY}", "-n", system.namespace)
        system.kube.kubectl(
            "rollout", "status", f"deployment/{GATEWAY}", "-n", system.namespace, "--timeout=300s"
        )
        wait_for(
            lambda: not old & {p.name for p in system.pod_list(GATEWAY)}, 180, "the old gateway pods to go"
        )
        n = len(load.accepted)
        wait_for(lambda: len(load.accepted) >= n + 10, 120, "submits after the restart")
    finally:
        load.stop()
    assert len(system.pods(GATEWAY)) == 2

    jobs = set(load.accepted)
    statuses = Counter(system.wait_job(j, timeout=600)["status"] for j in sorted(jobs))
    in_bucket = store.keys(store.bucket(), f"{system.namespace}/results/")
    results = Counter(k.split("/")[2] for k in in_bucket)
    lost = len(jobs) - statuses["succeeded"]
    print(
        f"rolling restart of 2 gateways under load: {load.submitted} submitted, {len(load.accepted)} accepted "
        f"({len(jobs)} distinct jobs), {len(load.refused)} refused/errored, {load.resent} resent after a "
        f"broken connection; jobs: {dict(statuses)}, {lost} lost"
    )
    assert not load.refused, load.refused
    assert len(load.accepted) == load.submitted == len(jobs)
    assert statuses == {"succeeded": len(jobs)}, (statuses, system.logs())
    # One result object per job, each readable through the new gateways.
    assert all(results[j] == 1 for j in jobs), {j: results[j] for j in jobs if results[j] != 1}
    for j in (first["job_id"], sorted(jobs)[0]):
        done = system.job(j)
        assert httpx.get(done["result_url"], timeout=30).status_code == 200, done
