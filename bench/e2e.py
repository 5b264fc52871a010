"""End-to-end cold start and warm throughput on the local cluster, with the phases.

Installs the chart on a fresh local cluster's real nodes (kubelet + containerd: the
gateway, operator, PostgreSQL and workers are containers of the built images; tiny
random-weight models on the CPU, on the nodes' fake GPUs), then measures:

- cold start, repeated: submit to a sleeping model -> succeeded, split into
  scale decision (Deployment replicas >= 1), pod scheduled, container created and
  started (from the pod's container status), pod ready (weights loaded, warmed up),
  lease (job running) and run;
- warm throughput: a batch of jobs to a ready model, jobs/s and per-job latency;
- a model with a node-local model cache fetched from a Hub stand-in: its job's
  cold-start timeline (GET .../timeline) with a cold cache, then with a warm one.

    .venv/bin/python bench/e2e.py [--runs 5] [--jobs 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.localcluster import Cluster, ClusterConfig  # noqa: E402
from tests.e2e.system import (  # noqa: E402
    System,
    cached_imagemodel,
    deploy,
    hub_objects,
    timeline,
    wait_for,
)
from tests.fixtures.cluster import Kube, RealNodes  # noqa: E402

MODEL_NAME = "tiny-random-flux1"


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def cold_start(system: System, model: str) -> dict[str, float]:
    wait_for(
        lambda: system.state(model) == "sleeping" and not system.pod_list(f"{MODEL_NAME}-"), 180, "sleeping"
    )
    t0 = time.monotonic()
    job = system.submit(model, seed=1)
    marks: dict[str, float] = {}
    while True:
        now = time.monotonic() - t0
        if "scale decision" not in marks and system.deployment_replicas(MODEL_NAME) >= 1:
            marks["scale decision"] = (
                time.monotonic() - t0
            )  # when seen (each check is a kubectl or HTTP call)
        if "scale decision" in marks and "pod scheduled" not in marks:
            dep = system.imagemodel(MODEL_NAME)["status"].get("deployment")
            pods = system.kube.get_json("pods", namespace=system.namespace)["items"]
            if any(p["metadata"]["name"].startswith(dep or "?") and p["spec"].get("nodeName") for p in pods):
                marks["pod scheduled"] = (
                    time.monotonic() - t0
                )  # when seen (each check is a kubectl or HTTP call)
        workers = system.workers(MODEL_NAME) if "pod scheduled" in marks else []
        if "container created" not in marks and any(p.container_id for p in workers):
            marks["container created"] = (
                time.monotonic() - t0
            )  # when seen (each check is a kubectl or HTTP call)
        if "container started" not in marks and any(_started(p.raw) for p in workers):
            marks["container started"] = (
                time.monotonic() - t0
            )  # when seen (each check is a kubectl or HTTP call)
        if "pod ready" not in marks and any(p.ready for p in workers):
            marks["pod ready"] = time.monotonic() - t0  # when seen (each check is a kubectl or HTTP call)
        status = system.job(job)
        if "leased" not in marks and status["status"] in ("running", "succeeded"):
            marks["leased"] = time.monotonic() - t0  # when seen (each check is a kubectl or HTTP call)
        if status["status"] in ("succeeded", "failed", "cancelled"):
            assert status["status"] == "succeeded", status
            marks["succeeded"] = time.monotonic() - t0  # when seen (each check is a kubectl or HTTP call)
            marks["run (run_ms)"] = status["run_ms"] / 1000
            marks["wait (wait_ms)"] = status["wait_ms"] / 1000
            return marks
        if now > 300:
            raise TimeoutError(f"cold start did not finish: {marks}")
        time.sleep(0.05)


def _started(pod: dict) -> bool:
    return any("running" in c.get("state", {}) for c in pod.get("status", {}).get("containerStatuses", []))


def warm_throughput(system: System, model: str, jobs: int) -> tuple[float, list[float]]:
    system.wait_job(system.submit(model, seed=0))  # make sure a worker is ready
    t0 = time.monotonic()
    ids = {system.submit(model, seed=i): time.monotonic() for i in range(jobs)}
    latencies: list[float] = []
    pending = dict(ids)
    while pending:
        for job_id, submitted in list(pending.items()):
            s = system.job(job_id)
            if s["status"] in ("succeeded", "failed", "cancelled"):
                assert s["status"] == "succeeded", s
                latencies.append(time.monotonic() - submitted)
                del pending[job_id]
        time.sleep(0.05)
    return jobs / (time.monotonic() - t0), latencies


CACHED_NAME, CACHED_MODEL = "bench-cached-flux1", "remotegpu/tiny-bench-cached-flux1"


def cache_cold_and_warm(system: System, tiny_models: Path, cache_root: Path) -> dict[str, dict[str, float]]:
    """A model with a node-local cache fetched from the Hub stand-in: the timeline of a
    job with a cold cache (the first pod fetches), then, after a scale to zero, with a
    warm one (nothing fetched). Phase -> seconds since the phase before."""
    import subprocess

    import yaml

    cache_root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "10001:10001", str(cache_root)], check=True)
    ns = system.namespace
    system.kube.kubectl(
        "apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(hub_objects(system, tiny_models))
    )
    wait_for(lambda: any(p.ready for p in system.pod_list("fake-hub")), 180, "the Hub stand-in")
    doc = cached_imagemodel(system, tiny_models, cache_root, CACHED_NAME, CACHED_MODEL, "real-node-1")
    system.kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))
    wait_for(lambda: CACHED_MODEL in system.models(), 60, "the cached model")
    out = {}
    for label in ("cold cache", "warm cache"):
        wait_for(lambda: not system.pod_list(f"{CACHED_NAME}-worker-"), 300, "no worker of the cached model")
        job = system.submit(CACHED_MODEL, seed=1)
        assert system.wait_job(job, timeout=600)["status"] == "succeeded"
        t = timeline(system, job)
        out[label] = {p["phase"]: p["seconds"] or 0.0 for p in t["phases"]}
        out[label]["total (scale decision to first lease)"] = (
            t["phases"][-1]["since_submit_seconds"] - t["phases"][0]["since_submit_seconds"]
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="cold starts to measure")
    parser.add_argument("--jobs", type=int, default=20, help="jobs in the warm batch")
    parser.add_argument(
        "--cluster-dir",
        type=Path,
        help="use this running cluster (`make cluster`'s: .cluster) instead of a new one",
    )
    args = parser.parse_args()

    from remotegpu_worker import tiny

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    print("building tiny models...", flush=True)
    tiny.build_all(work / "tiny-models", progress=None)
    cluster = Cluster(args.cluster_dir or work / "cluster")
    try:
        t0 = time.monotonic()
        kubeconfig = cluster.up(ClusterConfig(real_nodes=2))
        cluster.add_real_nodes(2, 2, ClusterConfig().gpu_product)
        print(f"cluster with 2 real nodes up in {time.monotonic() - t0:.1f}s", flush=True)
        t0 = time.monotonic()
        built = cluster.import_images()
        print(f"images built/imported in {time.monotonic() - t0:.1f}s", flush=True)
        kube = Kube(kubeconfig, cluster.bins, cluster)
        real = RealNodes({n.name: n.ip for n in cluster.real_nodes().nodes}, built)
        with deploy(kube, real, work / "tiny-models", work / "e2e") as system:
            model = system.tiny_models["flux1"]
            phases: dict[str, list[float]] = {}
            for i in range(args.runs):
                marks = cold_start(system, model)
                print(
                    f"cold start {i + 1}/{args.runs}: " + ", ".join(f"{k} {v:.2f}s" for k, v in marks.items())
                )
                for k, v in marks.items():
                    phases.setdefault(k, []).append(v)
            rate, lat = warm_throughput(system, model, args.jobs)
            cache = cache_cold_and_warm(system, work / "tiny-models", work / "model-cache")
    finally:
        if not args.cluster_dir:
            cluster.down(quiet=True)

    print(f"\ncold start on real nodes, {args.runs} runs (seconds since submit; tiny model on CPU)")
    print(f"{'phase':<18}{'median':>9}{'p95':>9}")
    for k, times in phases.items():
        print(f"{k:<18}{statistics.median(times):>9.2f}{p95(times):>9.2f}")
    print(
        f"\nwarm: {args.jobs} jobs to a ready model: {rate:.2f} jobs/s; "
        f"latency median {statistics.median(lat):.2f}s p95 {p95(lat):.2f}s"
    )
    print("\ncold start with a node-local model cache (the job's timeline: seconds since the phase before)")
    names = list(dict.fromkeys(name for row in cache.values() for name in row))
    print(f"{'phase':<40}" + "".join(f"{label:>12}" for label in cache))
    for name in names:
        print(
            f"{name:<40}"
            + "".join(f"{r[name]:>12.2f}" if name in r else f"{'-':>12}" for r in cache.values())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
