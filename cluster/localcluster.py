"""A real Kubernetes control plane as local processes, with KWOK-simulated and real nodes.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as local
processes; KWOK plays the kubelet for fake CPU and GPU nodes (`nvidia.com/gpu`
allocatable), so Deployments get scheduled Pods that turn Ready after a
configurable delay. With `real_nodes` (or `add_real_nodes` later), kubelets with
their own containerd run containers beside them (cluster/realnodes.py); the API
server advertises node 0's bridge address, where the pods reach it. Used by `make
cluster` and by the tests' session fixtures.

    python -m cluster.localcluster up [--state-dir DIR]    # prints the kubeconfig path last
    python -m cluster.localcluster down [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster import images
from cluster.realnodes import API_RELAY_IP, Node, RealNodes

HERE = Path(__file__).resolve().parent
DEFAULT_STATE_DIR = HERE.parent / ".cluster"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# Pods may override the ready delay with this annotation (a Go duration such as "3s").
POD_READY_DELAY_ANNOTATION = "pod-ready.stage.kwok.x-k8s.io/delay"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


@dataclass
class ClusterConfig:
    cpu_nodes: int = 2
    gpu_nodes: int = 2
    gpus_per_node: int = 2
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    # Delay before a scheduled pod turns Ready (the "starting" phase), in ms.
    pod_ready_delay_ms: int = 0
    extra_nodes: list[dict] = field(default_factory=list)
    # Real nodes (kubelet + containerd each), with this many fake GPUs each.
    real_nodes: int = 0
    real_node_gpus: int = 2


def log(msg: str) -> None:
    print(f"[cluster] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def bin_dir() -> Path:
    """Builds the binaries once (cached outside the repo) and returns their folder."""
    out = subprocess.run([str(HERE / "build.sh")], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def pinned(name: str) -> str:
    """A version pinned in cluster/versions.env: pinned("KUBE") is KUBE_VERSION's value."""
    m = re.search(rf"^{name}_VERSION=(\S+)", (HERE / "versions.env").read_text(), re.M)
    if not m:
        raise KeyError(f"{name}_VERSION is not in {HERE / 'versions.env'}")
    return m.group(1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("genrsa", "-out", "ca.key", "2048", cwd=pki)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=remotegpu-local-ca",
        "-days",
        "3650",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    sans = (
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    )
    for name, subj, ext in [
        ("apiserver", "/CN=kube-apiserver", sans),
        ("admin", "/O=system:masters/CN=admin", None),
    ]:
        _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
        _openssl("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr", cwd=pki)
        extfile = pki / f"{name}.ext"
        extfile.write_text((ext or "extendedKeyUsage=clientAuth") + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            str(extfile),
            "-out",
            f"{name}.crt",
            cwd=pki,
        )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, pki: Path) -> None:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "remotegpu-local",
                "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {"client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")},
            }
        ],
        "contexts": [{"name": "remotegpu-local", "context": {"cluster": "remotegpu-local", "user": "admin"}}],
        "current-context": "remotegpu-local",
    }
    path.write_text(yaml.safe_dump(cfg))


def write_stages(path: Path, bins: Path, pod_ready_delay_ms: int) -> None:
    """KWOK 0.8 stages: node initialise + heartbeat, pod ready (with a delay) + complete + delete."""
    stage_dir = bins / "stages"
    docs = []
    for name in ["node-initialize", "node-heartbeat", "pod-ready", "pod-complete", "pod-delete"]:
        doc = yaml.safe_load((stage_dir / f"{name}.yaml").read_text())
        if name == "pod-ready":
            doc["spec"]["delay"] = {
                "durationMilliseconds": pod_ready_delay_ms,
                "durationFrom": {"expressionFrom": f'.metadata.annotations["{POD_READY_DELAY_ANNOTATION}"]'},
            }
        docs.append(doc)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def node_manifest(name: str, cpu: str, memory: str, gpus: int = 0, product: str | None = None) -> dict:
    # ephemeral-storage too, as a kubelet reports it: worker pods request some (issue 16).
    capacity = {"cpu": cpu, "memory": memory, "ephemeral-storage": "500Gi", "pods": "110"}
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
    }
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
        labels[GPU_PRODUCT_LABEL] = product or "fake-gpu"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {FAKE_NODE_ANNOTATION: "fake"}},
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "nodeInfo": {"kubeletVersion": "fake", "architecture": "amd64", "operatingSystem": "linux"},
        },
    }


class Cluster:
    """Starts and stops the processes of one local cluster, tracked by pid files in its state dir."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir.resolve()
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.pid_dir = self.state_dir / "pids"
        self.log_dir = self.state_dir / "logs"

    # -- processes -------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        (self.pid_dir / f"{name}.pid").write_text(str(proc.pid))

    def _alive(self, name: str) -> bool:
        pidf = self.pid_dir / f"{name}.pid"
        if not pidf.exists():
            return False
        try:
            os.kill(int(pidf.read_text()), 0)
            return True
        except (ProcessLookupError, ValueError):
            return False

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bins / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            text=True,
            capture_output=True,
            check=check,
        )

    # -- lifecycle -------------------------------------------------------------------
    def real_nodes(self, count: int | None = None) -> RealNodes:
        if count is None:
            count = self._meta().get("real_nodes", 0) if (self.state_dir / "cluster.json").exists() else 0
        return RealNodes(self.state_dir, self.bins, self._spawn, self.kubectl, log, count)

    def up(self, config: ClusterConfig, timeout: float = 180.0) -> Path:
        self.bins = bin_dir()
        if self.kubeconfig.exists() and self._alive("kube-apiserver"):
            log(f"already running (state in {self.state_dir})")
            return self.kubeconfig
        self.down(quiet=True)
        b = self.bins
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        pki = self.state_dir / "pki"
        log("creating certificates")
        make_certs(pki)
        etcd_port, etcd_peer, api_port, kwok_port = free_port(), free_port(), free_port(), free_port()
        server = f"https://127.0.0.1:{api_port}"
        write_kubeconfig(self.kubeconfig, server, pki)
        self._write_meta({"server": server, "api_port": api_port, "bin": str(b), "real_nodes": 0})

        log(f"starting etcd on 127.0.0.1:{etcd_port}")
        self._spawn(
            "etcd",
            [
                str(b / "etcd"),
                "--data-dir",
                str(self.state_dir / "etcd"),
                "--name",
                "local",
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"local=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes",
                str(2 * 1024**3),
                "--log-level",
                "warn",
            ],
        )
        log(f"starting kube-apiserver on {server}")
        self._spawn(
            "kube-apiserver",
            [
                str(b / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                # The `kubernetes` Service's endpoint: pods on real nodes reach the API
                # server there (a relay to the loopback port; realnodes.py).
                f"--advertise-address={API_RELAY_IP}",
                f"--secure-port={api_port}",
                # logs/exec/port-forward reach the real nodes' kubelets at their bridge address.
                "--kubelet-preferred-address-types=InternalIP",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=Node,RBAC",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--event-ttl=1h",
                "--v=0",
            ],
        )
        self._wait_ready(server, pki, timeout)
        log("starting kube-controller-manager and kube-scheduler")
        self._spawn(
            "kube-controller-manager",
            [
                str(b / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(b / "kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
            ],
        )
        stages = self.state_dir / "kwok-stages.yaml"
        write_stages(stages, b, config.pod_ready_delay_ms)
        log("starting kwok")
        self._spawn(
            "kwok",
            [
                str(b / "kwok"),
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                f"--config={stages}",
                f"--server-address=127.0.0.1:{kwok_port}",
                "--node-lease-duration-seconds=0",
            ],
        )
        nodes = [node_manifest(f"cpu-node-{i}", "16", "64Gi") for i in range(config.cpu_nodes)]
        nodes += [
            node_manifest(f"gpu-node-{i}", "32", "256Gi", config.gpus_per_node, config.gpu_product)
            for i in range(config.gpu_nodes)
        ]
        nodes += config.extra_nodes
        log(f"registering {len(nodes)} fake nodes ({config.gpu_nodes} with {config.gpus_per_node} GPUs each)")
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(nodes))
        self._wait_for(lambda: self._nodes_ready(len(nodes)), timeout, "nodes Ready")
        self._wait_for(
            lambda: (
                self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0
            ),
            timeout,
            "default ServiceAccount",
        )
        log(f"control plane ready in {time.monotonic() - started:.1f}s")
        if config.real_nodes:
            self.add_real_nodes(config.real_nodes, config.real_node_gpus, config.gpu_product)
        return self.kubeconfig

    def import_images(self, names: list[str] | None = None) -> dict[str, images.Built]:
        """Builds the project's images (when their inputs changed) and imports them into every real node."""
        built = images.build_all(names)
        nodes = self.real_nodes().nodes
        t0 = time.monotonic()

        def into(node: Node) -> None:
            for b in built.values():
                images.import_into(str(node.socket), b)

        with ThreadPoolExecutor(max(1, len(nodes))) as pool:
            list(pool.map(into, nodes))
        log(
            f"images in the real nodes' containerd ({time.monotonic() - t0:.0f}s): {', '.join(b.ref for b in built.values())}"
        )
        return built

    def stop_kubelet(self, node: str) -> None:
        """A node's kubelet stops (its containers keep running): the node turns NotReady."""
        [n] = [n for n in self.real_nodes().nodes if n.name == node]
        self._stop([f"kubelet-{n.index}"])

    def start_kubelet(self, node: str) -> None:
        [n] = [n for n in self.real_nodes().nodes if n.name == node]
        self.real_nodes().restart_kubelet(n)

    def _write_meta(self, meta: dict) -> None:
        (self.state_dir / "cluster.json").write_text(json.dumps(meta))

    def _meta(self) -> dict:
        return json.loads((self.state_dir / "cluster.json").read_text())

    def add_real_nodes(self, count: int, gpus: int, gpu_product: str) -> RealNodes:
        """Starts real nodes (tainted: only pods that tolerate them run there); see realnodes.py."""
        t0 = time.monotonic()
        meta = self._meta()
        if meta.get("real_nodes"):
            return self.real_nodes()
        pause = images.build(images.IMAGES["pause"])
        real = self.real_nodes(count)
        log(f"starting {count} real nodes (containerd, kubelet), kube-proxy (nftables), CoreDNS")
        real.prepare_host()
        self._write_meta({**meta, "real_nodes": count})
        real.start(
            self.kubeconfig,
            meta["api_port"],
            gpus,
            gpu_product,
            pause.ref,
            lambda sock: images.import_into(str(sock), pause),
        )
        log(f"{count} real nodes Ready with {gpus} fake GPUs each in {time.monotonic() - t0:.1f}s")
        return real

    def _nodes_ready(self, want: int) -> bool:
        out = self.kubectl("get", "nodes", "-o", "json", check=False)
        if out.returncode:
            return False
        ready = 0
        for n in json.loads(out.stdout)["items"]:
            conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
            ready += conds.get("Ready") == "True"
        return ready >= want

    def _wait_ready(self, server: str, pki: Path, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

        def healthy() -> bool:
            if not self._alive("kube-apiserver"):
                raise RuntimeError(f"kube-apiserver exited; see {self.log_dir / 'kube-apiserver.log'}")
            try:
                with urllib.request.urlopen(f"{server}/readyz", context=ctx, timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        self._wait_for(healthy, timeout, "kube-apiserver /readyz")

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; logs are in {self.log_dir}")

    def down(self, quiet: bool = False) -> None:
        """Stops exactly the processes this state dir started, removes the real nodes' traces, then the state."""
        stopped = []
        if (self.state_dir / "nodes").exists():
            if not hasattr(self, "bins"):
                self.bins = Path(json.loads((self.state_dir / "cluster.json").read_text())["bin"])
            self.real_nodes().teardown(lambda names: stopped.extend(self._stop(names)))
        # Killed, not stopped: their state goes with the state dir just below, and a SIGTERMed
        # kube-apiserver drains for 20 s and more (etcd waits for it).
        control_plane = ["kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]
        stopped += self._stop(control_plane, grace=0.0)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if stopped and not quiet:
            log(f"stopped {', '.join(stopped)}")

    def _stop(self, order: list[str], grace: float = 15.0) -> list[str]:
        """SIGTERM to each named process group (by pid file), SIGKILL after `grace` seconds (at
        once for 0); returns the names."""
        pids = {}
        for name in order:
            pidf = self.pid_dir / f"{name}.pid"
            if pidf.exists():
                pids[name] = int(pidf.read_text())
        for pid in pids.values():
            try:
                os.killpg(pid, signal.SIGTERM if grace else signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace or 10)  # killed: only the wait for the exit
        for pid in pids.values():
            while time.monotonic() < deadline:
                if _exited(pid):
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in pids:
            (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)
        return list(pids)


def _exited(pid: int) -> bool:
    """True once pid is gone; reaps it when it is our child (else it lingers as a zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("REMOTEGPU_CLUSTER_DIR", DEFAULT_STATE_DIR))
    )
    parser.add_argument("--cpu-nodes", type=int, default=2)
    parser.add_argument("--gpu-nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument(
        "--real-nodes",
        type=int,
        default=int(os.environ.get("REMOTEGPU_REAL_NODES", "2")),
        help="real nodes (kubelet + containerd, fake GPUs) beside the KWOK ones; 0 for none",
    )
    parser.add_argument(
        "--import-images", action="store_true", help="build the images and import them into the real nodes"
    )
    parser.add_argument(
        "--pod-ready-delay-ms",
        type=int,
        default=int(os.environ.get("KWOK_POD_READY_DELAY_MS", "0")),
        help=f"delay before pods turn Ready (a pod annotation {POD_READY_DELAY_ANNOTATION} overrides it)",
    )
    args = parser.parse_args(argv)
    cluster = Cluster(args.state_dir)
    if args.action == "down":
        cluster.down()
        return 0
    cfg = ClusterConfig(
        cpu_nodes=args.cpu_nodes,
        gpu_nodes=args.gpu_nodes,
        gpus_per_node=args.gpus_per_node,
        pod_ready_delay_ms=args.pod_ready_delay_ms,
        real_nodes=args.real_nodes,
        real_node_gpus=args.gpus_per_node,
    )
    try:
        kubeconfig = cluster.up(cfg)
        if args.import_images and args.real_nodes:
            cluster.import_images()
    except Exception:
        cluster.down(quiet=True)
        raise
    print(f"export KUBECONFIG={kubeconfig}", file=sys.stderr)
    print(kubeconfig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
