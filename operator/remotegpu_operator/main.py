"""`remotegpu operator`: leader election, then kopf; /healthz, /readyz and /metrics throughout.

Several replicas may run: each serves health and metrics, one holds the
coordination.k8s.io Lease (leader.py) and runs kopf; the others wait to take over.
Settings beyond the command line come from the environment:

    REMOTEGPU_GATEWAY_URL            the gateway, for queue depth (--gateway-url wins)
    REMOTEGPU_WORKER_TOKEN           the internal API token (the operator reads the queue with it)
    REMOTEGPU_WORKER_GATEWAY_URL     the gateway URL written into worker pods (default: the same)
    REMOTEGPU_WORKER_TOKEN_SECRET    Secret holding the workers' token (default remotegpu-worker-token)
    REMOTEGPU_WORKER_TOKEN_SECRET_KEY  its key (default token)
    REMOTEGPU_OPERATOR_INTERVAL      seconds between autoscaler ticks without queue events (default 2)
    REMOTEGPU_OPERATOR_QUEUE_WAIT_SECONDS  long-poll length (default 25); the queue counts as
                                     unknown (replicas held) after that plus 5 s without an answer
    REMOTEGPU_OPERATOR_LEADER_ELECT  false to run without a Lease (a single replica)
    REMOTEGPU_OPERATOR_LEASE_NAMESPACE  where the Lease lives (default $POD_NAMESPACE, else the
                                     first --namespace, else default)
    REMOTEGPU_OPERATOR_LEASE_NAME    (default remotegpu-operator)
    REMOTEGPU_OPERATOR_LEASE_SECONDS lease duration (default 15; renewed every third of it)
    POD_NAME                         this replica's identity in the Lease (default host-pid)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from remotegpu_base import kube
from remotegpu_base.protocol import WORKER_TOKEN_ENV

from remotegpu_operator import handlers, metrics
from remotegpu_operator.deployment import WorkerSettings
from remotegpu_operator.leader import LeaderElector, LeaseConfig
from remotegpu_operator.queuewatch import QueueWatcher

log = logging.getLogger("remotegpu_operator")

FINALIZER = "remotegpu.ai/operator"


def operator_settings() -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    # A watch the API server silently stops answering must not hang the operator forever
    # (kopf #585, #847): ask the server to end each watch within a minute, give up on
    # the client side a little later, and reconnect (kopf resumes from the last list).
    s.watching.server_timeout = 60
    s.watching.client_timeout = 90
    s.watching.connect_timeout = 10
    s.networking.request_timeout = 30
    s.networking.connect_timeout = 10
    # Leader election is ours (a Lease); kopf's peering would need its own CRDs.
    s.peering.standalone = True
    # Serve the given namespaces only; no cluster-wide watch of CRDs or namespaces.
    s.scanning.disabled = True
    # kopf's own log lines become Events only for warnings and errors; ours are explicit.
    s.posting.level = logging.WARNING
    s.persistence.finalizer = FINALIZER
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="remotegpu.ai")
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="remotegpu.ai", key="last-handled-configuration"
    )
    s.execution.max_workers = 8
    return s


class Health:
    """/healthz (the event loop is alive), /readyz, /metrics — for leader and standbys alike."""

    def __init__(self, host: str, port: int):
        self.beat = time.monotonic()
        self.role = "starting"
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    stale = time.monotonic() - health.beat > 30
                    self._send(503 if stale else 200, b"event loop stuck\n" if stale else b"ok\n")
                elif path == "/readyz":
                    self._send(200, f"{health.role}\n".encode())
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="health", daemon=True).start()

    async def heartbeat(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(1.0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


async def _wait(flag: asyncio.Event, seconds: float) -> bool:
    """Sleeps `seconds` or until `flag` is set; True if it was set."""
    try:
        await asyncio.wait_for(flag.wait(), timeout=seconds)
        return True
    except TimeoutError:
        return False


async def _connect(stop: asyncio.Event) -> kube.Api | None:
    """The Kubernetes client, once the API server answers (None: stopped while waiting).

    No credentials at all fail at once (kr8s: "Unable to find valid credentials").
    """
    while True:
        try:
            return await kube.connect()
        except (*kube.ERRORS, TimeoutError) as e:
            log.warning("cannot reach the Kubernetes API server (%s); retrying in 2 s", e or type(e).__name__)
        if await _wait(stop, 2.0):
            return None


async def serve(args: argparse.Namespace) -> int:
    namespaces: list[str] = list(args.namespace or [])
    gateway_url = args.gateway_url or os.environ.get("REMOTEGPU_GATEWAY_URL")
    token = os.environ.get(WORKER_TOKEN_ENV, "")
    worker = WorkerSettings(
        gateway_url=os.environ.get("REMOTEGPU_WORKER_GATEWAY_URL")
        or gateway_url
        or "http://remotegpu-gateway:8000",
        token_secret=os.environ.get("REMOTEGPU_WORKER_TOKEN_SECRET", "remotegpu-worker-token"),
        token_secret_key=os.environ.get("REMOTEGPU_WORKER_TOKEN_SECRET_KEY", "token"),
    )
    health = Health(args.host, args.port)
    beat = asyncio.create_task(health.heartbeat())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    api = await _connect(stop)
    if api is None:
        await _shutdown(health, beat)
        return 0
    elector: LeaderElector | None = None
    if os.environ.get("REMOTEGPU_OPERATOR_LEADER_ELECT", "true").lower() not in ("0", "false", "no"):
        lease_seconds = _env_float("REMOTEGPU_OPERATOR_LEASE_SECONDS", 15.0)
        elector = LeaderElector(
            LeaseConfig(
                namespace=os.environ.get("REMOTEGPU_OPERATOR_LEASE_NAMESPACE")
                or os.environ.get("POD_NAMESPACE")
                or (namespaces[0] if namespaces else "default"),
                name=os.environ.get("REMOTEGPU_OPERATOR_LEASE_NAME", "remotegpu-operator"),
                identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
                lease_seconds=lease_seconds,
                renew_seconds=lease_seconds / 3,
                renew_deadline=lease_seconds * 2 / 3,
            ),
            api,
        )
        health.role = "standby"
        log.info(
            "waiting for the leader Lease %s/%s as %s",
            elector.config.namespace,
            elector.config.name,
            elector.config.identity,
        )
        while True:
            try:
                if await elector.try_acquire_or_renew():
                    break
            except Exception as e:
                log.warning("leader election: %s", e)
            if await _wait(stop, elector.config.renew_seconds):
                await _shutdown(health, beat)
                return 0

    health.role = "leader"
    metrics.LEADER.set(1)
    # Long-poll for up to `wait` s; no answer for `wait` + 5 s makes the queue unknown.
    wait = _env_float("REMOTEGPU_OPERATOR_QUEUE_WAIT_SECONDS", 25.0)
    watcher = QueueWatcher(gateway_url, token, wait_seconds=wait, stale_after=wait + 5)
    watcher.start()
    handlers.configure(
        handlers.Context(
            api=api,
            worker=worker,
            queue=watcher,
            interval=_env_float("REMOTEGPU_OPERATOR_INTERVAL", 2.0),
            namespaces=namespaces,
            sweep_interval=_env_float("REMOTEGPU_OPERATOR_CACHE_SWEEP_SECONDS", 60.0),
        )
    )
    kopf_stop = asyncio.Event()
    lost = asyncio.Event()

    async def keep_lease() -> None:
        assert elector is not None
        if await elector.hold(kopf_stop):
            lost.set()
            kopf_stop.set()

    async def forward_stop() -> None:
        await stop.wait()
        kopf_stop.set()

    kopf_ready = asyncio.Event()

    async def own_signals() -> None:
        # kopf installs its own SIGINT/SIGTERM handlers when it starts; put ours back, so a
        # signal stops kopf through its stop flag (at once) rather than its signal path
        # (which first waits 5 s for the task that waits on that very stop flag).
        await kopf_ready.wait()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    tasks = [asyncio.create_task(forward_stop()), asyncio.create_task(own_signals())]
    if elector is not None:
        tasks.append(asyncio.create_task(keep_lease()))
    log.info(
        "reconciling ImageModels in %s; queue from %s",
        ", ".join(namespaces) or "all namespaces",
        gateway_url or "nowhere (no gateway URL)",
    )
    try:
        await kopf.operator(
            registry=kopf.get_default_registry(),
            settings=operator_settings(),
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            stop_flag=kopf_stop,
            ready_flag=kopf_ready,
        )
    finally:
        kopf_stop.set()
        for t in tasks:
            t.cancel()
        watcher.stop()
        metrics.LEADER.set(0)
        if elector is not None and not lost.is_set():
            await elector.release()
        await _shutdown(health, beat)
    return 1 if lost.is_set() else 0


async def _shutdown(health: Health, beat: asyncio.Task) -> None:
    beat.cancel()
    health.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return asyncio.run(serve(args))
