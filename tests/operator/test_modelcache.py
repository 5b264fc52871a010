"""The model cache's pod parts, pre-warm DaemonSet, per-node status and clean-up Jobs (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from remotegpu_base import catalog
from remotegpu_operator import deployment, modelcache

from tests.operator.test_deployment import SETTINGS, body

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
HF = {
    "huggingFace": {
        "repo": "black-forest-labs/FLUX.1-schnell",
        "revision": "abc123",
        "tokenSecret": {"name": "hf"},
    }
}


def cached(cache: dict) -> dict:
    return body(cache=cache)


def pod_of(b: dict) -> dict:
    return deployment.build(b, SETTINGS, 1)["spec"]["template"]["spec"]


def test_node_local_cache_fetches_in_an_init_container_and_mounts_read_only():
    pod = pod_of(cached({"source": HF, "nodeLocal": {"path": "/mnt/nvme/models"}}))
    (fetch,) = pod["initContainers"]
    assert fetch["name"] == "fetch-weights"
    cmd = fetch["command"]
    assert cmd[:3] == ["remotegpu", "cache", "fetch"]
    assert cmd[cmd.index("--dest") + 1] == "/cache/ns1/tiny/weights"
    assert cmd[cmd.index("--make-dir") + 1] == "/cache/ns1/tiny/compiled"  # by uid 10001, not the kubelet
    assert cmd[cmd.index("--hf-repo") + 1] == "black-forest-labs/FLUX.1-schnell"
    assert cmd[cmd.index("--revision") + 1] == "abc123" and cmd[cmd.index("--verify") + 1] == "sizes"
    env = {e["name"]: e for e in fetch["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["hostPath"] == {"path": "/mnt/nvme/models", "type": "DirectoryOrCreate"}
    worker = pod["containers"][0]
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/weights"] == {
        "name": "model-cache", "mountPath": "/weights", "subPath": "ns1/tiny/weights", "readOnly": True,
    }  # fmt: skip
    assert mounts["/compile-cache"]["subPath"] == "ns1/tiny/compiled" and not mounts["/compile-cache"].get(
        "readOnly"
    )
    wenv = {e["name"]: e.get("value") for e in worker["env"]}
    assert wenv["HF_HUB_OFFLINE"] == "1" and wenv["REMOTEGPU_FETCH_RECORD"] == "/var/run/remotegpu/fetch.json"
    spec = json.loads(wenv["REMOTEGPU_MODEL_SPEC"])
    assert spec["weights"]["source"] == "/weights" and "revision" not in spec["weights"]
    # the weights are on the volume: no ephemeral-storage for them; still Guaranteed
    assert "ephemeral-storage" not in json.dumps(worker["resources"])
    assert fetch["resources"]["limits"] == {k: worker["resources"]["limits"][k] for k in ("cpu", "memory")}
    assert fetch["securityContext"]["runAsNonRoot"] is True


def test_without_a_source_the_weights_repo_is_fetched_and_a_pvc_source_is_copied():
    pod = pod_of(cached({"pvc": {"claimName": "shared-models"}}))
    cmd = pod["initContainers"][0]["command"]
    assert cmd[cmd.index("--hf-repo") + 1] == "black-forest-labs/FLUX.1-schnell" and "--revision" not in cmd
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "shared-models"}} in pod["volumes"]
    pod = pod_of(cached({"source": {"pvc": {"claimName": "nfs", "path": "flux"}}, "nodeLocal": {}}))
    fetch = pod["initContainers"][0]
    assert fetch["command"][fetch["command"].index("--from-dir") + 1] == "/source/flux"
    assert {"name": "weights-source", "mountPath": "/source", "readOnly": True} in fetch["volumeMounts"]


@pytest.mark.parametrize(
    "cache",
    [
        {"source": HF},  # no place
        {"source": HF, "nodeLocal": {}, "pvc": {"claimName": "x"}},  # two places
        {"source": {**HF, "hostPath": {"path": "/x"}}, "nodeLocal": {}},  # two sources
    ],
)
def test_invalid_caches_are_refused(cache):
    with pytest.raises(ValidationError):
        catalog.ImageModelSpec.model_validate(cached(cache)["spec"])


def test_prewarm_daemonset_runs_the_fetch_in_full_where_the_workers_go():
    b = cached({"source": HF, "nodeLocal": {}, "prewarm": True})
    b["spec"]["worker"] = {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
    }
    dep = deployment.build(b, SETTINGS, 0)
    spec = catalog.ImageModelSpec.model_validate(b["spec"])
    ds = modelcache.prewarm_daemonset(
        b, spec, dep["spec"]["template"]["spec"], dep["spec"]["template"]["metadata"]["labels"]
    )
    pod = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["name"] == "tiny-cache" and ds["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == [
        {"key": "gpu", "operator": "Exists"}
    ]
    cmd = pod["initContainers"][0]["command"]
    assert cmd[cmd.index("--verify") + 1] == "full"
    assert "nvidia.com/gpu" not in json.dumps(pod)  # holds no GPU
    assert (
        ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    )


def fetch_pod(node: str, state: dict, created: str = "2026-11-28T11:00:00Z") -> dict:
    return {
        "metadata": {"name": f"p-{node}", "creationTimestamp": created},
        "spec": {"nodeName": node},
        "status": {"initContainerStatuses": [{"name": "fetch-weights", "state": state}]},
    }


def test_node_status_from_the_fetch_containers():
    ok = {
        "terminated": {
            "exitCode": 0,
            "message": json.dumps({"sizeBytes": 123, "fetchedAt": "2026-11-28T11:00:05Z"}),
        }
    }
    failed = {
        "terminated": {"exitCode": 1, "message": json.dumps({"ready": False, "message": "401 gated repo"})}
    }
    pods = [fetch_pod("n1", ok), fetch_pod("n2", failed), fetch_pod("n3", {"running": {}})]
    previous = [{"node": "n0", "ready": True, "sizeBytes": 9, "fetchedAt": "2026-11-27T00:00:00Z"}]
    out = modelcache.node_status(pods, previous, NOW)
    assert out == [
        {"node": "n0", "ready": True, "sizeBytes": 9, "fetchedAt": "2026-11-27T00:00:00Z"},  # pods gone: kept
        {"node": "n1", "ready": True, "sizeBytes": 123, "fetchedAt": "2026-11-28T11:00:05Z"},
        {"node": "n2", "ready": False, "message": "401 gated repo"},
        {"node": "n3", "ready": False, "message": "fetching"},
    ]


def test_gc_jobs_one_per_node_keep_the_other_models():
    spec = catalog.ImageModelSpec.model_validate(cached({"source": HF, "nodeLocal": {"path": "/m"}})["spec"])
    jobs = modelcache.gc_jobs("ns1", "gone", spec, ["n1", "n2"], keep=["other", "alive"])
    assert [j["spec"]["template"]["spec"]["nodeName"] for j in jobs] == ["n1", "n2"]
    cmd = jobs[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd == ["remotegpu", "cache", "gc", "--root", "/cache/ns1", "--keep", "alive,other"]
    assert len({j["metadata"]["name"] for j in jobs}) == 2
    shared = catalog.ImageModelSpec.model_validate(cached({"source": HF, "pvc": {"claimName": "c"}})["spec"])
    (job,) = modelcache.gc_jobs("ns1", "gone", shared, [], keep=[])
    assert "nodeName" not in job["spec"]["template"]["spec"]


def test_an_s3_source_is_fetched_with_the_secrets_keys():
    s3 = {
        "bucket": "models",
        "prefix": "/flux/schnell/",
        "endpoint": "http://seaweedfs-s3.storage:8333",
        "region": "eu-west-1",
        "credentialsSecret": {"name": "s3-key"},
    }
    pod = pod_of(cached({"source": {"s3": s3}, "nodeLocal": {}}))
    (fetch,) = pod["initContainers"]
    cmd = fetch["command"]
    assert (
        cmd[cmd.index("--s3-bucket") + 1] == "models" and cmd[cmd.index("--s3-prefix") + 1] == "flux/schnell/"
    )
    assert cmd[cmd.index("--s3-endpoint") + 1] == "http://seaweedfs-s3.storage:8333"
    assert cmd[cmd.index("--s3-region") + 1] == "eu-west-1" and "--hf-repo" not in cmd
    env = {e["name"]: e for e in fetch["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-key", "key": "accessKeyId"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-key",
        "key": "secretAccessKey",
    }
    assert "weights-source" not in {v["name"] for v in pod["volumes"]}  # nothing to mount
    # without a Secret: the pod's own identity (IRSA, workload identity), no key in the env
    pod = pod_of(cached({"source": {"s3": {"bucket": "models"}}, "nodeLocal": {}}))
    fetch = pod["initContainers"][0]
    assert (
        not any(e["name"].startswith("AWS_") for e in fetch["env"])
        and "--s3-endpoint" not in fetch["command"]
    )


@pytest.mark.parametrize(
    ("s3", "message"),
    [
        ({"bucket": "s3://models/flux"}, "give the bucket alone"),
        ({"bucket": "Models"}, "is not a bucket name"),
        ({"bucket": "models", "endpoint": "seaweedfs:8333"}, "must be the server's URL"),
        ({"bucket": "models", "credentialsSecret": {}}, "name"),
    ],
)
def test_invalid_s3_sources_say_what_to_fix(s3, message):
    with pytest.raises(ValidationError, match=message):
        catalog.ImageModelSpec.model_validate(cached({"source": {"s3": s3}, "nodeLocal": {}})["spec"])


def test_the_cache_index_keeps_every_node_and_finds_the_models_that_are_gone():
    b = cached({"source": HF, "nodeLocal": {}})
    first = modelcache.index_entry(b, [{"node": "n2"}, {"node": "n1", "ready": True}], None)
    assert json.loads(first) == {"uid": "uid-1", "spec": b["spec"], "nodes": ["n1", "n2"]}
    # a node whose pods are gone stays listed: its folder is still there
    assert json.loads(modelcache.index_entry(b, [{"node": "n3"}], first))["nodes"] == ["n1", "n2", "n3"]
    again = {**b, "metadata": {**b["metadata"], "uid": "uid-2"}}  # re-created under the name: starts over
    assert json.loads(modelcache.index_entry(again, [{"node": "n3"}], first))["nodes"] == ["n3"]
    index = {"tiny": first, "live": first, "broken": "{not json"}
    gone = modelcache.orphans(index, live={"live"})
    assert [(name, nodes) for name, _, nodes in gone] == [("broken", []), ("tiny", ["n1", "n2"])]
    assert gone[0][1] is None and gone[1][1] is not None and gone[1][1].cache is not None
