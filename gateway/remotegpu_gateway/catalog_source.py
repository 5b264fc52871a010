"""Where the catalog comes from: a models file, or ImageModel resources in the cluster.

`Catalog` is the live, thread-safe set of models the gateway serves. A source fills it:
`load_models_file` (embedded default, `--models-file`) once, or `KubernetesCatalogWatcher`,
which lists and watches `imagemodels.remotegpu.ai/v1alpha1` in one namespace in a
background thread, reading `spec` (the catalog schema) and `status.state` (runtime
state written by the operator). Resources whose spec does not validate are skipped
and logged; the last good entry of a model is dropped with them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from remotegpu_base.catalog import API_GROUP, API_VERSION, PLURAL, ImageModel, load_models_file

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


class KubernetesCatalogWatcher:
    """Lists and watches ImageModel resources into a Catalog and the runtime registry.

    `start()` lists synchronously (so the catalog is complete when it returns, unless
    `wait=False`) and then watches in a daemon thread, relisting after errors and on
    410 Gone. `stop()` ends the thread.
    """

    def __init__(
        self,
        catalog: Catalog,
        registry: RuntimeRegistry | None,
        namespace: str,
        *,
        kubeconfig: str | None = None,
        api_client: Any = None,
        timeout_seconds: int = 30,
    ):
        self.catalog = catalog
        self.registry = registry
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self._api_client = api_client
        self.timeout_seconds = timeout_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listed = threading.Event()
        self._watch: Any = None
        self._states: dict[str, str] = {}  # resource name -> model id (for deletes)

    def _client(self) -> Any:
        from kubernetes import client, config

        if self._api_client is None:
            if self.kubeconfig:
                self._api_client = config.new_client_from_config(config_file=self.kubeconfig)
            else:
                try:
                    config.load_incluster_config()
                    self._api_client = client.ApiClient()
                except config.ConfigException:
                    self._api_client = config.new_client_from_config()
        return client.CustomObjectsApi(self._api_client)

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._run, name="imagemodel-watch", daemon=True)
        self._thread.start()
        if wait and not self._listed.wait(timeout):
            raise TimeoutError(f"could not list ImageModel resources in namespace {self.namespace!r}")

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()  # closes the response, which ends a watch blocked on the socket
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_seconds + 5)

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

    def _list(self, api: Any) -> str:
        resp = api.list_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL)
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

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = 0.5
        while not self._stop.is_set():
            try:
                api = self._client()
                rv = self._list(api)
                backoff = 0.5
                while not self._stop.is_set():
                    w = self._watch = watch.Watch()
                    for event in w.stream(
                        api.list_namespaced_custom_object,
                        API_GROUP,
                        API_VERSION,
                        self.namespace,
                        PLURAL,
                        resource_version=rv,
                        timeout_seconds=self.timeout_seconds,
                        allow_watch_bookmarks=True,
                    ):
                        if self._stop.is_set():
                            w.stop()
                            break
                        rv = self._handle(event) or rv
            except ApiException as e:
                if e.status != 410:
                    log.warning("ImageModel watch failed (%s); relisting", e.status)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10)
            except Exception as e:  # noqa: BLE001 - keep watching whatever happened
                log.warning("ImageModel watch error: %s; relisting", e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10)

    def _handle(self, event: dict[str, Any]) -> str | None:
        kind = event.get("type")
        obj = event.get("object") or {}
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            return rv
        if kind == "ERROR":
            from kubernetes.client.exceptions import ApiException

            raise ApiException(status=obj.get("code", 500), reason=obj.get("message"))
        name = str((obj.get("metadata") or {}).get("name") or "")
        if kind == "DELETED":
            self.catalog.remove(name)
            model_id = self._states.pop(name, None)
            if model_id and self.registry is not None:
                self.registry.set_cluster_state(model_id, None)
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
