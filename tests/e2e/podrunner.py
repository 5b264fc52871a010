"""A test-only kubelet: runs the pods scheduled on one fake node as local processes.

KWOK simulates every other node's pods without running anything. For the pods the
scheduler places on the runner's node, this component plays the kubelet:

- maps the container image to the project's own entrypoint (`remotegpu ...` from the
  virtual environment), resolves the pod's env (values, Secret and ConfigMap refs,
  the downward API), and gives the pod its own loopback address (127.0.0.x) that its
  `--host` binds to and that becomes its pod IP;
- resolves the Service names its env and args use (http://SERVICE:PORT) to the
  addresses of ready pods behind that Service on this node, since there is no
  cluster DNS or kube-proxy here;
- gives the process a service-account kubeconfig (a token from the TokenRequest API)
  where a real pod would get the mounted token;
- reports the pod Running, and Ready only while its readiness probe answers;
- on deletion sends SIGTERM, waits the grace period (then SIGKILL) and removes the pod.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml
from kubernetes import client, config, watch

RUNNER_LABEL = "remotegpu.ai/pod-runner"
# The project's images and their ENTRYPOINT (Dockerfile, inference-worker/Dockerfile).
PROJECT_IMAGES = {"ghcr.io/remotegpu/remotegpu": ["remotegpu"], "ghcr.io/remotegpu/worker": ["remotegpu"]}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class RunningPod:
    namespace: str
    name: str
    uid: str
    ip: str
    argv: list[str]
    env: dict[str, str]
    root: Path
    container: str
    image: str
    readiness: dict | None
    grace_seconds: int
    labels: dict[str, str] = field(default_factory=dict)
    restart_policy: str = "Always"
    proc: subprocess.Popen | None = None
    ready: bool = False
    stopping: bool = False
    restarts: int = 0
    restart_at: float = 0.0  # monotonic time of the next restart after a crash
    started_at: str = field(default_factory=now)

    @property
    def log_path(self) -> Path:
        return self.root / "container.log"


class PodRunner:
    def __init__(
        self,
        kubeconfig: Path,
        node_name: str,
        workdir: Path,
        venv_bin: Path,
        extra_env: dict[str, str] | None = None,
        first_ip: str = "127.0.0.10",
        first_service_ip: str = "127.0.1.10",
        image_entrypoints: dict[str, list[str]] | None = None,
    ):
        self.image_entrypoints = image_entrypoints or dict(PROJECT_IMAGES)
        self.kubeconfig = kubeconfig
        self.node_name = node_name
        self.workdir = workdir
        self.venv_bin = venv_bin
        self.extra_env = extra_env or {}
        self._next_ip = ipaddress.ip_address(first_ip)
        self._next_service_ip = ipaddress.ip_address(first_service_ip)
        self._proxies: dict[tuple[str, str, int], ServiceProxy] = {}
        self._api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self._api)
        self.pods: dict[str, RunningPod] = {}  # uid -> pod
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._register_node()
        for target in (self._watch_pods, self._heartbeat_node, self._probe_loop):
            t = threading.Thread(target=target, daemon=True, name=f"podrunner-{target.__name__}")
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            pods = list(self.pods.values())
        for p in pods:
            self._terminate(p, grace=10)
        for proxy in list(self._proxies.values()):
            proxy.close()
        for t in self._threads:
            t.join(timeout=5)

    # -- node --------------------------------------------------------------------------
    def _register_node(self) -> None:
        capacity = {"cpu": "64", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "4"}
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    RUNNER_LABEL: "true",
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                },
            },
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        try:
            self.core.create_node(body)
        except client.ApiException as e:
            if e.status != 409:
                raise
        self._node_status()

    def _node_status(self) -> None:
        t = now()
        conditions = [
            {
                "type": "Ready",
                "status": "True",
                "reason": "PodRunnerReady",
                "message": "test pod runner",
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }
        ]
        for kind in ("MemoryPressure", "DiskPressure", "PIDPressure"):
            conditions.append(
                {
                    "type": kind,
                    "status": "False",
                    "reason": "PodRunner",
                    "message": "",
                    "lastHeartbeatTime": t,
                    "lastTransitionTime": t,
                }
            )
        self.core.patch_node_status(
            self.node_name,
            {
                "status": {
                    "conditions": conditions,
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                }
            },
        )

    def _heartbeat_node(self) -> None:
        while not self._stop.wait(10):
            try:
                self._node_status()
            except Exception:  # noqa: BLE001 - keep beating through API hiccups
                pass

    # -- pods --------------------------------------------------------------------------
    def _watch_pods(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self._stop.is_set():
            try:
                w = watch.Watch()
                for ev in w.stream(
                    self.core.list_pod_for_all_namespaces, field_selector=selector, timeout_seconds=30
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    try:
                        self._on_pod(ev["type"], ev["object"])
                    except Exception:  # noqa: BLE001 - one bad pod must not stop the others
                        self._log(
                            f"handling {ev['type']} {ev['object'].metadata.name}:\n{traceback.format_exc()}"
                        )
            except Exception:  # noqa: BLE001 - re-list after a broken watch
                self._log(f"watch broke:\n{traceback.format_exc()}")
                time.sleep(0.5)

    def _on_pod(self, kind: str, pod: client.V1Pod) -> None:
        uid = pod.metadata.uid
        with self._lock:
            running = self.pods.get(uid)
        if kind == "DELETED":
            if running:
                threading.Thread(target=self._terminate, args=(running,), daemon=True).start()
            return
        if pod.metadata.deletion_timestamp is not None:
            if running and not running.stopping:
                running.stopping = True
                threading.Thread(target=self._terminate_and_remove, args=(running, pod), daemon=True).start()
            elif not running:
                self._remove(pod)
            return
        if running is None and pod.status.phase in (None, "Pending"):
            try:
                self._start(pod)
            except Exception as e:  # noqa: BLE001 - report the failure on the pod like a kubelet
                self._log(f"starting {pod.metadata.name}:\n{traceback.format_exc()}")
                self._patch_status(
                    pod.metadata.namespace,
                    pod.metadata.name,
                    {"phase": "Failed", "reason": "PodRunnerError", "message": str(e)[:1000]},
                )

    def _allocate_ip(self) -> str:
        with self._lock:
            ip = str(self._next_ip)
            self._next_ip += 1
            return ip

    def _start(self, pod: client.V1Pod) -> None:
        ns, name = pod.metadata.namespace, pod.metadata.name
        container = pod.spec.containers[0]
        ip = self._allocate_ip()
        podroot = self.workdir / ns / name
        podroot.mkdir(parents=True, exist_ok=True)
        # Volumes: each PVC or emptyDir becomes a folder; mount paths are rewritten in env and args.
        mounts = self._mounts(pod, container, podroot)
        entrypoint = container.command or self._entrypoint(container.image)
        argv = [self._rewrite(pod, a, ip, mounts) for a in [*entrypoint, *(container.args or [])]]
        if argv[0] == "remotegpu" or argv[0].endswith("/remotegpu"):
            argv[0] = str(self.venv_bin / "remotegpu")
        env = {e.name: self._rewrite(pod, self._env_value(pod, e), ip, mounts) for e in container.env or []}
        # What a real node provides: the image's PATH, and the service account's credentials.
        env = {
            "PATH": f"{self.venv_bin}:{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/root"),
            "HF_HUB_OFFLINE": "1",
            **self.extra_env,
            **env,
        }
        kubeconfig = self._service_account_kubeconfig(pod, podroot)
        if kubeconfig:
            env["KUBECONFIG"] = str(kubeconfig)
        running = RunningPod(
            namespace=ns,
            name=name,
            uid=pod.metadata.uid,
            ip=ip,
            argv=argv,
            env=env,
            root=podroot,
            container=container.name,
            image=container.image,
            readiness=_probe(container.readiness_probe, container),
            grace_seconds=pod.spec.termination_grace_period_seconds or 30,
            labels=dict(pod.metadata.labels or {}),
            restart_policy=pod.spec.restart_policy or "Always",
        )
        self._spawn(running)
        with self._lock:
            self.pods[pod.metadata.uid] = running
        self._report(running)

    def _spawn(self, p: RunningPod) -> None:
        with open(p.root / "container.log", "ab") as logf:
            p.proc = subprocess.Popen(
                p.argv,
                env=p.env,
                cwd=p.root,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        p.started_at = now()

    def _report(self, p: RunningPod, terminal: bool = False) -> None:
        t = now()
        assert p.proc is not None
        exit_code = p.proc.poll()
        phase = "Running"
        if exit_code is None:
            state: dict = {"running": {"startedAt": p.started_at}}
        elif terminal:
            phase = "Succeeded" if exit_code == 0 else "Failed"
            state = {
                "terminated": {
                    "exitCode": exit_code,
                    "finishedAt": t,
                    "reason": "Completed" if exit_code == 0 else "Error",
                }
            }
        else:
            state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"exited with {exit_code}"}}
        ready = "True" if p.ready else "False"
        self._patch_status(
            p.namespace,
            p.name,
            {
                "phase": phase,
                "podIP": p.ip,
                "podIPs": [{"ip": p.ip}],
                "hostIP": "127.0.0.1",
                "startTime": p.started_at,
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": p.started_at},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": p.started_at},
                    {"type": "ContainersReady", "status": ready, "lastTransitionTime": t},
                    {"type": "Ready", "status": ready, "lastTransitionTime": t},
                ],
                "containerStatuses": [
                    {
                        "name": p.container,
                        "image": p.image,
                        "imageID": "",
                        "ready": p.ready,
                        "restartCount": p.restarts,
                        "started": exit_code is None,
                        "state": state,
                    }
                ],
            },
        )

    def _patch_status(self, ns: str, name: str, status: dict) -> None:
        try:
            self.core.patch_namespaced_pod_status(name, ns, {"status": status})
        except client.ApiException as e:
            if e.status != 404:
                raise

    def _probe_loop(self) -> None:
        """Readiness probes, and restarts with back-off (restartPolicy Always) like a kubelet."""
        with httpx.Client(timeout=1.0) as http:
            while not self._stop.wait(0.2):
                with self._lock:
                    pods = [p for p in self.pods.values() if not p.stopping]
                for p in pods:
                    assert p.proc is not None
                    code = p.proc.poll()
                    alive = code is None
                    if not alive and (
                        p.restart_policy == "Never" or (p.restart_policy == "OnFailure" and code == 0)
                    ):
                        p.ready, p.stopping = False, True  # finished for good (a Job's pod)
                        self._report(p, terminal=True)
                        continue
                    if not alive and p.restart_at == 0.0:
                        p.restart_at = time.monotonic() + min(30.0, 2.0**p.restarts)
                    elif not alive and time.monotonic() >= p.restart_at and not p.stopping:
                        p.restarts += 1
                        p.restart_at = 0.0
                        self._spawn(p)
                        alive = True
                    ready = alive and _probe_ok(http, p)
                    if ready != p.ready or not alive:
                        p.ready = ready
                        try:
                            self._report(p)
                        except Exception:  # noqa: BLE001 - next round reports again
                            pass

    def _terminate(self, p: RunningPod, grace: int | None = None) -> None:
        p.stopping = True
        if p.proc is not None and p.proc.poll() is None:
            try:
                os.killpg(p.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.proc.wait(timeout=grace if grace is not None else p.grace_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait()
        with self._lock:
            self.pods.pop(p.uid, None)

    def _terminate_and_remove(self, p: RunningPod, pod: client.V1Pod) -> None:
        try:
            grace = pod.metadata.deletion_grace_period_seconds
            self._terminate(p, grace=grace if grace is not None else p.grace_seconds)
            self._remove(pod)
        except Exception:  # noqa: BLE001
            self._log(f"terminating {p.name}:\n{traceback.format_exc()}")

    def _log(self, msg: str) -> None:
        with open(self.workdir / "podrunner.log", "a") as f:
            f.write(f"{now()} {msg}\n")

    def _remove(self, pod: client.V1Pod) -> None:
        try:
            self.core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                # In the body: with a body, the API server ignores the query parameters.
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=pod.metadata.uid)
                ),
            )
        except client.ApiException as e:
            if e.status not in (404, 409):
                raise

    # -- env, volumes, names -------------------------------------------------------------
    def _env_value(self, pod: client.V1Pod, e: client.V1EnvVar) -> str:
        if e.value is not None:
            return e.value
        src = e.value_from
        if src is None:
            return ""
        ns = pod.metadata.namespace
        if src.secret_key_ref:
            secret = self.core.read_namespaced_secret(src.secret_key_ref.name, ns)
            return base64.b64decode(secret.data[src.secret_key_ref.key]).decode()
        if src.config_map_key_ref:
            return self.core.read_namespaced_config_map(src.config_map_key_ref.name, ns).data[
                src.config_map_key_ref.key
            ]
        if src.field_ref:
            path = src.field_ref.field_path
            return {
                "metadata.name": pod.metadata.name,
                "metadata.namespace": ns,
                "metadata.uid": pod.metadata.uid,
                "spec.nodeName": pod.spec.node_name,
                "spec.serviceAccountName": pod.spec.service_account_name or "default",
            }.get(path, "")
        return ""

    def _mounts(self, pod: client.V1Pod, container: client.V1Container, podroot: Path) -> dict[str, str]:
        by_name = {}
        for v in pod.spec.volumes or []:
            if v.persistent_volume_claim:
                by_name[v.name] = (
                    self.workdir / "pvc" / pod.metadata.namespace / v.persistent_volume_claim.claim_name
                )
            else:
                by_name[v.name] = podroot / "volumes" / v.name
        mounts = {}
        for m in container.volume_mounts or []:
            if m.name in by_name:
                by_name[m.name].mkdir(parents=True, exist_ok=True)
                mounts[m.mount_path] = str(by_name[m.name])
        return mounts

    def _entrypoint(self, image: str) -> list[str]:
        """The image's ENTRYPOINT, for the images this project builds (see the Dockerfiles)."""
        repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        if repository in self.image_entrypoints:
            return list(self.image_entrypoints[repository])
        raise RuntimeError(f"image {image} has no known entrypoint; give the container a command")

    def _rewrite(self, pod: client.V1Pod, value: str, ip: str, mounts: dict[str, str]) -> str:
        if value.startswith("--") and "=" in value:  # --flag=VALUE
            flag, _, rest = value.partition("=")
            return f"{flag}={self._rewrite(pod, rest, ip, mounts)}"
        if value == "0.0.0.0":
            return ip
        for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return local + value[len(mount_path.rstrip("/")) :]
        return re.sub(r"(https?://)([a-z0-9][a-z0-9.-]*)(:\d+)?", lambda m: self._resolve(pod, m), value)

    def _resolve(self, pod: client.V1Pod, m: re.Match) -> str:
        """http://SERVICE[.NS[.svc...]]:PORT -> the Service's stable loopback address (see ServiceProxy)."""
        scheme, host, port = m.group(1), m.group(2), m.group(3)
        parts = host.split(".")
        svc_name = parts[0]
        ns = parts[1] if len(parts) > 1 and parts[1] != "svc" else pod.metadata.namespace
        try:
            svc = self.core.read_namespaced_service(svc_name, ns)
        except client.ApiException:
            return m.group(0)  # not a Service: leave it alone
        svc_port = int(port[1:]) if port else 80
        target = svc_port
        for sp in svc.spec.ports or []:
            if sp.port == svc_port and sp.target_port is not None and str(sp.target_port).isdigit():
                target = int(sp.target_port)
        key = (ns, svc_name, svc_port)
        with self._lock:
            proxy = self._proxies.get(key)
            if proxy is None:
                ip = str(self._next_service_ip)
                self._next_service_ip += 1
                proxy = ServiceProxy(self, ns, svc.spec.selector or {}, ip, svc_port, target)
                self._proxies[key] = proxy
        return f"{scheme}{proxy.ip}:{svc_port}"

    def backends(self, ns: str, selector: dict[str, str]) -> list[RunningPod]:
        """Ready pods on this node whose labels match a Service selector."""
        with self._lock:
            pods = list(self.pods.values())
        return [
            p
            for p in pods
            if p.namespace == ns
            and p.ready
            and not p.stopping
            and all(p.labels.get(k) == v for k, v in selector.items())
        ]

    def _service_account_kubeconfig(self, pod: client.V1Pod, podroot: Path) -> Path | None:
        if pod.spec.automount_service_account_token is False:
            return None
        sa = pod.spec.service_account_name or "default"
        ns = pod.metadata.namespace
        req = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=86400)
        )
        token = self.core.create_namespaced_service_account_token(sa, ns, req).status.token
        path = podroot / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "local", "cluster": self._server}],
                    "users": [{"name": sa, "user": {"token": token}}],
                    "contexts": [
                        {"name": "sa", "context": {"cluster": "local", "user": sa, "namespace": ns}}
                    ],
                    "current-context": "sa",
                }
            )
        )
        return path

    def logs(self, namespace: str, name_prefix: str, tail: int | None = 4000) -> str:
        """Each matching pod's log (its last `tail` characters; None: all of it)."""
        out = []
        for f in sorted((self.workdir / namespace).glob(f"{name_prefix}*/container.log")):
            text = f.read_text(errors="replace")
            out.append(f"--- {f.parent.name}\n{text if tail is None else text[-tail:]}")
        return "\n".join(out)

    def processes(self, namespace: str, name_prefix: str = "") -> list[RunningPod]:
        with self._lock:
            return [
                p for p in self.pods.values() if p.namespace == namespace and p.name.startswith(name_prefix)
            ]


class ServiceProxy:
    """kube-proxy for one Service port: a stable loopback address that forwards each
    connection to a ready pod behind the Service, so clients survive pod restarts."""

    def __init__(self, runner: PodRunner, ns: str, selector: dict[str, str], ip: str, port: int, target: int):
        self.runner, self.ns, self.selector = runner, ns, selector
        self.ip, self.port, self.target = ip, port, target
        self._server = socket.create_server((ip, port))
        self._closed = False
        self._turn = 0
        threading.Thread(target=self._accept, daemon=True, name=f"svc-{ip}:{port}").start()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + 30  # a restarting backend gets this long to turn Ready
        while not (backends := self.runner.backends(self.ns, self.selector)):
            if time.monotonic() > deadline or self._closed:
                conn.close()
                return
            time.sleep(0.1)
        self._turn += 1
        backend = backends[self._turn % len(backends)]
        try:
            upstream = socket.create_connection((backend.ip, self.target), timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=_pipe, args=(conn, upstream), daemon=True).start()
        _pipe(upstream, conn)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _probe(probe: client.V1Probe | None, container: client.V1Container) -> dict | None:
    if probe is None or probe.http_get is None:
        return None
    port = probe.http_get.port
    if not str(port).isdigit():  # a named container port
        port = next(p.container_port for p in container.ports or [] if p.name == port)
    return {"path": probe.http_get.path or "/", "port": int(port)}


def _probe_ok(http: httpx.Client, p: RunningPod) -> bool:
    if p.readiness is None:
        return True
    try:
        return http.get(f"http://{p.ip}:{p.readiness['port']}{p.readiness['path']}").status_code < 400
    except httpx.HTTPError:
        return False


def tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="podrunner-"))
