"""Real nodes for the local cluster: kubelets with their own containerd, kube-proxy, CoreDNS.

Each node is a kubelet with its own containerd (root, state, socket, runc root,
netns mounts, CNI config), its own ports, `cgroupRoot`, root dir and pod log dir,
and its own Linux bridge: node i's pods get 10.244.i.0/24 and the bridge's address
10.244.i.1 is the node's IP. One kube-proxy (nftables mode) serves the host, and
CoreDNS (built from its pinned Go module) answers `cluster.local` on node 0's
address, the pods' nameserver. Nodes advertise a fake `nvidia.com/gpu` capacity and
the GPU product label, so GPU worker pods schedule there and run on the CPU.

Pod traffic stays inside: the host forwards only between the cluster's pod
addresses (an nftables guard drops anything else from a pod), and CoreDNS forwards
nothing outside `cluster.local`.

The host has one set of names that cannot be per cluster (kube-proxy's nftables
table, the kubelet's device-plugin socket), so one cluster with real nodes runs on a
host at a time: a lock file says whose. `teardown` removes every trace, from what
the state dir recorded: processes by pid, pod sandboxes, mounts, network namespaces,
bridges, nftables tables, cgroups and the sysctls it changed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
NODE_LABEL = "remotegpu.dev/real-node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
LOCK = Path("/run/lock/remotegpu-real-nodes.lock")
GUARD_TABLE = ("inet", "remotegpu-pods")
KUBE_PROXY_TABLES = [("ip", "kube-proxy"), ("ip6", "kube-proxy")]
# The kubelet sets these unless they already hold its values (protectKernelDefaults
# off); teardown puts back what was there. ip_forward routes between the node bridges.
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
}
# Host paths used whatever the state dirs (the kubelet's device-plugin socket and log
# folders, the shims' sockets, libcni's cache): removed at teardown if they were not
# there before.
HOST_PATHS = ["/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/run/containerd", "/var/lib/cni"]
CNI_CACHE = Path("/var/lib/cni")
IMAGE_STORES = Path(
    os.environ.get("REMOTEGPU_NODE_STORES")
    or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "remotegpu" / "nodes"
)


@dataclass(frozen=True)
class Node:
    index: int
    name: str
    dir: Path

    @property
    def ip(self) -> str:
        return f"10.244.{self.index}.1"

    @property
    def subnet(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def bridge(self) -> str:
        return f"rgnode{self.index}"

    @property
    def image_store(self) -> Path:
        """containerd's root (its images and snapshots): kept across runs, so an image
        is unpacked once per build rather than once per cluster (5.7 GB for the worker)."""
        return IMAGE_STORES / self.name

    @property
    def socket(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    @property
    def cgroup_root(self) -> str:
        return f"/remotegpu-{self.name}"

    @property
    def network(self) -> str:
        return f"remotegpu-{self.name}"


# Node 0's address: the pods' way to the API server (the `kubernetes` Service's
# endpoint, relayed to its loopback port) and their nameserver (CoreDNS).
API_RELAY_IP = "10.244.0.1"
TAINT = f"{NODE_LABEL}=true:NoSchedule"


def run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HostLock:
    """One cluster with real nodes per host: the lock file names the holding state dir.

    It outlives the process that took it (`make cluster` exits, its cluster stays), so
    a holder counts until its teardown removed its host record; one whose run crashed
    before that must be torn down (`python -m cluster.localcluster down --state-dir DIR`).
    """

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir

    def _holder(self) -> str:
        try:
            return LOCK.read_text().strip()
        except OSError:
            return ""

    @staticmethod
    def _alive(holder: str) -> bool:
        return (Path(holder) / "nodes" / "host.json").exists()

    def acquire(self, timeout: float, log: Callable[[str], None]) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        warned = False
        while True:
            with LOCK.open("a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # check-and-set, briefly
                holder = self._holder()
                if not holder or holder == str(self.state_dir) or not self._alive(holder):
                    f.truncate(0)
                    f.write(f"{self.state_dir}\n")
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"another cluster with real nodes runs on this host (state in {holder}); stop it "
                    f"first: `make cluster-down`, or `python -m cluster.localcluster down --state-dir {holder}`"
                )
            if not warned:
                log(f"waiting for the cluster with real nodes in {holder} to stop")
                warned = True
            time.sleep(2)

    def release(self) -> None:
        with LOCK.open("a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if self._holder() == str(self.state_dir):
                f.truncate(0)


class RealNodes:
    """Starts and stops the real nodes of one local cluster (whose helpers it is given)."""

    def __init__(
        self,
        state_dir: Path,
        bins: Path,
        spawn: Callable[[str, list[str]], None],
        kubectl: Callable[..., subprocess.CompletedProcess],
        log: Callable[[str], None],
        count: int = 2,
    ):
        self.state_dir = state_dir
        self.bins = bins
        self.spawn = spawn
        self.kubectl = kubectl
        self.log = log
        self.dir = state_dir / "nodes"
        self.record = self.dir / "host.json"
        self.nodes = [Node(i, f"real-node-{i}", self.dir / f"real-node-{i}") for i in range(count)]
        self.lock = HostLock(state_dir)

    # -- host network (before the API server: it listens on node 0's address) ----------
    def prepare_host(self, lock_timeout: float = 600) -> None:
        self.lock.acquire(lock_timeout, self.log)
        self.dir.mkdir(parents=True, exist_ok=True)
        record: dict = {"sysctls": {}, "bridges": [], "host_paths": {}}
        for key in SYSCTLS:
            path = Path("/proc/sys") / key
            if path.exists():
                record["sysctls"][key] = path.read_text().strip()
        for p in HOST_PATHS:
            record["host_paths"][p] = os.path.exists(p)
        self._write_record(record)
        for key, want in SYSCTLS.items():
            path = Path("/proc/sys") / key
            if path.exists() and path.read_text().strip() != want:
                path.write_text(want)
        for node in self.nodes:
            if run("ip", "link", "show", node.bridge, check=False).returncode == 0:
                raise RuntimeError(
                    f"bridge {node.bridge} exists already: a stale cluster? `make cluster-down`"
                )
            run("ip", "link", "add", node.bridge, "type", "bridge")
            record["bridges"].append(node.bridge)
            self._write_record(record)
            run("ip", "addr", "add", f"{node.ip}/24", "dev", node.bridge)
            run("ip", "link", "set", node.bridge, "up")
        self._guard()

    def _guard(self) -> None:
        """Forwarded packets from a pod may only go to another pod (after kube-proxy's DNAT)."""
        family, table = GUARD_TABLE
        rules = f"""
table {family} {table} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr {POD_CIDR} ip daddr != {POD_CIDR} counter drop
    ip daddr {POD_CIDR} ip saddr != {POD_CIDR} counter drop
  }}
}}
"""
        run("nft", "-f", "-", input=rules)

    def _write_record(self, record: dict) -> None:
        self.record.write_text(json.dumps(record, indent=1))

    # -- nodes -----------------------------------------------------------------------
    def start(self, kubeconfig: Path, api_port: int, gpus_per_node: int, gpu_product: str, pause_image: str,
              import_pause: Callable[[Path], None]) -> None:  # fmt: skip
        self.spawn(
            "api-relay",
            [
                "socat",
                f"TCP-LISTEN:{api_port},bind={API_RELAY_IP},fork,reuseaddr",
                f"TCP:127.0.0.1:{api_port}",
            ],
        )
        for node in self.nodes:
            self._start_containerd(node, pause_image)
        for node in self.nodes:
            self._wait_socket(node)
            self._kill_pods(node)  # a crashed run's containers, in the kept root
            import_pause(node.socket)
        for node in self.nodes:
            self._create_cgroups(node)
            self._start_kubelet(node, kubeconfig, gpu_product)
        self._start_kube_proxy(kubeconfig)
        self._start_coredns(kubeconfig)
        self._wait(lambda: all(self._ready(n) for n in self.nodes), 180, "real nodes Ready")
        for node in self.nodes:
            self.advertise_gpus(node, gpus_per_node)
        self._wait(self._kube_proxy_synced, 120, "kube-proxy's nftables rules")

    def advertise_gpus(self, node: Node, gpus: int) -> None:
        """The documented way to advertise an extended resource: PATCH the node's status."""
        patch = json.dumps({"status": {"capacity": {GPU_RESOURCE: str(gpus)}}})
        self.kubectl("patch", "node", node.name, "--subresource=status", "--type=merge", "-p", patch)
        self._wait(lambda: self._allocatable(node).get(GPU_RESOURCE) == str(gpus), 60, f"GPUs on {node.name}")

    def _allocatable(self, node: Node) -> dict:
        out = self.kubectl("get", "node", node.name, "-o", "json", check=False)
        return json.loads(out.stdout)["status"].get("allocatable", {}) if out.returncode == 0 else {}

    def _ready(self, node: Node) -> bool:
        out = self.kubectl("get", "node", node.name, "-o", "json", check=False)
        if out.returncode:
            return False
        conds = {c["type"]: c["status"] for c in json.loads(out.stdout)["status"].get("conditions", [])}
        return conds.get("Ready") == "True"

    def _kube_proxy_synced(self) -> bool:
        # The `kubernetes` Service's ClusterIP is in the table once kube-proxy has synced.
        out = run("nft", "list", "table", "ip", "kube-proxy", check=False)
        return out.returncode == 0 and "10.96.0.1" in out.stdout

    def _start_containerd(self, node: Node, pause_image: str) -> None:
        d = node.dir / "containerd"
        cni = node.dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        d.mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-remotegpu.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": node.network,
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": node.bridge,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "dataDir": str(cni / "ipam"),
                                "ranges": [[{"subnet": node.subnet, "gateway": node.ip}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                            },
                        },
                        {"type": "loopback"},
                    ],
                },
                indent=1,
            )
        )
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{node.image_store}"
state = "{d / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{node.socket}"
[ttrpc]
  address = "{node.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"
[{cri}]
  sandbox_image = "{pause_image}"
  # The sandbox refuses a negative oom_score_adj (the CRI's -998 for sandboxes).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{d / "runc"}"
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{cni / "net.d"}"
"""
        (d / "config.toml").write_text(config)
        self.spawn(f"containerd-{node.index}", ["containerd", "--config", str(d / "config.toml")])

    def _wait_socket(self, node: Node) -> None:
        self._wait(lambda: node.socket.exists(), 60, f"{node.name}'s containerd socket")
        self._wait(
            lambda: run("ctr", "--address", str(node.socket), "version", check=False).returncode == 0,
            60,
            f"{node.name}'s containerd",
        )

    def _create_cgroups(self, node: Node) -> None:
        """The kubelet's cgroupRoot must exist, in every (v1) hierarchy; cpuset needs its CPUs and memory nodes."""
        for sub in _hierarchies():
            d = sub / node.cgroup_root.lstrip("/")
            d.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (sub / knob).exists() and not (d / knob).read_text().strip():
                    (d / knob).write_text((sub / knob).read_text())

    def _start_kubelet(self, node: Node, kubeconfig: Path, gpu_product: str) -> None:
        d = node.dir / "kubelet"
        d.mkdir(parents=True, exist_ok=True)
        resolv = node.dir / "resolv.conf"
        resolv.write_text("")  # pods get the cluster DNS only, no host search domains
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": node.ip,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            # A local test cluster: the API server's calls (logs, exec, port-forward)
            # are allowed without credentials, on the node's bridge address only.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": node.cgroup_root,
            "failSwapOn": False,
            "failCgroupV1": False,
            "containerRuntimeEndpoint": f"unix://{node.socket}",
            "clusterDNS": [API_RELAY_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(resolv),
            "podLogsDir": str(node.dir / "pod-logs"),
            "makeIPTablesUtilChains": False,
            "registerNode": True,
            "serializeImagePulls": False,
            # Never collect the imported images (there is no registry to pull them again).
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "nodeStatusUpdateFrequency": "4s",
            "maxPods": 110,
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        labels = {NODE_LABEL: "true", GPU_PRODUCT_LABEL: gpu_product}
        argv = [
            str(self.bins / "kubelet"),
            f"--config={d / 'config.yaml'}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={d / 'root'}",
            f"--cert-dir={d / 'pki'}",
            f"--hostname-override={node.name}",
            f"--node-ip={node.ip}",
            f"--node-labels={','.join(f'{k}={v}' for k, v in labels.items())}",
            f"--register-with-taints={TAINT}",
            "--v=1",
        ]
        (d / "argv.json").write_text(json.dumps(argv))
        self.spawn(f"kubelet-{node.index}", argv)

    def restart_kubelet(self, node: Node) -> None:
        """Starts a stopped kubelet again, as it was (its pods come back under its care)."""
        self.spawn(f"kubelet-{node.index}", json.loads((node.dir / "kubelet" / "argv.json").read_text()))

    def _start_kube_proxy(self, kubeconfig: Path) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": self.nodes[0].name,
            "clusterCIDR": POD_CIDR,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [POD_CIDR],
            # Leave the host's conntrack settings alone.
            "conntrack": {"maxPerCore": 0, "min": 0},
        }
        path = self.dir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self.spawn("kube-proxy", [str(self.bins / "kube-proxy"), f"--config={path}", "--v=1"])

    def _start_coredns(self, kubeconfig: Path) -> None:
        corefile = self.dir / "Corefile"
        # No `forward`: names outside the cluster are refused, nothing leaves the host.
        corefile.write_text(
            f""".:53 {{
    bind {API_RELAY_IP}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} remotegpu-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        coredns = next(self.bins.glob("coredns-*"))
        self.spawn("coredns", [str(coredns), "-conf", str(corefile)])

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.state_dir / 'logs'}"
        )

    # -- teardown --------------------------------------------------------------------
    def teardown(self, stop: Callable[[list[str]], None]) -> None:
        """Removes every trace of the real nodes; `stop` ends named processes by pid."""
        if not self.record.exists():
            return
        record = json.loads(self.record.read_text())
        t0 = time.monotonic()
        stop([f"kubelet-{n.index}" for n in self.nodes] + ["kube-proxy", "coredns", "api-relay"])
        t1 = time.monotonic()
        for node in self.nodes:
            self._kill_pods(node)
        t2 = time.monotonic()
        stop([f"containerd-{n.index}" for n in self.nodes])
        for node in self.nodes:
            self._kill_leftover_shims(node)
        t3 = time.monotonic()
        self._unmount_under(self.dir)
        for node in self.nodes:
            self._unmount_under(node.image_store)
        for node in self.nodes:
            self._remove_cgroups(node)
            self._remove_cni_cache(node)
        for family, table in [*KUBE_PROXY_TABLES, GUARD_TABLE]:
            run("nft", "delete", "table", family, table, check=False)
        self._remove_iptables_chains()
        for bridge in record.get("bridges", []):
            run("ip", "link", "del", bridge, check=False)
        for key, value in record.get("sysctls", {}).items():
            path = Path("/proc/sys") / key
            if path.exists() and path.read_text().strip() != value:
                path.write_text(value)
        for path, existed in record.get("host_paths", {}).items():
            if not existed:
                subprocess.run(["rm", "-rf", path], check=False)
        self._remove_log_links()
        self.record.unlink()
        self.lock.release()
        self.log(
            f"real nodes removed: kubelets {t1 - t0:.0f}s, pods {t2 - t1:.0f}s, containerd {t3 - t2:.0f}s, "
            f"mounts, network, cgroups {time.monotonic() - t3:.0f}s"
        )

    def _kill_pods(self, node: Node) -> None:
        """Kills every container of the node's containerd (sandboxes too)."""
        if not node.socket.exists():
            return
        ctr = ["ctr", "--address", str(node.socket), "--namespace", "k8s.io"]
        tasks = run(*ctr, "tasks", "list", "-q", check=False).stdout.split()
        for t in tasks:
            run(*ctr, "tasks", "kill", "--signal", "SIGKILL", t, check=False)
        deadline = time.monotonic() + 20
        for t in tasks:
            while time.monotonic() < deadline:
                if run(*ctr, "tasks", "delete", "--force", t, check=False).returncode == 0:
                    break
                time.sleep(0.2)
        for c in run(*ctr, "containers", "list", "-q", check=False).stdout.split():
            run(*ctr, "containers", "delete", c, check=False)

    def _kill_leftover_shims(self, node: Node) -> None:
        """containerd-shim processes of this node's socket that outlived their tasks."""
        marker = str(node.socket).encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmd and marker in cmd:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _unmount_under(self, root: Path) -> None:
        """Every mount below root (overlay rootfs, shm, secrets, netns), deepest first."""
        prefix = str(root) + "/"
        for _ in range(3):
            mounts = []
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(prefix):
                    mounts.append(point)
            if not mounts:
                return
            for point in sorted(set(mounts), key=lambda p: p.count("/"), reverse=True):
                if subprocess.run(["umount", point], capture_output=True).returncode:
                    subprocess.run(["umount", "-l", point], capture_output=True)

    def _remove_cgroups(self, node: Node) -> None:
        for sub in _hierarchies():
            top = sub / node.cgroup_root.lstrip("/")
            if not top.is_dir():
                continue
            for d in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                top.rmdir()
            except OSError:
                pass

    def _remove_cni_cache(self, node: Node) -> None:
        """libcni's result cache (/var/lib/cni/results/<network>-<container>-<if>)."""
        results = CNI_CACHE / "results"
        if results.is_dir():
            for f in results.glob(f"{node.network}-*"):
                f.unlink(missing_ok=True)

    def _remove_iptables_chains(self) -> None:
        """KUBE-* chains (kube-proxy's iptables clean-up may leave its hint chains)."""
        for table in ("filter", "nat", "mangle"):
            out = run("iptables", "-t", table, "-S", check=False).stdout
            chains = re.findall(r"^-N (KUBE-\S+)$", out, re.MULTILINE)
            for rule in re.findall(r"^-A (\S+) (.*-j KUBE-\S+.*)$", out, re.MULTILINE):
                if not rule[0].startswith("KUBE-"):
                    run("iptables", "-t", table, "-D", rule[0], *rule[1].split(), check=False)
            for c in chains:
                run("iptables", "-t", table, "-F", c, check=False)
            for c in chains:
                run("iptables", "-t", table, "-X", c, check=False)

    def _remove_log_links(self) -> None:
        links = Path("/var/log/containers")
        if not links.is_dir():
            return
        for link in links.iterdir():
            try:
                if link.is_symlink() and os.readlink(link).startswith(str(self.dir)):
                    link.unlink()
            except OSError:
                pass


def _hierarchies() -> list[Path]:
    """The mounted cgroup hierarchies (v1: one per controller; v2: the one root)."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.procs").exists():
        return [root]
    return [d for d in root.iterdir() if d.is_dir() and not d.is_symlink() and (d / "cgroup.procs").exists()]
