"""The cluster catalog: ImageModel resources listed and watched from a real kube-apiserver."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from remotegpu_base.catalog import API_GROUP, PLURAL, load_models_file
from remotegpu_base.protocol import RuntimeState
from remotegpu_gateway.catalog_source import Catalog, KubernetesCatalogWatcher
from remotegpu_gateway.registry import RuntimeRegistry
from remotegpu_gateway.settings import Settings

from cluster.localcluster import free_port
from tests.fixtures.cluster import Kube
from tests.gateway.conftest import WORKER_TOKEN, RunningGateway
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


def apply(kube: Kube, namespace: str, resource: dict[str, Any]) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(resource))


def set_state(kube: Kube, namespace: str, name: str, state: str) -> None:
    kube.kubectl(
        "patch",
        f"{PLURAL}.{API_GROUP}",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"state": state}}),
    )


@contextmanager
def watching(watcher: KubernetesCatalogWatcher) -> Iterator[None]:
    """Runs the watcher on an event loop in a thread of its own, as the gateway's server loop runs it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="watcher-loop", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(watcher.start(), loop).result(60)
        yield
    finally:
        asyncio.run_coroutine_threadsafe(watcher.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_watcher_follows_imagemodel_resources(
    crd: None, kube: Kube, kubeconfig: Path, namespace: str
) -> None:
    models = load_models_file()
    first, second = models[0], models[1]
    apply(kube, namespace, first.to_resource(namespace))
    catalog, registry = Catalog(), RuntimeRegistry()
    watcher = KubernetesCatalogWatcher(
        catalog, registry, namespace, kubeconfig=str(kubeconfig), timeout_seconds=5
    )
    with watching(watcher):
        # The initial list is complete when start() returns.
        assert catalog.ids() == [first.spec.model]
        assert catalog.get(first.spec.model) == first
        # Added.
        apply(kube, namespace, second.to_resource(namespace))
        wait_for(lambda: catalog.get(second.spec.model) is not None, what="second model")
        # Status written by the operator becomes the runtime state.
        set_state(kube, namespace, first.name, "ready")
        wait_for(lambda: registry.state(first.spec.model) == RuntimeState.READY, what="ready")
        set_state(kube, namespace, first.name, "starting")
        wait_for(lambda: registry.state(first.spec.model) == RuntimeState.STARTING, what="starting")
        # Modified spec.
        changed = second.to_resource(namespace)
        changed["spec"]["parameters"]["prompt"]["maxLength"] = 77
        apply(kube, namespace, changed)
        wait_for(
            lambda: (
                (m := catalog.get(second.spec.model)) is not None
                and m.spec.parameters.prompt.max_length == 77
            ),
            what="modified spec",
        )
        # Deleted.
        kube.kubectl("delete", f"{PLURAL}.{API_GROUP}", first.name, "-n", namespace)
        wait_for(lambda: catalog.get(first.spec.model) is None, what="delete")
        assert registry.state(first.spec.model) == RuntimeState.SLEEPING
        # The watch survives its server-side timeout (5 s here) and keeps following.
        time.sleep(6)
        third = models[2]
        apply(kube, namespace, third.to_resource(namespace))
        wait_for(lambda: catalog.get(third.spec.model) is not None, what="model after watch timeout")


def test_gateway_serves_the_cluster_catalog(
    crd: None, kube: Kube, kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    models = load_models_file()
    for m in models[:3]:
        apply(kube, namespace, m.to_resource(namespace))
    set_state(kube, namespace, models[0].name, "ready")
    g = RunningGateway(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'gw.db'}",
            data_dir=tmp_path,
            worker_token=WORKER_TOKEN,
            namespace=namespace,
            kubeconfig=str(kubeconfig),
        )
    )
    try:
        got = {m["model"]: m for m in httpx.get(f"{g.url}/v1/inference/models").json()["image"]}
        assert set(got) == {m.spec.model for m in models[:3]}
        assert got[models[0].spec.model]["runtime"]["state"] == "ready"
        assert got[models[1].spec.model]["runtime"]["state"] == "sleeping"
        key = g.key()
        r = g.submit(key, {"prompt": "a", "model": models[0].spec.model})
        assert r.status_code == 202
        assert g.job(key, r.json()["job_id"]).json()["status"] == "queued"  # the cluster says ready
        # A model only in the bundled file, not in the cluster, is unknown here.
        assert g.submit(key, {"prompt": "a", "model": models[4].spec.model}).status_code == 400
    finally:
        g.stop()


def test_invalid_resources_are_skipped(crd: None, kube: Kube, kubeconfig: Path, namespace: str) -> None:
    good = load_models_file()[0]
    apply(kube, namespace, good.to_resource(namespace))
    catalog = Catalog()
    watcher = KubernetesCatalogWatcher(catalog, None, namespace, kubeconfig=str(kubeconfig))
    # A spec the apiserver accepts but the catalog schema refuses would be skipped: take the
    # object as the server returns it, break its spec, and parse it.
    with watching(watcher):
        assert catalog.ids() == [good.spec.model]
    objs = kube.get_json(f"{PLURAL}.{API_GROUP}", namespace=namespace)
    assert len(objs["items"]) == 1
    bad = dict(objs["items"][0])
    bad["spec"] = {**bad["spec"], "parameters": {"prompt": {"maxLength": 10}}}
    assert watcher._parse(bad) is None


def test_an_unreachable_api_server_fails_the_start_with_what_to_check(tmp_path: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    watcher = KubernetesCatalogWatcher(Catalog(), None, "ns", kubeconfig=str(tmp_path / "kubeconfig"))

    async def start() -> None:
        await watcher.start(timeout=2)

    with pytest.raises(
        TimeoutError, match="could not list ImageModel resources in namespace 'ns'.*kubeconfig"
    ):
        asyncio.run(start())
    assert watcher._task is not None and watcher._task.done()  # nothing left running
