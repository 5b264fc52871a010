"""The `remotegpu` command: every part of the system is driven through it."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from datetime import date

from remotegpu_base import __version__


def _handler(target: str) -> Callable[[argparse.Namespace], int]:
    """Resolves 'module:function' lazily, so `remotegpu keys` never imports torch."""

    def run(args: argparse.Namespace) -> int:
        module, _, func = target.partition(":")
        return getattr(importlib.import_module(module), func)(args) or 0

    return run


def _state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="state folder (default $REMOTEGPU_DATA_DIR or ./.remotegpu)")
    p.add_argument(
        "--database-url", help="database URL (default $REMOTEGPU_DATABASE_URL or SQLite in the data dir)"
    )


def _retention_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--retention-hours",
        type=float,
        help="delete finished jobs and their images this long after they end; 0 keeps them "
        "(default $REMOTEGPU_RETENTION_HOURS or 168, the life of a signed result_url)",
    )


def _public_url_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--public-url",
        help="absolute base URL used in result_url (default $REMOTEGPU_PUBLIC_URL, else http://HOST:PORT; "
        "with --host 0.0.0.0 or ::, each request's own base URL)",
    )


def _start_timeout_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--start-timeout-seconds",
        type=float,
        help="a job that has not started this long after it was queued fails, saying why; an ImageModel's "
        "scaling.startTimeoutSeconds overrides it (default $REMOTEGPU_START_TIMEOUT_SECONDS or 900)",
    )


def _webhook_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--webhook-allowed-networks",
        metavar="CIDRS",
        help="comma-separated networks webhooks may call although private, loopback or link-local "
        "(default $REMOTEGPU_WEBHOOK_ALLOWED_NETWORKS; none)",
    )


def _action_state_options(p: argparse.ArgumentParser) -> None:
    """The state flags also after the action (`keys create --data-dir D`); absent ones leave the parent's."""
    p.add_argument("--data-dir", default=argparse.SUPPRESS, help="state folder")
    p.add_argument("--database-url", default=argparse.SUPPRESS, help="database URL")


def _server_options(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=port, help=f"port to listen on (default {port})")


def _cors_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (scheme://host[:port], or *) call the API; repeatable "
        "(default $REMOTEGPU_CORS_ORIGINS, comma-separated; none: CORS off)",
    )


def _limit(kind: type) -> Callable[[str], int | float | None]:
    def parse(text: str) -> int | float | None:
        if text == "default":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a number (0: unlimited) or `default`"
            ) from None
        if value < 0:
            raise argparse.ArgumentTypeError("expected 0 (unlimited) or a positive number")
        return value  # type: ignore[no-any-return]

    return parse


def _limit_options(p: argparse.ArgumentParser) -> None:
    """Per-key limits; absent flags leave the key's values alone (`default`: the gateway's)."""
    for flag, kind, what in (
        ("--requests-per-minute", int, "submits per minute"),
        ("--max-concurrent-jobs", int, "unfinished (queued, warming, running) jobs at once"),
        ("--gpu-seconds-per-day", float, "GPU-seconds (jobs' run time) per UTC day"),
    ):
        p.add_argument(
            flag,
            type=_limit(kind),
            default=argparse.SUPPRESS,
            metavar="N",
            help=f"{what}; 0: unlimited, default: the gateway's",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remotegpu", description=__doc__)
    parser.add_argument("--version", action="version", version=f"remotegpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve", help="the embedded default: gateway and an in-process worker, SQLite, local results"
    )
    _server_options(p, 8000)
    _state_options(p)
    p.add_argument("--models-file", help="catalog file of ImageModel resources (default: the bundled one)")
    _public_url_option(p)
    _retention_option(p)
    _cors_option(p)
    _start_timeout_option(p)
    _webhook_option(p)
    p.add_argument(
        "--no-build-tiny", action="store_true", help="do not build the tiny random-weight models on start"
    )
    p.set_defaults(func=_handler("remotegpu.embedded:serve"))

    p = sub.add_parser("gateway", help="the public API and the internal worker API")
    _server_options(p, 8000)
    _state_options(p)
    p.add_argument(
        "--models-file", help="catalog file (default: watch ImageModel resources when in a cluster)"
    )
    p.add_argument("--namespace", help="namespace whose ImageModel resources make the catalog")
    _public_url_option(p)
    _retention_option(p)
    _cors_option(p)
    _start_timeout_option(p)
    _webhook_option(p)
    p.set_defaults(func=_handler("remotegpu_gateway.server:run"))

    p = sub.add_parser("worker", help="an inference worker for one model")
    _server_options(p, 8001)
    _state_options(p)
    p.add_argument("--model", required=True, help="public model ID to serve")
    p.add_argument("--gateway-url", help="gateway base URL (default $REMOTEGPU_GATEWAY_URL)")
    p.add_argument("--models-file", help="catalog file with the model's entry (default: the bundled one)")
    p.set_defaults(func=_handler("remotegpu_worker.main:run"))

    p = sub.add_parser("operator", help="the kopf operator reconciling ImageModel resources")
    p.add_argument("--namespace", action="append", help="namespace to watch (repeatable; default all)")
    p.add_argument("--gateway-url", help="gateway base URL for queue depth (default $REMOTEGPU_GATEWAY_URL)")
    p.add_argument("--host", default="127.0.0.1", help="address of the health and metrics endpoint")
    p.add_argument("--port", type=int, default=8002, help="port of the health and metrics endpoint")
    p.set_defaults(func=_handler("remotegpu_operator.main:run"))

    p = sub.add_parser(
        "keys", help="create, list, rotate and revoke API keys; set their limits and read their usage"
    )
    _state_options(p)
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys.add_parser("create", help="create a key; prints the secret as the last line")
    k.add_argument("name_arg", nargs="?", metavar="NAME", help="the key's name (or --name)")
    k.add_argument("--name")
    k.add_argument(
        "--scope", action="append", choices=["inference", "admin"], help="repeatable (default inference)"
    )
    _limit_options(k)
    _action_state_options(k)
    k = keys.add_parser(
        "update",
        help="set a key's limits (every gateway replica applies them at once); prints them",
        description="Set a key's limits; flags not given stay as they are. N: a number (0: unlimited) "
        "or `default` (the gateway's default: $REMOTEGPU_KEY_REQUESTS_PER_MINUTE, "
        "$REMOTEGPU_KEY_MAX_CONCURRENT_JOBS, $REMOTEGPU_KEY_GPU_SECONDS_PER_DAY, the chart's gateway.keyLimits).",
    )
    k.add_argument("key", help="the key's id or name")
    _limit_options(k)
    _action_state_options(k)
    k = keys.add_parser(
        "usage",
        help="a key's finished jobs and GPU-seconds by UTC day and model (for chargeback)",
        description="Finished jobs (succeeded, failed, cancelled) and GPU-seconds by UTC day and model. "
        "GPU-seconds are the jobs' run time (run_ms / 1000). Kept after the jobs themselves are deleted.",
    )
    k.add_argument("key", help="the key's id or name")
    k.add_argument("--since", type=date.fromisoformat, help="first UTC day, YYYY-MM-DD")
    k.add_argument("--until", type=date.fromisoformat, help="last UTC day, YYYY-MM-DD")
    k.add_argument("--json", action="store_true", help="print the admin API's JSON instead of a table")
    _action_state_options(k)
    k = keys.add_parser("list", help="list keys (never their secrets)")
    _action_state_options(k)
    k = keys.add_parser("rotate", help="new secret for the same key identity")
    k.add_argument("id")
    k.add_argument("--grace-seconds", type=int, default=0, help="keep the old secret valid this long")
    _action_state_options(k)
    k = keys.add_parser(
        "webhook-secret",
        help="create or rotate the key's webhook signing secret (whsec_...); prints it as the last line",
    )
    k.add_argument("key", metavar="NAME", help="the key's name (or id)")
    _action_state_options(k)
    k = keys.add_parser("revoke", help="revoke a key")
    k.add_argument("id")
    _action_state_options(k)
    p.set_defaults(func=_handler("remotegpu_gateway.keys_cli:run"))

    p = sub.add_parser("generate", help="submit a job, follow it and write the image")
    p.add_argument("prompt")
    p.add_argument("--model", required=True)
    p.add_argument("-o", "--output", help="where to write the image (default out.png, out.jpg or out.webp)")
    p.add_argument("--url", help="service URL (default $REMOTEGPU_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="API key (default $REMOTEGPU_API_KEY)")
    p.add_argument("--size", help="WIDTHxHEIGHT, one of the presets")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument("--image", action="append", default=[], help="input image path (repeatable)")
    p.add_argument(
        "--priority",
        choices=["normal", "low"],
        help="low: run only on workers already up, after normal jobs (never wakes a sleeping model)",
    )
    p.add_argument(
        "--deadline-seconds",
        type=int,
        help="cancel the job if it has not finished this long after submitting",
    )
    p.add_argument(
        "--webhook-url", help="http(s) URL that gets the job's signed webhooks (Standard Webhooks)"
    )
    p.add_argument(
        "--webhook-event",
        action="append",
        choices=["running", "completed"],
        help="which webhooks to send (repeatable; default both)",
    )
    p.add_argument(
        "--idempotency-key",
        help="retrying with the same key and request returns the original job, never a second",
    )
    p.add_argument(
        "--wait",
        type=float,
        metavar="N",
        help="ask the gateway to answer once the job finished, if within N s (at most 60; Prefer: wait)",
    )
    p.add_argument(
        "--poll", action="store_true", help="poll the job status instead of following its event stream"
    )
    p.add_argument(
        "--output-format", choices=["png", "jpeg", "webp"], help="the result's format (default png)"
    )
    p.add_argument("--output-quality", type=int, help="jpeg/webp quality 1-100 (default 90)")
    p.set_defaults(func=_handler("remotegpu.client:generate"))

    p = sub.add_parser("jobs", help="the jobs of your API key")
    jobs = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    j = jobs.add_parser("list", help="your jobs, newest first")
    j.add_argument("--url", help="service URL (default $REMOTEGPU_URL or http://127.0.0.1:8000)")
    j.add_argument("--api-key", help="API key (default $REMOTEGPU_API_KEY)")
    j.add_argument(
        "--status",
        choices=["queued", "warming", "running", "succeeded", "failed", "cancelled"],
        action="append",
    )
    j.add_argument("--model")
    j.add_argument("--limit", type=int, default=50, help="jobs per page (default 50, at most 200)")
    j.add_argument("--all", action="store_true", help="every page, not only the first")
    j.set_defaults(func=_handler("remotegpu.client:list_jobs"))
    j = jobs.add_parser(
        "timeline",
        help="the cold start a job waited for, phase by phase",
        description="For a job submitted before its worker was ready: when that worker reached each phase "
        "(scale_decision, pod_scheduled, container_started, weights_fetched when the node's cache did not have "
        "them, process_started, weights_loaded, warmed, first_lease) and how long each took.",
    )
    j.add_argument("job_id")
    j.add_argument("--url", help="service URL (default $REMOTEGPU_URL or http://127.0.0.1:8000)")
    j.add_argument("--api-key", help="API key (default $REMOTEGPU_API_KEY)")
    j.add_argument("--json", action="store_true", help="print the response as JSON")
    j.set_defaults(func=_handler("remotegpu.client:show_timeline"))

    p = sub.add_parser("cache", help="the model cache: fetch weights once per node, clean up")
    cache = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    c = cache.add_parser(
        "fetch",
        help="make a folder a complete, checked copy of a model's weights (the worker pods' init container)",
        description="Checks DEST against its manifest (every file's size; with --verify full its SHA-256 too) and "
        "fetches only what is missing or bad: from a Hugging Face repo (HF_ENDPOINT, HF_TOKEN), an S3-compatible "
        "bucket (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the pod's identity) or a folder. "
        "Processes fetching into one folder wait on a lock: one fetches, the others find it complete.",
    )
    c.add_argument("--dest", required=True, help="the cache folder of this model")
    c.add_argument("--hf-repo", help="Hugging Face repo id")
    c.add_argument("--revision", help="commit hash (pins the weights), branch or tag")
    c.add_argument("--s3-bucket", help="S3-compatible bucket: every object under --s3-prefix is a file")
    c.add_argument("--s3-prefix", default="", help="the model's folder in the bucket")
    c.add_argument("--s3-endpoint", help="the S3-compatible server's URL (default: AWS S3)")
    c.add_argument("--s3-region", help="the bucket's region (default us-east-1)")
    c.add_argument("--from-dir", help="copy from this folder (a mounted PVC or host path)")
    c.add_argument("--verify", choices=["sizes", "full"], default="sizes")
    c.add_argument("--record", help="write the result (JSON) here, for the worker's timeline")
    c.add_argument("--termination-log", help="write the result here too (Kubernetes: /dev/termination-log)")
    c.add_argument("--make-dir", action="append", help="also create this folder (e.g. the compile cache)")
    c.set_defaults(func=_handler("remotegpu_worker.cache:fetch_command"))
    c = cache.add_parser("gc", help="delete the caches of models that no longer exist")
    c.add_argument("--root", required=True, help="the folder holding one cache folder per model")
    c.add_argument("--keep", default="", help="comma-separated folder names to keep")
    c.set_defaults(func=_handler("remotegpu_worker.cache:gc_command"))

    p = sub.add_parser(
        "chart-hook", help="what the Helm chart's hook Jobs run (secrets, CRD upgrade, uninstall)"
    )
    p.add_argument("--kubeconfig", help="default $KUBECONFIG, ~/.kube/config, else the pod's service account")
    hooks = p.add_subparsers(dest="hook_command", required=True, metavar="ACTION")
    h = hooks.add_parser(
        "secrets", help="create the missing generated Secrets; keep existing ones as they are"
    )
    h.add_argument("--namespace", required=True)
    h.add_argument(
        "--secret", action="append", metavar="NAME=KEY", help="a Secret and its data key; repeatable"
    )
    h.add_argument(
        "--label", action="append", metavar="KEY=VALUE", help="a label for the Secrets; repeatable"
    )
    h = hooks.add_parser("crd-upgrade", help="replace the ImageModel CRD with the chart's")
    h.add_argument("--crd", help="the CRD as JSON (default $CRD)")
    h = hooks.add_parser("uninstall", help="delete the release's ImageModels and wait for the operator")
    h.add_argument("--namespace", required=True)
    h.add_argument("--selector", required=True, help="label selector of the release's ImageModels")
    h.add_argument("--timeout-seconds", type=float, default=240.0)
    p.set_defaults(func=_handler("remotegpu.chart_hooks:command"))

    p = sub.add_parser("models", help="the model catalog and the tiny random-weight models")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    m = models.add_parser("list", help="print the catalog of a running service")
    m.add_argument("--url", help="service URL (default $REMOTEGPU_URL or http://127.0.0.1:8000)")
    m.set_defaults(func=_handler("remotegpu.client:list_models"))
    m = models.add_parser("build-tiny", help="build small random-weight pipelines offline")
    m.add_argument("out_dir", nargs="?", help="output folder (default DATA_DIR/tiny-models)")
    m.add_argument("--data-dir")
    m.add_argument("--force", action="store_true", help="rebuild even when present")
    m.set_defaults(func=_handler("remotegpu_worker.tiny:build_command"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
