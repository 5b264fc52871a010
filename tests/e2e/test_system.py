"""End to end on the local cluster's real nodes: helm install → API key → job → scale from zero → PNG → scale to zero.

The gateway, operator, PostgreSQL and workers are containers of the built images on
real kubelets (tests/e2e/system.py); the faults are the real ones: pods deleted,
containers killed, a rollout restart.
"""

from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image

from tests.e2e.system import GATEWAY, OPERATOR, System, wait_for
from tests.fixtures.cluster import is_ready

# The first test also builds and imports the images when their inputs changed (minutes).
pytestmark = [pytest.mark.cluster, pytest.mark.real_nodes, pytest.mark.timeout(2400)]


def test_newcomer_path_from_sleeping_to_png_and_back_to_sleeping(system: System):
    model = system.tiny_models["flux1"]
    name = "tiny-random-flux1"
    # Every pod of the release runs on a real node, in a container of the built images.
    pods = system.pod_list()
    assert pods and all(p.phase == "Running" and p.node in system.real.addresses for p in pods), pods
    imagemodels = system.kube.kubectl("get", "imagemodels", "-n", system.namespace).stdout
    assert name in imagemodels and "sleeping" in imagemodels, imagemodels
    catalog = system.models()
    # Every model sleeps before any job; the five FLUX presets and the tiny models are listed.
    assert {m["runtime"]["state"] for m in catalog.values()} == {"sleeping"}
    assert "black-forest-labs/FLUX.1-dev" in catalog and model in catalog

    job_id = system.submit(model, seed=7)
    first = system.job(job_id)
    assert first["status"] in ("warming", "running", "succeeded"), first
    # The operator scales the Deployment up from zero; the worker pod lands on a real
    # node's fake GPU.
    wait_for(lambda: system.deployment_replicas(name) >= 1, 30, "the worker Deployment to scale up")
    [worker] = wait_for(lambda: system.workers(name), 60, "a worker pod")
    assert worker.node in system.real.addresses
    limits = worker.raw["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] in (1, "1"), limits
    done = system.wait_job(job_id, timeout=300)
    assert done["status"] == "succeeded", (done, system.logs())
    # Read at once: the idle window (6 s) starts now.
    assert system.models()[model]["runtime"]["state"] == "ready"
    assert done["run_ms"] > 0 and done["wait_ms"] > 0
    png = httpx.get(done["result_url"], timeout=30)
    assert png.status_code == 200
    image = Image.open(io.BytesIO(png.content))
    assert image.format == "PNG" and image.size == (512, 512)

    # Fresh stats: the job just finished counts (the gateway caches stats for 2 s).
    stats = wait_for(
        lambda: (s := system.models()[model]["recent_summary_stats"])["total_ms"]["count"] >= 1 and s,
        10,
        "the finished job in the recent stats",
    )
    assert stats["run_ms"]["count"] >= 1 and stats["run_ms"]["p50"] > 0
    assert stats["total_ms"]["p50"] >= stats["run_ms"]["p50"]

    # After the idle window the model sleeps again and its worker pod is gone.
    wait_for(lambda: system.state(model) == "sleeping", 90, "the model to go back to sleeping")
    wait_for(lambda: not system.pod_list(worker.name), 90, "the worker pod to be gone")
    assert system.deployment_replicas(name) == 0


def _running_job_on_one_worker(system: System, model: str, name: str, seed: int) -> tuple[str, object]:
    """A long job (still running when its worker dies), from sleep so its worker is the only one."""
    wait_for(lambda: system.state(model) == "sleeping", 120, f"{name} asleep")
    job_id = system.submit(model, steps=40, size={"width": 1024, "height": 1024}, seed=seed)
    wait_for(lambda: system.job(job_id)["status"] == "running", 240, "the job to run")
    [worker] = system.workers(name)
    return job_id, worker


def test_a_worker_container_killed_mid_job_still_finishes_the_job_once(system: System):
    model, name = system.tiny_models["flux1"], "tiny-random-flux1"
    job_id, worker = _running_job_on_one_worker(system, model, name, seed=3)
    system.kill_container(worker)  # the kubelet restarts the container
    done = system.wait_job(job_id, timeout=300)
    assert done["status"] == "succeeded", (done, system.logs())
    assert httpx.get(done["result_url"], timeout=30).status_code == 200


def test_a_worker_pod_force_deleted_mid_job_still_finishes_the_job(system: System):
    model, name = system.tiny_models["flux1"], "tiny-random-flux1"
    job_id, worker = _running_job_on_one_worker(system, model, name, seed=4)
    system.kube.kubectl(
        "delete", "pod", "-n", system.namespace, worker.name, "--grace-period=0", "--force", "--wait=false"
    )
    done = system.wait_job(job_id, timeout=300)
    assert done["status"] == "succeeded", (done, system.logs())
    assert httpx.get(done["result_url"], timeout=30).status_code == 200


def test_a_burst_across_two_models_scales_both_within_bounds_and_back(system: System):
    a, b = system.tiny_models["flux1"], system.tiny_models["flux1-kontext"]
    src = Image.new("RGB", (512, 512), (200, 30, 30))
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    import base64

    image_b64 = base64.b64encode(buf.getvalue()).decode()
    jobs = [system.submit(a, seed=i) for i in range(4)]
    jobs += [system.submit(b, seed=i, input_images_base64=[image_b64]) for i in range(3)]
    peak = {"tiny-random-flux1": 0, "tiny-random-flux1-kontext": 0}
    deadline = time.monotonic() + 480
    pending = set(jobs)
    while pending and time.monotonic() < deadline:
        for n in peak:
            peak[n] = max(peak[n], system.deployment_replicas(n))
        pending = {j for j in pending if system.job(j)["status"] not in ("succeeded", "failed", "cancelled")}
        time.sleep(0.5)
    assert not pending, system.logs()
    assert all(system.job(j)["status"] == "succeeded" for j in jobs)
    # Both scaled up, never beyond maxReplicas (2).
    assert peak["tiny-random-flux1"] >= 1 and peak["tiny-random-flux1-kontext"] >= 1
    assert max(peak.values()) <= 2
    for n, m in (("tiny-random-flux1", a), ("tiny-random-flux1-kontext", b)):
        wait_for(lambda m=m: system.state(m) == "sleeping", 120, f"{n} to sleep again")


def test_a_gateway_rollout_restart_under_load_loses_no_job_in_any_state(system: System):
    model = system.tiny_models["flux1"]
    done = system.submit(model, seed=11)
    assert system.wait_job(done, timeout=300)["status"] == "succeeded"
    running = system.submit(model, steps=40, size={"width": 1024, "height": 1024}, seed=12)
    wait_for(lambda: system.job(running)["status"] == "running", 240, "a running job")
    waiting = [system.submit(model, seed=13 + i) for i in range(2)]
    cancelled = system.submit(model, seed=20)
    assert system.http.post(f"/v1/inference/jobs/{cancelled}/cancel").status_code == 200
    before = {j: system.job(j)["status"] for j in [done, running, *waiting, cancelled]}
    assert before[cancelled] == "cancelled" and before[done] == "succeeded"

    [old] = system.pods(GATEWAY)
    system.kube.kubectl("rollout", "restart", f"deployment/{GATEWAY}", "-n", system.namespace)
    wait_for(lambda: old not in system.pods(GATEWAY), 180, "the old gateway pod to go")
    system.wait_gateway(180)

    after = {j: system.job(j)["status"] for j in before}
    assert after[done] == "succeeded" and after[cancelled] == "cancelled"
    for j in [running, *waiting]:
        assert system.wait_job(j, timeout=300)["status"] == "succeeded", system.logs()
    assert httpx.get(system.job(done)["result_url"], timeout=30).status_code == 200


def test_an_operator_restart_mid_scale_converges_without_duplicates(system: System):
    model, name = system.tiny_models["flux1-kontext"], "tiny-random-flux1-kontext"
    wait_for(lambda: system.state(model) == "sleeping", 120, f"{name} asleep")
    buf = io.BytesIO()
    Image.new("RGB", (512, 512), (0, 90, 200)).save(buf, format="PNG")
    import base64

    job = system.submit(model, input_images_base64=[base64.b64encode(buf.getvalue()).decode()])
    # Restart the operator right as the scale-up decision is due.
    [old] = system.pods(OPERATOR)
    system.kube.kubectl("delete", "pod", "-n", system.namespace, old, "--wait=false")
    assert system.wait_job(job, timeout=300)["status"] == "succeeded", system.logs()
    deployments = system.kube.get_json("deployments", namespace=system.namespace)["items"]
    owned = [
        d for d in deployments if any(o["name"] == name for o in d["metadata"].get("ownerReferences", []))
    ]
    assert len(owned) == 1, [d["metadata"]["name"] for d in owned]
    assert (
        system.imagemodel(name)["status"]["observedGeneration"]
        == system.imagemodel(name)["metadata"]["generation"]
    )


def test_scaling_down_while_a_job_runs_lets_the_job_finish(system: System):
    model, name = system.tiny_models["flux1"], "tiny-random-flux1"
    # From sleep, so the job's worker is the only one: an idle worker that earlier tests left
    # behind could be draining already, and would hand the job straight back to the queue.
    wait_for(lambda: system.state(model) == "sleeping", 120, f"{name} asleep")
    job = system.submit(model, steps=50, size={"width": 1024, "height": 1024}, seed=5)
    wait_for(lambda: system.job(job)["status"] == "running", 120, "the job to run")
    # Pin the model to zero workers (spec.replicas; `kubectl scale` sets minReplicas, and the
    # autoscaler never goes below the busy workers): the Deployment scales down under the job.
    system.kube.kubectl(
        "patch", "imagemodel", name, "-n", system.namespace, "--type=merge", "-p", '{"spec":{"replicas":0}}'
    )
    try:
        wait_for(lambda: system.deployment_replicas(name) == 0, 30, "the Deployment to scale to 0")
        done = system.wait_job(job, timeout=120)
        assert done["status"] == "succeeded", (done, system.logs())

        # The worker was told to stop while the job ran, and finished it instead of handing it back
        # (its log reaches us through the kubelet a moment after the gateway has the result).
        def drained_then_finished() -> bool:
            logs = system.logs(tail=None)
            drained_at = logs.find(f"draining: job {job}")
            return drained_at >= 0 and f"job {job}: succeeded" in logs[drained_at:]

        try:
            wait_for(drained_then_finished, 60, "the worker's log: draining, then the job finished")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{system.logs()}") from None
        wait_for(lambda: not system.pod_list(f"{name}-"), 90, "the drained worker pod to be gone")
    finally:
        system.kube.kubectl(
            "patch",
            "imagemodel",
            name,
            "-n",
            system.namespace,
            "--type=json",
            "-p",
            '[{"op": "remove", "path": "/spec/replicas"}]',
        )


def node_ready(system: System, node: str) -> bool:
    return is_ready(system.kube.get_json("node", node))


def test_a_node_whose_kubelet_stops_mid_job_loses_no_job(system: System):
    assert system.kube.cluster is not None
    model, name = system.tiny_models["flux1"], "tiny-random-flux1"
    job_id, worker = _running_job_on_one_worker(system, model, name, seed=21)
    # The kubelet stops; the node's containers run on (as on a real node whose kubelet died).
    system.kube.cluster.stop_kubelet(worker.node)
    try:
        done = system.wait_job(job_id, timeout=300)
        assert done["status"] == "succeeded", (done, system.logs())
        assert httpx.get(done["result_url"], timeout=30).status_code == 200
        wait_for(lambda: not node_ready(system, worker.node), 180, f"{worker.node} NotReady")
        # New jobs still run while the node is NotReady.
        other = system.submit(model, seed=22)
        assert system.wait_job(other, timeout=300)["status"] == "succeeded", system.logs()
    finally:
        system.kube.cluster.start_kubelet(worker.node)
    wait_for(lambda: node_ready(system, worker.node), 120, f"{worker.node} Ready again")
    assert system.kube.get_json("node", worker.node)["status"]["allocatable"]["nvidia.com/gpu"] == "2"
