"""The model cache and the cold-start timeline on real nodes.

A stand-in for the Hugging Face Hub runs as a pod of the cluster (tests/fixtures/hub.py,
serving the tiny models) and counts every request. An ImageModel with a node-local cache
fetches from it with the real client in its worker pods' init container: the first pod
on the node downloads the weights, the next one (after a scale to zero and back) sends
no request, and its job's timeline has no `weights_fetched` phase.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.system import (
    IDLE_SECONDS,
    System,
    cached_imagemodel,
    hub_counts,
    hub_objects,
    timeline,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.real_nodes, pytest.mark.timeout(2400)]

NAME = "cached-flux1"
MODEL = "remotegpu/tiny-cached-flux1"
NODE = "real-node-1"
PHASES = [
    "scale_decision", "pod_scheduled", "container_started", "weights_fetched",
    "process_started", "weights_loaded", "warmed", "first_lease",
]  # fmt: skip


def summary(t: dict) -> str:
    return ", ".join(f"{p['phase']} {p['seconds'] if p['seconds'] is not None else '-'}" for p in t["phases"])


def test_the_first_pod_on_a_node_fetches_and_the_next_fetches_nothing(
    system: System, tiny_models_dir: Path, tmp_path_factory
):
    ns = system.namespace
    cache_root = tmp_path_factory.mktemp("model-cache")
    subprocess.run(["chown", "10001:10001", str(cache_root)], check=True)
    system.kube.kubectl(
        "apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(hub_objects(system, tiny_models_dir))
    )
    wait_for(lambda: any(p.ready for p in system.pod_list("fake-hub")), 180, "the Hub stand-in to be ready")
    files = sum(1 for p in (tiny_models_dir / "flux1").rglob("*") if p.is_file())
    doc = cached_imagemodel(system, tiny_models_dir, cache_root, NAME, MODEL, NODE)
    system.kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))
    wait_for(lambda: MODEL in system.models(), 60, "the cached model in the catalog")

    # Cold node cache: the first worker pod's init container downloads every file.
    first = system.submit(MODEL, seed=1)
    # Its worker pod, read while it starts: once the job is done, the idle window (6 s) ends it.
    [worker] = wait_for(
        lambda: [p for p in system.pod_list(f"{NAME}-worker-") if p.node], 300, "the worker pod scheduled"
    )
    done = system.wait_job(first, timeout=600)
    assert done["status"] == "succeeded", (done, system.logs())
    counts = hub_counts(system)
    assert counts["file_downloads"] == files, counts
    cold = timeline(system, first)
    print(f"\ncold cache timeline: {summary(cold)}")
    assert cold["waited_for_capacity"] is True and cold["weights_cached"] is False
    assert [p["phase"] for p in cold["phases"]] == PHASES, cold  # every phase of a cold job
    assert worker.node == NODE and worker.raw["status"]["qosClass"] != "BestEffort"
    mounts = {m["mountPath"]: m for m in worker.raw["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/weights"]["readOnly"] is True
    status = wait_for(
        lambda: [
            n
            for n in (system.imagemodel(NAME).get("status", {}).get("cache") or {}).get("nodes", [])
            if n["ready"]
        ],
        30,
        "the node's cache in the status",
    )
    assert status[0]["node"] == NODE and status[0]["sizeBytes"] > 0 and status[0]["fetchedAt"]
    assert (cache_root / ns / NAME / "weights" / ".remotegpu-cache.json").is_file()

    # Back to zero, then 0 -> 1 again on the same node: nothing is downloaded.
    # gone, not only marked for deletion: until its SIGTERM a pod may still take a job
    wait_for(lambda: not system.pod_list(f"{NAME}-worker-"), 120 + IDLE_SECONDS, "the worker to be gone")
    second = system.submit(MODEL, seed=2)
    done = system.wait_job(second, timeout=600)
    assert done["status"] == "succeeded", (done, system.logs())
    assert hub_counts(system)["requests"] == counts["requests"]  # not one request more
    warm = timeline(system, second)
    print(f"warm cache timeline: {summary(warm)}")
    assert warm["waited_for_capacity"] is True and warm["weights_cached"] is True
    assert [p["phase"] for p in warm["phases"]] == [p for p in PHASES if p != "weights_fetched"], warm

    # Deleting the model removes its cache folder on the node (a clean-up Job).
    # gone, not only marked for deletion: until its SIGTERM a pod may still take a job
    wait_for(lambda: not system.pod_list(f"{NAME}-worker-"), 120 + IDLE_SECONDS, "the worker to be gone")
    system.kube.kubectl("delete", "imagemodel", NAME, "-n", ns)
    wait_for(lambda: not (cache_root / ns / NAME).exists(), 180, "the model's cache folder to be removed")
    # The namespace is the system's, shared with the next tests: what this test added goes
    # (the finished clean-up Job would stay for its TTL; the Hub stand-in for good).
    system.kube.kubectl("delete", "jobs", "-n", ns, "-l", f"remotegpu.ai/model-cache={NAME}", "--wait")
    system.kube.kubectl(
        "delete",
        "-n",
        ns,
        "--wait",
        "-f",
        "-",
        input=yaml.safe_dump_all(hub_objects(system, tiny_models_dir)),
    )
    wait_for(
        lambda: not system.pod_list(f"{NAME}-cache-gc-") and not system.pod_list("fake-hub"),
        120,
        "the clean-up Job's pods and the Hub stand-in to be gone",
    )
