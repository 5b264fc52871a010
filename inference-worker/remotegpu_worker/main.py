"""`remotegpu worker --model M --gateway-url URL [--host H --port P]`: one model, one process.

The model's catalog entry (an `ImageModel` spec, the same schema as the CRD) comes from:
1. `$REMOTEGPU_MODEL_SPEC`: JSON, either the spec (`{"model": ..., "architecture": ...}`)
   or a whole ImageModel resource (`{"metadata": ..., "spec": {...}}`). The operator
   passes the ImageModel's spec this way, so a worker never needs the catalog file;
2. else the entry whose `model` (or resource name) is `--model` in `--models-file`
   (default: the bundled base/remotegpu_base/models.yaml).

The worker token is `$REMOTEGPU_WORKER_TOKEN` (else DATA_DIR/worker-token, which a local
`remotegpu gateway` writes). Other settings: `$REMOTEGPU_GATEWAY_URL`, `$REMOTEGPU_DEVICE`
(cpu, cuda, cuda:1; default cuda when present), `$REMOTEGPU_TORCH_THREADS`,
`$REMOTEGPU_LEASE_WAIT_SECONDS`, `$REMOTEGPU_HEARTBEAT_SECONDS`,
`$REMOTEGPU_DRAIN_GRACE_SECONDS` (default: the spec's terminationGracePeriodSeconds - 15),
`$REMOTEGPU_UPLOAD_RETRY_SECONDS` (how long a failed result upload is sent again; default 60),
`$REMOTEGPU_WORKER_ID`, and the Hugging Face variables (`HF_HUB_OFFLINE`, `HF_HOME`, `HF_TOKEN`).

Lifecycle: HTTP up (/healthz live) -> load weights -> warm-up -> /readyz 200 -> loop.
SIGTERM/SIGINT: stop leasing, let the current job finish within the grace period, else
hand it back (release); a second signal hands it back at the next step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from remotegpu_base import config
from remotegpu_base.catalog import DEFAULT_MODELS_FILE, ImageModel, ImageModelSpec, load_models_file
from remotegpu_base.protocol import WORKER_TOKEN_ENV, ColdStartPhase, RuntimeState, WorkerAPIClient

MODEL_SPEC_ENV = "REMOTEGPU_MODEL_SPEC"
GATEWAY_URL_ENV = "REMOTEGPU_GATEWAY_URL"

log = logging.getLogger("remotegpu_worker")


class ConfigError(Exception):
    pass


def model_from_env_or_file(model_id: str | None, models_file: str | None) -> ImageModel:
    raw = os.environ.get(MODEL_SPEC_ENV)
    if raw:
        try:
            doc: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"${MODEL_SPEC_ENV} is not JSON: {e}") from None
        if "spec" in doc:
            name = (doc.get("metadata") or {}).get("name") or doc["spec"].get("model", "model")
            model = ImageModel(name=name, spec=ImageModelSpec.model_validate(doc["spec"]))
        else:
            spec = ImageModelSpec.model_validate(doc)
            model = ImageModel(name=spec.model.rsplit("/", 1)[-1].lower(), spec=spec)
        if model_id and model_id not in (model.spec.model, model.name):
            raise ConfigError(
                f"--model {model_id} does not match ${MODEL_SPEC_ENV} (model {model.spec.model})"
            )
        return model
    if not model_id:
        raise ConfigError(f"--model is required (or pass the catalog entry in ${MODEL_SPEC_ENV})")
    path = Path(models_file) if models_file else DEFAULT_MODELS_FILE
    for m in load_models_file(path):
        if model_id in (m.spec.model, m.name):
            return m
    raise ConfigError(f"model {model_id!r} is not in {path}")


def worker_token(data_dir: Path) -> str:
    token = os.environ.get(WORKER_TOKEN_ENV)
    if token:
        return token.strip()
    path = data_dir / "worker-token"
    if path.is_file():
        return path.read_text().strip()
    raise ConfigError(f"set ${WORKER_TOKEN_ENV} to the gateway's worker token")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=os.environ.get("REMOTEGPU_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        model = model_from_env_or_file(getattr(args, "model", None), getattr(args, "models_file", None))
        gateway_url = getattr(args, "gateway_url", None) or os.environ.get(GATEWAY_URL_ENV)
        if not gateway_url:
            raise ConfigError(f"--gateway-url (or ${GATEWAY_URL_ENV}) is required")
        data = config.data_dir(getattr(args, "data_dir", None))
        token = worker_token(data)
    except (ConfigError, ValueError) as e:
        print(f"remotegpu worker: {e}", file=sys.stderr)
        return 2
    return serve_worker(model, gateway_url, token, data, host=args.host, port=args.port)


def serve_worker(
    model: ImageModel, gateway_url: str, token: str, data_dir: Path, *, host: str, port: int
) -> int:
    # Heavy imports (torch, diffusers) after argument checks, so mistakes fail fast.
    from remotegpu_worker.engine import ImageEngine
    from remotegpu_worker.loop import LoopSettings, WorkerLoop, default_worker_id
    from remotegpu_worker.metrics import WorkerMetrics
    from remotegpu_worker.server import HttpServer, WorkerState, create_app
    from remotegpu_worker.startup import StartupPhases

    spec = model.spec
    metrics = WorkerMetrics()
    metrics.init_model(spec.model)
    state = WorkerState(spec.model)
    http = HttpServer(create_app(state, metrics.registry), host, port)
    http.start()
    log.info("worker for %s: health and metrics on http://%s:%d", spec.model, host, port)

    def client() -> WorkerAPIClient:
        return WorkerAPIClient(gateway_url, token)

    worker_id = os.environ.get("REMOTEGPU_WORKER_ID") or default_worker_id()
    stop_requested = threading.Event()
    signals = [0]

    def on_signal(signum: int, _frame: Any) -> None:
        signals[0] += 1
        stop_requested.set()
        loop = state.loop
        log.info("%s: draining", signal.Signals(signum).name)
        state.phase = "draining" if state.phase == "ready" else state.phase
        if loop is not None:
            loop.drain(0 if signals[0] > 1 else None)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    phases = StartupPhases()
    engine = ImageEngine(model, data_dir, device=os.environ.get("REMOTEGPU_DEVICE") or None)
    reporter = client()
    from remotegpu_base.protocol import WorkerStatus

    def report(s: RuntimeState, load_failures: int = 0) -> None:
        try:
            reporter.report_status(
                WorkerStatus(
                    worker_id=worker_id,
                    model=spec.model,
                    state=s,
                    load_seconds=state.load_seconds,
                    load_failures=load_failures,
                )
            )
        except Exception as e:  # noqa: BLE001 - advisory
            log.debug("status report failed: %s", e)

    try:
        report(RuntimeState.STARTING)
        state.phase = "loading"
        info = engine.load()
        phases.reached(ColdStartPhase.WEIGHTS_LOADED)
        state.load_seconds = info.load_seconds
        metrics.load_seconds.labels(spec.model).set(info.load_seconds)
        for note in info.notes:
            log.info("%s: %s", spec.model, note)
        state.phase = "warming"
        state.warmup_seconds = engine.warm_up()
        phases.reached(ColdStartPhase.WARMED)
        metrics.warmup_seconds.labels(spec.model).set(state.warmup_seconds)
        phases.report(reporter, worker_id, spec.model)
    except Exception as e:  # noqa: BLE001
        log.exception("could not load %s", spec.model)
        state.phase, state.error = "failed", f"{type(e).__name__}: {e}"
        # The gateway then says why this model's jobs did not start if they time out. Not
        # "gave up" (sleeping with failures): Kubernetes restarts the pod, and the next
        # try may load.
        report(RuntimeState.STARTING, load_failures=1)
        report(RuntimeState.SLEEPING)
        reporter.close()
        http.stop()
        print(f"remotegpu worker: could not load {spec.model}: {e}", file=sys.stderr)
        return 1

    settings = LoopSettings.from_env(
        drain_grace_seconds=max(0.0, spec.worker.termination_grace_period_seconds - 15.0)
    )
    loop = WorkerLoop(engine, client, worker_id=worker_id, metrics=metrics, settings=settings)
    state.loop = loop
    if stop_requested.is_set():
        loop.drain()
    else:
        state.phase = "ready"
        metrics.ready.labels(spec.model).set(1)
        log.info(
            "%s ready (load %.2fs, warm-up %.2fs, %s %s); worker %s leasing from %s",
            spec.model,
            info.load_seconds,
            state.warmup_seconds,
            info.device,
            info.dtype,
            worker_id,
            gateway_url,
        )
    try:
        if not stop_requested.is_set():
            loop.run()
        else:
            report(RuntimeState.SLEEPING)
    finally:
        metrics.ready.labels(spec.model).set(0)
        state.phase = "stopped"
        reporter.close()
        http.stop()
        log.info("worker stopped after %d job(s)", loop.jobs_done)
    return 0
