"""`remotegpu gateway`: the gateway under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from types import FrameType

import uvicorn
from remotegpu_base import config

from remotegpu_gateway.app import create_app
from remotegpu_gateway.connections import uvicorn_config
from remotegpu_gateway.notify import Notifier
from remotegpu_gateway.settings import Settings, served_settings, worker_token


def settings_from_args(args: argparse.Namespace) -> Settings:
    data = config.data_dir(getattr(args, "data_dir", None))
    models_file = getattr(args, "models_file", None)
    namespace = getattr(args, "namespace", None)
    if not models_file and not namespace and os.environ.get("KUBERNETES_SERVICE_HOST"):
        namespace = os.environ.get("REMOTEGPU_NAMESPACE") or _pod_namespace()
    return Settings(
        **served_settings(args, data),
        worker_token=worker_token(data),
        results_dir=Path(os.environ["REMOTEGPU_RESULTS_DIR"])
        if os.environ.get("REMOTEGPU_RESULTS_DIR")
        else None,
        signing_secret=os.environ.get("REMOTEGPU_SIGNING_SECRET") or None,
        s3_bucket=os.environ.get("REMOTEGPU_S3_BUCKET") or None,
        s3_endpoint_url=os.environ.get("REMOTEGPU_S3_ENDPOINT_URL") or None,
        s3_region=os.environ.get("REMOTEGPU_S3_REGION") or None,
        s3_prefix=os.environ.get("REMOTEGPU_S3_PREFIX", ""),
        models_file=Path(models_file) if models_file else None,
        namespace=namespace,
        kubeconfig=os.environ.get("KUBECONFIG") or None,
    )


def _pod_namespace() -> str:
    try:
        return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
    except OSError:
        return "default"


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    app = create_app(settings)
    base = settings.public_url or "each request's own URL"
    print(
        f"gateway listening on {config.http_url(args.host, args.port)} (result URLs based on {base})",
        flush=True,
    )
    server_config = uvicorn_config(app, settings, host=args.host, port=args.port, log_level="warning")
    GatewayServer(server_config, app.state.gateway.notifier).run()
    return 0


class GatewayServer(uvicorn.Server):
    """uvicorn that ends the workers' and operators' long-polls when told to stop: otherwise
    each open poll holds the shutdown for up to its wait (a rolling restart stalls)."""

    def __init__(self, config: uvicorn.Config, notifier: Notifier):
        super().__init__(config)
        self.notifier = notifier

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.notifier.close()
        super().handle_exit(sig, frame)
