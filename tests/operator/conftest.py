"""Fixtures for the operator's cluster tests.

The operator runs as a real `remotegpu operator` process, logged in as a
ServiceAccount bound to exactly the rules in operator/rbac.yaml (so a missing
permission fails the tests), against the local control plane with KWOK GPU nodes.
Queue depth comes from a real `remotegpu gateway` process (SQLite in a temp dir,
jobs submitted through the public API, leased and completed through the internal
API as a worker would). `QueueStub` serves only GET /internal/v1/queue and stays
for what the gateway does not report yet (`busy_workers`).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import yaml
from PIL import Image
from remotegpu_base.protocol import PREFIX, Lease, ModelQueue, QueueSnapshot, WorkerAPIClient

from cluster.localcluster import free_port
from tests.fixtures.cluster import REPO, Kube, condition
from tests.fixtures.processes import stop
from tests.waiting import wait_for

TOKEN = "test-worker-token"
RBAC = REPO / "operator" / "rbac.yaml"


class QueueStub:
    """The gateway's GET /internal/v1/queue, and nothing else."""

    def __init__(self) -> None:
        self.version = 1
        self.models: dict[str, ModelQueue] = {}
        self.cond = threading.Condition()
        self.requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                if url.path != f"{PREFIX}/queue":
                    self.send_error(404)
                    return
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.send_error(401)
                    return
                q = parse_qs(url.query)
                since = int(q["since"][0]) if "since" in q else None
                wait = float(q.get("wait_seconds", ["0"])[0])
                stub.requests += 1
                with stub.cond:
                    if since is not None:
                        stub.cond.wait_for(lambda: stub.version > since, timeout=wait)
                    body = QueueSnapshot(version=stub.version, models=dict(stub.models)).model_dump_json()
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set(self, model: str, **fields: Any) -> float:
        """Sets a model's queue; returns the monotonic time of the change."""
        with self.cond:
            self.models[model] = ModelQueue(**fields)
            self.version += 1
            self.cond.notify_all()
            return time.monotonic()

    def close(self) -> None:
        with self.cond:
            self.version += 1
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()


class OperatorProc:
    """One `remotegpu operator` process; stopped by its pid."""

    def __init__(
        self,
        kube: Kube,
        kubeconfig: Path,
        namespace: str,
        gateway_url: str,
        log: Path,
        identity: str,
        extra_env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.log = log
        self.identity = identity
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "REMOTEGPU_WORKER_TOKEN": TOKEN,
            # A killed leader's Lease lapses within 10 s; a shorter one (renewed every third)
            # could lapse under a loaded machine's stalls, and its operator would stop.
            "REMOTEGPU_OPERATOR_LEASE_SECONDS": "10",
            "REMOTEGPU_OPERATOR_INTERVAL": "0.5",
            "POD_NAME": identity,
            **(extra_env or {}),
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)
        self._logf = open(log, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "remotegpu.cli",
                "operator",
                "--namespace",
                namespace,
                "--gateway-url",
                gateway_url,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=env,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_for(self._healthy, 30, f"operator {identity} /healthz")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"operator exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric_name, _, label_text = head.partition("{")
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                return float(value)
        return None

    def is_leader(self) -> bool:
        return self.metric("remotegpu_operator_leader") == 1.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        code = stop(self.proc, sig, timeout)
        self._logf.close()
        return code


@pytest.fixture(scope="session")
def gpu_nodes(kube: Kube) -> list[str]:
    """The KWOK GPU nodes, by name: where untainted GPU pods (the pre-warm DaemonSet's) go."""
    nodes = kube.get_json("nodes")["items"]
    return sorted(
        n["metadata"]["name"]
        for n in nodes
        if "nvidia.com/gpu" in n["status"].get("allocatable", {}) and not n["spec"].get("taints")
    )


@pytest.fixture(scope="session")
def rbac(kube: Kube) -> None:
    """The operator's rules, as written (ClusterRoles; bound per test namespace below)."""
    kube.apply_cluster_wide(RBAC)


def operator_kubeconfig(kube: Kube, namespace: str, out: Path) -> Path:
    """A kubeconfig for a ServiceAccount bound to exactly operator/rbac.yaml in `namespace`."""
    sa = "remotegpu-operator"
    kube.kubectl("create", "serviceaccount", sa, "-n", namespace)
    for role in ("remotegpu-operator", "remotegpu-operator-leader-election"):
        kube.kubectl(
            "create",
            "rolebinding",
            role,
            "-n",
            namespace,
            f"--clusterrole={role}",
            f"--serviceaccount={namespace}:{sa}",
        )
    token = kube.kubectl("create", "token", sa, "-n", namespace, "--duration=2h").stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    cfg = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "op", "context": {"cluster": "local", "user": sa, "namespace": namespace}}],
        "current-context": "op",
    }  # fmt: skip
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture
def queue() -> Iterator[QueueStub]:
    stub = QueueStub()
    yield stub
    stub.close()


class Operators:
    """Starts operator processes for one test namespace and stops all of them afterwards."""

    def __init__(self, kube: Kube, namespace: str, tmp: Path, gateway_url: str):
        self.kube, self.namespace, self.tmp, self.gateway_url = kube, namespace, tmp, gateway_url
        self.kubeconfig = operator_kubeconfig(kube, namespace, tmp / "operator.kubeconfig")
        self.procs: list[OperatorProc] = []

    def start(self, identity: str | None = None, gateway_url: str | None = None, **env: str) -> OperatorProc:
        identity = identity or f"op-{len(self.procs)}"
        p = OperatorProc(
            self.kube,
            self.kubeconfig,
            self.namespace,
            gateway_url or self.gateway_url,
            self.tmp / f"{identity}.log",
            identity,
            env,
        )
        self.procs.append(p)
        return p

    def leader(self, timeout: float = 20) -> OperatorProc:
        return wait_for(
            lambda: next((p for p in self.procs if p.proc.poll() is None and p.is_leader()), None),
            timeout,
            "a leader",
        )

    def logs(self) -> str:
        return "\n".join(f"== {p.identity}\n{p.log.read_text()[-6000:]}" for p in self.procs)

    def close(self) -> None:
        # Delete ImageModels while an operator still runs (kopf's finalizer), then stop every process.
        if any(p.proc.poll() is None for p in self.procs):
            self.kube.kubectl(
                "delete", "imagemodels", "--all", "-n", self.namespace, "--timeout=30s", check=False
            )
        for p in self.procs:
            p.stop()
        left = self.kube.kubectl(
            "get", "imagemodels", "-n", self.namespace, "-o", "name", check=False
        ).stdout.split()
        for name in left:  # an operator that died: drop the finalizer so the namespace can go
            self.kube.kubectl(
                "patch",
                name,
                "-n",
                self.namespace,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )


@pytest.fixture
def operators(
    kube: Kube,
    crd: None,
    rbac: None,
    namespace: str,
    tmp_path: Path,
    queue: QueueStub,
    request: pytest.FixtureRequest,
) -> Iterator[Operators]:
    ops = Operators(kube, namespace, tmp_path, queue.url)
    yield ops
    failed = getattr(request.node, "rep_call", None)
    ops.close()
    if failed is not None and failed.failed:
        print(ops.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


class GatewayProc:
    """A real `remotegpu gateway` (SQLite, --models-file) on loopback; stopped by its pid."""

    def __init__(self, tmp: Path, models: list[dict[str, Any]]):
        self.dir = tmp / f"gateway-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir()
        models_file = self.dir / "models.yaml"
        models_file.write_text(yaml.safe_dump_all(models))
        env = {**os.environ, "REMOTEGPU_WORKER_TOKEN": TOKEN}
        env.pop("KUBECONFIG", None)
        data = self.dir / "data"
        keys = subprocess.run(
            [
                sys.executable,
                "-m",
                "remotegpu.cli",
                "keys",
                "create",
                "--name",
                "test",
                "--data-dir",
                str(data),
            ],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        self.key = keys.stdout.strip().splitlines()[-1]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.dir / "gateway.log"
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "remotegpu.cli",
                "gateway",
                "--models-file",
                str(models_file),
                "--data-dir",
                str(data),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=env,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.worker = WorkerAPIClient(self.url, TOKEN)
        wait_for(self._up, 60, "gateway up")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"gateway exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
            )
        try:
            return self.worker.queue().version > 0
        except httpx.HTTPError:
            return False

    def submit(self, model: str, n: int = 1, **options: Any) -> list[str]:
        ids = []
        for _ in range(n):
            r = self.http.post(
                "/v1/inference/image",
                json={"model": model, "prompt": "a red fox", **options},
                headers={"Authorization": f"Bearer {self.key}"},
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
        return ids

    def lease(self, model: str, worker_id: str) -> Lease:
        lease = self.worker.lease(model, worker_id, wait_seconds=5)
        assert lease is not None, "nothing to lease"
        return lease

    def complete(self, lease: Lease) -> None:
        buf = io.BytesIO()
        Image.new("RGB", (lease.request.width, lease.request.height), (10, 120, 30)).save(buf, format="PNG")
        self.worker.complete(lease.job_id, lease.lease_token, buf.getvalue())

    def depth(self, model: str) -> int:
        return self.worker.queue().models.get(model, ModelQueue()).depth

    def stop(self) -> None:
        self.http.close()
        self.worker.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._logf.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProc]]:
    """gateway(model, ...) starts a real gateway serving those ImageModels."""
    started: list[GatewayProc] = []

    def start(*models: dict[str, Any]) -> GatewayProc:
        g = GatewayProc(tmp_path, list(models))
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


def apply(kube: Kube, namespace: str, obj: dict[str, Any]) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def wait_condition(kube: Kube, ns: str, name: str, type_: str, what: str, **want: str) -> dict[str, Any]:
    """The ImageModel once its condition `type_` has the wanted fields (status="False", reason=...)."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (
            (o := kube.find("imagemodel", name, ns))
            and all(condition(o, type_).get(k) == v for k, v in want.items())
            and o
        ),
        90,
        what,
    )


def wait_event(kube: Kube, namespace: str, name: str, reason: str, timeout: float = 60) -> dict[str, Any]:
    """The first event `reason` about `name`. Waited for: kopf posts events in the background,
    so one may arrive after the status it came with."""

    def event() -> dict[str, Any] | None:
        events = kube.get_json("events", namespace=namespace, fields=f"involvedObject.name={name}")["items"]
        return next((e for e in events if e["reason"] == reason), None)

    return wait_for(event, timeout, f"a {reason} event for {name}")  # type: ignore[no-any-return]


# The pod-ready delay KWOK applies to a pod carrying it (the stages the cluster loads).
KWOK_DELAY = "pod-ready.stage.kwok.x-k8s.io/delay"


def dep_name(name: str) -> str:
    return f"{name}-worker"


def replicas_of(kube: Kube, ns: str, name: str) -> int | None:
    d = kube.find("deployment", dep_name(name), ns)
    return None if d is None else d["spec"]["replicas"]


def state_of(kube: Kube, ns: str, name: str) -> str | None:
    im = kube.find("imagemodel", name, ns)
    return ((im or {}).get("status") or {}).get("state")
