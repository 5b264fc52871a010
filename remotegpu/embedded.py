"""`remotegpu serve`: the embedded default (what `make run` starts).

One process on one machine:
- the gateway (`remotegpu_gateway.app.create_app`) under uvicorn on 127.0.0.1:8000,
  with SQLite and a local results folder in the data directory;
- an in-process supervisor that long-polls the internal API's queue
  (`GET /internal/v1/queue?since=V`) and, per model, follows the same state machine as
  the cluster: the first job of a sleeping model starts a worker (state `starting`, its
  jobs `warming`), which loads the weights, warms up, and runs the ordinary worker loop
  (`remotegpu_worker.loop.WorkerLoop`) against the gateway over loopback HTTP with the
  worker token (`ready`); after the model's `scaling.idleSeconds` without a job it
  unloads (`sleeping`). Models with `scaling.minReplicas > 0` load at start and stay.
  Loads run one at a time (the engine serialises them); a failed load is tried
  LOAD_ATTEMPTS times with back-off, then the gateway fails the model's waiting jobs
  with the reason, and the model's next job starts a fresh try (never a 503).

On first start the tiny random-weight models are built into DATA_DIR/tiny-models (a
few seconds, with progress). FLUX models whose weights are neither a local folder nor
in the Hugging Face cache are marked unavailable (the API answers 503 with the reason).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from remotegpu_base import config
from remotegpu_base.catalog import DEFAULT_MODELS_FILE, ImageModel, load_models_file
from remotegpu_base.protocol import RuntimeState, WorkerAPIClient, WorkerStatus

log = logging.getLogger("remotegpu.embedded")

DRAIN_GRACE_ENV = "REMOTEGPU_DRAIN_GRACE_SECONDS"
IDLE_ENV = "REMOTEGPU_IDLE_SECONDS"  # overrides every model's scaling.idleSeconds (tests, demos)
# A failed load is tried this many times in all, waiting 2 s, then 4 s, ... in between.
LOAD_ATTEMPTS = 3
LOAD_BACKOFF_SECONDS = 2.0


def _say(msg: str) -> None:
    print(msg, flush=True)


def ensure_tiny_models(models: list[ImageModel], data_dir: Path) -> None:
    """Builds the random-weight pipelines the catalog names, if missing (first start)."""
    from remotegpu_worker import tiny
    from remotegpu_worker.engine import weights

    wanted = []
    for m in models:
        if not m.spec.weights.random:
            continue
        ok, _ = weights.available_locally(m.spec, data_dir)
        if not ok:
            wanted.append(m)
    if not wanted:
        return
    _say(f"first start: building {len(wanted)} tiny random-weight model(s) (offline, seconds) ...")
    started = time.monotonic()
    for i, m in enumerate(wanted, 1):
        loc = weights.resolve(m.spec, data_dir)
        assert loc.local_dir is not None
        _say(f"  [{i}/{len(wanted)}] {m.spec.model} ({m.spec.architecture.value}) -> {loc.local_dir}")
        tiny.build_tiny(
            loc.local_dir.parent,
            m.spec.architecture,
            progress=lambda s: _say(f"      {s.strip()}"),
        )
        if loc.local_dir.name != m.spec.architecture.value:  # a custom folder name
            built = loc.local_dir.parent / m.spec.architecture.value
            if built != loc.local_dir and not loc.local_dir.exists():
                built.rename(loc.local_dir)
    _say(f"tiny models ready ({time.monotonic() - started:.1f}s)")


class ModelWorker:
    """One model's in-process worker: load -> warm-up -> WorkerLoop until idle -> unload."""

    def __init__(self, sup: Supervisor, model: ImageModel, previous: ModelWorker | None):
        self.sup = sup
        self.model = model
        self.previous = previous
        self.loop: Any = None
        self.engine: Any = None
        self.thread = threading.Thread(target=self._run, name=f"worker-{model.name}", daemon=True)

    @property
    def accepting(self) -> bool:
        """Loading, or leasing: a new job will be picked up without another start."""
        if not self.thread.is_alive():
            return False
        return self.loop is None or not self.loop.draining

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        from remotegpu_worker.loop import LoopSettings, WorkerLoop, default_worker_id

        spec = self.model.spec
        if self.previous is not None:  # never hold two copies of a model's weights
            self.previous.thread.join()
        worker_id = f"embedded-{default_worker_id()}"
        _say(f"{spec.model}: loading (jobs report 'warming' until it is ready)")
        self.engine = self._load_with_retries(worker_id)
        if self.engine is None:
            return
        info = self.engine.info
        assert info is not None
        warm = info.warmup_seconds
        idle = (
            float(os.environ[IDLE_ENV])
            if os.environ.get(IDLE_ENV)
            else spec.scaling.idle_window(info.load_seconds)
        )
        settings = LoopSettings.from_env(
            idle_seconds=None if spec.scaling.min_replicas > 0 else idle,
            drain_grace_seconds=10.0,
            # Short long-polls: Ctrl-C then stops within seconds (loopback polls are cheap).
            lease_wait_seconds=2.0,
        )
        self.loop = WorkerLoop(
            self.engine, self.sup.client, worker_id=worker_id, metrics=self.sup.metrics, settings=settings
        )
        self.sup.metrics.ready.labels(spec.model).set(1)
        _say(
            f"{spec.model}: ready on {info.device} (load {info.load_seconds:.1f}s, warm-up {warm:.1f}s)"
            + (f"; unloads after {idle:.0f}s idle" if settings.idle_seconds is not None else "")
        )
        if self.sup.stopping.is_set():
            self.loop.drain()
        try:
            why = self.loop.run()
        finally:
            self.sup.metrics.ready.labels(spec.model).set(0)
            self.engine.unload()
            self.engine = None
        if why == "idle":
            _say(f"{spec.model}: idle for {idle:.0f}s, unloaded (sleeping)")

    def _load_with_retries(self, worker_id: str) -> Any:
        """Loads and warms up the model, retrying with back-off; None when it gave up (the
        gateway then fails the waiting jobs; the model's next job starts a fresh try)."""
        spec = self.model.spec
        backoff = LOAD_BACKOFF_SECONDS
        error = ""
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            self._report(worker_id, RuntimeState.STARTING, attempt - 1)
            try:
                return self._load()
            except Exception as e:  # noqa: BLE001 - any failure to load is retried, then reported
                error = f"{type(e).__name__}: {e}"
                log.exception("%s: load %d of %d failed", spec.model, attempt, LOAD_ATTEMPTS)
            if attempt < LOAD_ATTEMPTS:
                _say(
                    f"{spec.model}: load {attempt} of {LOAD_ATTEMPTS} failed ({error}); retrying in {backoff:.0f}s"
                )
                if self.sup.stopping.wait(backoff):
                    # Shutting down, not giving up: the jobs wait for the next start.
                    self._report(worker_id, RuntimeState.SLEEPING, 0)
                    return None
                backoff *= 2
        _say(f"{spec.model}: could not be loaded ({error}); its waiting jobs fail, the next job tries again")
        self._report(worker_id, RuntimeState.SLEEPING, LOAD_ATTEMPTS)
        return None

    def _load(self) -> Any:
        from remotegpu_worker.engine import ImageEngine

        spec = self.model.spec
        engine = ImageEngine(self.model, self.sup.data_dir, device=os.environ.get("REMOTEGPU_DEVICE") or None)
        try:
            info = engine.load()
            self.sup.metrics.load_seconds.labels(spec.model).set(info.load_seconds)
            self.sup.metrics.warmup_seconds.labels(spec.model).set(engine.warm_up())
        except BaseException:
            engine.unload()  # free what a failed try holds before the next one
            raise
        return engine

    def _report(self, worker_id: str, state: RuntimeState, load_failures: int) -> None:
        status = WorkerStatus(
            worker_id=worker_id, model=self.model.spec.model, state=state, load_failures=load_failures
        )
        client = self.sup.client()
        try:
            client.report_status(status)
        except Exception as e:  # noqa: BLE001 - the registry catches up with the next report
            log.warning("%s: status report failed: %s", self.model.spec.model, e)
        finally:
            client.close()


class Supervisor:
    """Starts and stops in-process workers from the queue depth the gateway reports."""

    def __init__(
        self, base_url: str, token: str, models: list[ImageModel], data_dir: Path, registry: Any, metrics: Any
    ):
        self.base_url = base_url
        self.token = token
        self.models = {m.spec.model: m for m in models}
        self.data_dir = data_dir
        self.registry = registry
        self.metrics = metrics
        self.workers: dict[str, ModelWorker] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def client(self) -> WorkerAPIClient:
        return WorkerAPIClient(self.base_url, self.token)

    def start(self) -> None:
        for m in self.models.values():
            if m.spec.scaling.min_replicas > 0 and self.registry.availability(m.spec.model)[0]:
                self.ensure(m.spec.model)
        self.thread.start()

    def ensure(self, model_id: str) -> None:
        with self._lock:
            if self.stopping.is_set():
                return
            current = self.workers.get(model_id)
            if current is not None and current.accepting:
                return
            if not self.registry.availability(model_id)[0]:
                return
            w = ModelWorker(self, self.models[model_id], current)
            self.workers[model_id] = w
            w.start()

    def _watch(self) -> None:
        client = self.client()
        version: int | None = None
        backoff = 0.5
        try:
            while not self.stopping.is_set():
                try:
                    # The wait is short so that a model that just went idle while a job
                    # arrived is restarted promptly even if nothing else changes.
                    snap = client.queue(since=version, wait_seconds=2.0)
                    backoff = 0.5
                except Exception as e:  # noqa: BLE001
                    if self.stopping.is_set():
                        return
                    log.warning("queue watch failed (%s); retrying", e)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                version = snap.version
                for model_id, q in snap.models.items():
                    if model_id in self.models and (q.queued + q.warming) > 0:
                        self.ensure(model_id)
        finally:
            client.close()

    def shutdown(self, grace: float, timeout: float = 30.0) -> None:
        """Stop leasing everywhere; running jobs get `grace` seconds, then are released."""
        self.stopping.set()
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            if w.loop is not None:
                w.loop.drain(grace)
        deadline = time.monotonic() + timeout
        for w in workers:
            while w.thread.is_alive() and time.monotonic() < deadline:
                if w.loop is not None:
                    w.loop.drain(grace)
                w.thread.join(timeout=0.2)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=os.environ.get("REMOTEGPU_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The embedded default serves only weights that are already here (a local folder or
    # the Hugging Face cache): never reach out to the Hub. Set HF_HUB_OFFLINE=0 to allow it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import uvicorn
    from remotegpu_gateway.app import create_app
    from remotegpu_gateway.connections import uvicorn_config
    from remotegpu_gateway.registry import RuntimeRegistry
    from remotegpu_gateway.settings import Settings, served_settings, worker_token
    from remotegpu_worker.engine import weights
    from remotegpu_worker.metrics import WorkerMetrics

    data = config.data_dir(getattr(args, "data_dir", None))
    models_file = Path(args.models_file) if getattr(args, "models_file", None) else DEFAULT_MODELS_FILE
    try:
        models = load_models_file(models_file)
    except (OSError, ValueError) as e:
        print(f"remotegpu serve: cannot read the catalog {models_file}: {e}", file=sys.stderr)
        return 2
    _say(f"data directory: {data}")
    if not getattr(args, "no_build_tiny", False):
        ensure_tiny_models(models, data)

    registry = RuntimeRegistry()
    for m in models:
        ok, why = weights.available_locally(m.spec, data)
        registry.set_availability(m.spec.model, ok, why)
    host, port = args.host, args.port
    # The in-process workers reach the gateway over loopback, whatever address it listens on.
    base_url = config.http_url(config.loopback_for(host), port)
    token = worker_token(data, announce=False)
    settings = Settings(**served_settings(args, data), worker_token=token, models=models)
    app = create_app(settings, registry=registry)
    gw = app.state.gateway
    metrics = WorkerMetrics(registry=gw.metrics.registry)  # one /metrics for gateway and workers
    sup = Supervisor(base_url, token, models, data, registry, metrics)
    grace = float(os.environ.get(DRAIN_GRACE_ENV) or 10.0)

    class Server(uvicorn.Server):
        _draining = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self._draining:  # a second Ctrl-C: stop now
                super().handle_exit(sig, frame)
                return
            self._draining = True
            _say("stopping: running jobs get a few seconds, then go back to the queue ...")

            def drain_then_exit() -> None:
                try:
                    sup.shutdown(grace)
                finally:
                    gw.notifier.close()
                    self.should_exit = True

            threading.Thread(target=drain_then_exit, name="drain", daemon=True).start()

    server = Server(uvicorn_config(app, settings, host=host, port=port, log_level="warning"))

    def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        sup.start()
        # Import torch and diffusers now, so that the first job does not pay for it.
        from remotegpu_worker.engine.pipelines import preload_libraries

        threading.Thread(target=preload_libraries, name="preload", daemon=True).start()
        lines = ["", f"RemoteGPU Image is serving on {base_url}", "", "models:"]
        for m in models:
            ok, _why = registry.availability(m.spec.model)
            if not ok:
                note = "unavailable here (weights not present locally; requests get 503)"
            elif m.spec.weights.random:
                note = "available (random weights built locally: produces noise)"
            else:
                note = "available"
            lines.append(f"  {m.spec.model:<40} {note}")
        data_flag = "" if getattr(args, "data_dir", None) is None else f" --data-dir {data}"
        lines += [
            "",
            "create an API key (the secret is printed once):",
            f"  remotegpu keys create --name me --scope inference{data_flag}",
            "then:",
            f"  export REMOTEGPU_URL={base_url} REMOTEGPU_API_KEY=<the secret>",
            '  remotegpu generate --model remotegpu/tiny-random-flux1 "a lighthouse at dusk" -o out.png',
            "",
            "Ctrl-C stops the service (running jobs are handed back to the queue, nothing is lost).",
        ]
        _say("\n".join(lines))

    threading.Thread(target=announce, name="announce", daemon=True).start()
    try:
        server.run()
    finally:
        sup.stopping.set()
    return 0
