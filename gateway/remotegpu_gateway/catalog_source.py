"""Where the catalog comes from: a models file, or ImageModel resources in the cluster.

`Catalog` is the live, thread-safe set of models the gateway serves. A source fills it:
`load_models_file` (embedded default, `--models-file`) once, or `KubernetesCatalogWatcher`,
which lists and watches `imagemodels.remotegpu.ai/v1alpha1` in one namespace in a
task on the gateway's event loop (with the project's Kubernetes client, kr8s), reading `spec` (the catalog schema) and `status.state` (runtime
state written by the operator). Resources whose spec does not validate are skipped
and logged; the last good entry of a model is dropped with them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from remotegpu_base import kube
from remotegpu_base.catalog import ImageModel, load_models_file

from remotegpu_gateway.registry import RuntimeRegistry

log = logging.getLogger(__name__)


class Catalog:
    def __init__(self, models: Iterable[ImageModel] = ()):
        self._lock = threading.Lock()
        self._by_name: dict[str, ImageModel] = {}
        self._listeners: list[Callable[[], None]] = []
        self.replace(models)

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def _changed(self) -> None:
        for fn in list(self._listeners):
            fn()

    def replace(self, models: Iterable[ImageModel]) -> None:
        with self._lock:
            self._by_name = {m.name: m for m in models}
        self._changed()

    def upsert(self, model: ImageModel) -> None:
        with self._lock:
            self._by_name[model.name] = model
        self._changed()

    def remove(self, name: str) -> None:
        with self._lock:
            self._by_name.pop(name, None)
        self._changed()

    def models(self) -> list[ImageModel]:
        with self._lock:
            return sorted(self._by_name.values(), key=lambda m: m.spec.model)

    def get(self, model_id: str) -> ImageModel | None:
        with self._lock:
            for m in self._by_name.values():
                if m.spec.model == model_id:
                    return m
        return None

    def ids(self) -> list[str]:
        return [m.spec.model for m in self.models()]


def catalog_from_file(path: Path | str) -> Catalog:
    return Catalog(load_models_file(path))


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class KubernetesCatalogWatcher:
    """Lists and watches ImageModel resources into a Catalog and the runtime registry.

    `start()` lists (so the catalog is complete when it returns, unless `wait=False`)
    and then watches in a task on the caller's event loop, relisting after errors and
    on 410 Gone. `stop()` ends the task.
    """

    def __init__(
        self,
        catalog: Catalog,
        registry: RuntimeRegistry | None,
        namespace: str,
        *,
        kubeconfig: str | None = None,
        timeout_seconds: int = 30,
    ):
        self.catalog = catalog
        self.registry = registry
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.timeout_seconds = timeout_seconds
        self._task: asyncio.Task[None] | None = None
        self._listed = asyncio.Event()
        self._states: dict[str, str] = {}  # resource name -> model id (for deletes)

    async def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        self._task = asyncio.create_task(self._run(), name="imagemodel-watch")
        if wait:
            try:
                await asyncio.wait_for(self._listed.wait(), timeout)
            except TimeoutError:
                await self.stop()
                raise TimeoutError(
                    f"could not list ImageModel resources in namespace {self.namespace!r} "
                    f"within {timeout:.0f} s; check the gateway's kubeconfig or service account"
                ) from None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _parse(self, obj: dict[str, Any]) -> ImageModel | None:
        try:
            return ImageModel.from_resource(obj)
        except (ValidationError, KeyError, TypeError) as e:
            log.warning("ImageModel %s: invalid spec, skipped: %s", obj.get("metadata", {}).get("name"), e)
            return None

    def _apply_status(self, obj: dict[str, Any], model: ImageModel) -> None:
        if self.registry is None:
            return
        state = (obj.get("status") or {}).get("state")
        try:
            self.registry.set_cluster_state(model.spec.model, state or None)
        except ValueError:
            log.warning("ImageModel %s: unknown status.state %r", model.name, state)

    async def _list(self, api: kube.Api) -> str:
        resp = await kube.list_of(api, kube.ImageModelObject, self.namespace)
        models = []
        for obj in resp.get("items", []):
            m = self._parse(obj)
            if m is not None:
                models.append(m)
                self._apply_status(obj, m)
                self._states[m.name] = m.spec.model
        gone = set(self._states) - {m.name for m in models}
        for name in gone:
            if self.registry is not None:
                self.registry.set_cluster_state(self._states[name], None)
            del self._states[name]
        self.catalog.replace(models)
        self._listed.set()
        return str(resp.get("metadata", {}).get("resourceVersion", ""))

    async def _watch(self, api: kube.Api, rv: str) -> str:
        """One watch from `rv` until the server ends it; the last resourceVersion seen."""
        async for event in kube.watch(api, kube.ImageModelObject, self.namespace, rv, self.timeout_seconds):
            rv = self._handle(event) or rv
        return rv

    async def _run(self) -> None:
        backoff = 0.5
        api: kube.Api | None = None
        while True:
            try:
                api = api or await kube.connect(self.kubeconfig)  # kr8s re-reads credentials on a 401
                rv = await self._list(api)
                backoff = 0.5
                while True:
                    rv = await self._watch(api, rv)
            except WatchExpired:
                continue
            except Exception as e:  # noqa: BLE001 - keep watching whatever happened
                log.warning(
                    "ImageModel watch failed (%s); relisting in %.1f s", e or type(e).__name__, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)

    def _handle(self, event: dict[str, Any]) -> str | None:
        kind = event.get("type")
        obj = event.get("object") or {}
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            return rv
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise WatchExpired(obj.get("message"))
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        name = str((obj.get("metadata") or {}).get("name") or "")
        if kind == "DELETED":
            # Its cluster state first: a model gone from the catalog has none left.
            model_id = self._states.pop(name, None)
            if model_id and self.registry is not None:
                self.registry.set_cluster_state(model_id, None)
            self.catalog.remove(name)
            return rv
        model = self._parse(obj)
        if model is None:
            self.catalog.remove(name)
            return rv
        self._states[name] = model.spec.model
        self.catalog.upsert(model)
        self._apply_status(obj, model)
        return rv


__all__ = ["Catalog", "KubernetesCatalogWatcher", "catalog_from_file", "load_models_file"]
