"""`remotegpu generate`, `remotegpu jobs list` and `remotegpu models list`: a small client
of the public API.

    remotegpu generate --model remotegpu/tiny-random-flux1 "a lighthouse at dusk" -o out.png
        [--size 512x512] [--steps N] [--seed N] [--guidance G] [--negative-prompt TEXT]
        [--image PATH ...] [--output-format png|jpeg|webp] [--output-quality 1-100]
        [--url URL] [--api-key KEY]
        [--priority low] [--deadline-seconds N] [--webhook-url URL [--webhook-event E ...]]
        [--idempotency-key KEY] [--wait N] [--poll]
    remotegpu jobs list [--status S] [--model M] [--limit N] [--all]
    remotegpu jobs timeline JOB_ID [--json]

The service URL is --url, else $REMOTEGPU_URL, else http://127.0.0.1:8000; the API key
is --api-key, else $REMOTEGPU_API_KEY. Submits the job, follows it until it ends through
its event stream (status, queue position with the expected start, and a progress bar of
the denoising steps; with --poll, or against a gateway without the stream, by polling
its status), and writes the image (PNG unless --output-format says otherwise; without
-o, out.png / out.jpg / out.webp). Ctrl-C while waiting cancels the job. Exit codes: 0
written, 1 the job failed or was cancelled, 2 a usage or request error, 3 the service
could not be reached.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")

HINTS = {
    401: "create a key with `remotegpu keys create --name me --scope inference` and pass it with "
    "--api-key or $REMOTEGPU_API_KEY",
    403: "this key lacks the inference scope; create one with `remotegpu keys create --name me --scope inference`",
    422: "check the request against `remotegpu models list` (sizes are fixed presets such as 512x512)",
    400: "check the model's limits with `remotegpu models list`",
    503: "this model cannot be served here right now; pick another with `remotegpu models list`",
    429: "this key is over one of its limits (`remotegpu keys update NAME` changes them)",
}


class ClientError(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _url(args: argparse.Namespace) -> str:
    return (getattr(args, "url", None) or os.environ.get("REMOTEGPU_URL") or DEFAULT_URL).rstrip("/")


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _api_error(r: httpx.Response) -> ClientError:
    try:
        err = r.json().get("error") or {}
        msg = err.get("message") or r.text
        items = err.get("errors") or []
        if len(items) > 1:
            msg += "".join(f"\n  - {e.get('field')}: {e.get('message')}" for e in items)
    except ValueError:
        msg = r.text[:500] or r.reason_phrase
    hint = HINTS.get(r.status_code)
    if r.status_code == 429 and r.headers.get("Retry-After"):
        hint = f"{hint}; retry in {r.headers['Retry-After']} s"
    return ClientError(f"HTTP {r.status_code}: {msg}" + (f"\nhint: {hint}" if hint else ""))


def _unreachable(url: str, e: Exception) -> ClientError:
    return ClientError(
        f"cannot reach {url} ({e}).\nhint: start the service with `make run` (or `remotegpu serve`), "
        "or point --url / $REMOTEGPU_URL at it",
        code=3,
    )


def parse_size(text: str) -> dict[str, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ClientError(f"--size {text!r}: expected WIDTHxHEIGHT, for example 512x512")
    return {"width": int(w), "height": int(h)}


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": args.prompt, "model": args.model}
    if args.negative_prompt:
        body["negative_prompt"] = args.negative_prompt
    if args.size:
        body["size"] = parse_size(args.size)
    if args.steps is not None:
        body["steps"] = args.steps
    if args.guidance is not None:
        body["guidance"] = args.guidance
    if args.seed is not None:
        body["seed"] = args.seed
    images = []
    for path in args.image or []:
        try:
            images.append(base64.b64encode(Path(path).read_bytes()).decode())
        except OSError as e:
            raise ClientError(f"--image {path}: {e.strerror or e}") from None
    if images:
        body["input_images_base64"] = images
    # Extensions of the gateway (gateway/README.md).
    if getattr(args, "priority", None):
        body["priority"] = args.priority
    if getattr(args, "deadline_seconds", None) is not None:
        body["deadline_seconds"] = args.deadline_seconds
    if getattr(args, "webhook_url", None):
        body["webhook_url"] = args.webhook_url
        if args.webhook_event:
            body["webhook_events"] = args.webhook_event
    if args.output_format:
        body["output_format"] = args.output_format
    if args.output_quality is not None:
        body["output_quality"] = args.output_quality
    return body


def submit_headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {}
    if getattr(args, "idempotency_key", None):
        headers["Idempotency-Key"] = args.idempotency_key
    if getattr(args, "wait", None):
        headers["Prefer"] = f"wait={args.wait:g}"
    return headers


def iter_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) of a Server-Sent Events stream; comments and retry lines skipped."""
    event, data = "message", ""
    for line in lines:
        if not line:
            if data:
                yield event, json.loads(data)
            event, data = "message", ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def stream_job(http: httpx.Client, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The job's events (`status`, `queue`, `progress`) until it ends. Raises LookupError
    without a stream (then poll the job's status instead)."""
    with http.stream("GET", f"/v1/inference/jobs/{job_id}/events", timeout=httpx.Timeout(60, read=90)) as r:
        if r.status_code != 200:  # an older gateway, or an error the status poll reports
            raise LookupError(f"no event stream (HTTP {r.status_code})")
        yield from iter_sse(r.iter_lines())


def _seconds_until(when: str | None) -> float | None:
    if not when:
        return None
    return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp() - datetime.now(UTC).timestamp()


EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def output_path(args: argparse.Namespace) -> Path:
    """-o, else out.<the format's extension>."""
    return Path(args.output or f"out.{EXTENSIONS[args.output_format or 'png']}")


class _Status:
    """Status display: one live line on a terminal, one line per change otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.job: dict[str, Any] = {}
        self.step: tuple[int, int] | None = None

    def queue(self, place: dict[str, Any], elapsed: float) -> None:
        self.job = {**self.job, **place}
        self.show(self.job, elapsed)

    def progress(self, step: int, total: int, elapsed: float) -> None:
        self.step = (step, total)
        if self.job:
            self.show(self.job, elapsed)

    def show(self, job: dict[str, Any], elapsed: float) -> None:
        self.job = job
        status = job["status"]
        text = f"{status:<9} wait {job.get('wait_ms', 0) / 1000:.1f}s  run {job.get('run_ms', 0) / 1000:.1f}s"
        if status == "warming":
            text += "  (the model is loading)"
        if status in ("queued", "warming") and job.get("queue_position") is not None:
            text += f"  position {job['queue_position']}"
            starts = _seconds_until(job.get("estimated_start_at"))
            if starts is not None:
                text += f", starts in ~{max(0.0, starts):.0f}s"
        if status == "running" and self.step is not None:
            step, total = self.step
            filled = int(20 * step / max(1, total))
            text += f"  [{'#' * filled}{'.' * (20 - filled)}] {step}/{total} steps"
        if self.tty:
            sys.stderr.write(f"\r{text}  [{elapsed:.0f}s]\033[K")
            sys.stderr.flush()
        elif status != self.last:
            print(text, file=sys.stderr, flush=True)
        self.last = status

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def generate(args: argparse.Namespace) -> int:
    try:
        return _generate(args)
    except ClientError as e:
        _err(str(e))
        return e.code


def _generate(args: argparse.Namespace) -> int:
    url = _url(args)
    key = getattr(args, "api_key", None) or os.environ.get("REMOTEGPU_API_KEY")
    if not key:
        raise ClientError(
            "no API key.\nhint: create one with `remotegpu keys create --name me --scope inference` "
            "(same --data-dir as the service), then export REMOTEGPU_API_KEY=<the secret> or pass --api-key"
        )
    body = build_request(args)
    out = output_path(args)
    headers = {"Authorization": f"Bearer {key}"}
    wait = getattr(args, "wait", None) or 0
    with httpx.Client(base_url=url, headers=headers, timeout=60 + wait) as http:
        try:
            r = http.post("/v1/inference/image", json=body, headers=submit_headers(args))
        except httpx.TransportError as e:
            raise _unreachable(url, e) from None
        if r.status_code not in (200, 201, 202):
            raise _api_error(r)
        job_id = r.json()["job_id"]
        replayed = " (the Idempotency-Key's original job)" if r.headers.get("Idempotent-Replayed") else ""
        print(f"job {job_id} accepted ({args.model}){replayed}", file=sys.stderr, flush=True)
        started = time.monotonic()
        display = _Status()
        job: dict[str, Any] = r.json() if r.status_code == 200 else {}  # Prefer: wait answered it
        try:
            if job.get("status") not in TERMINAL:
                job = _follow(http, url, job_id, display, started, poll=getattr(args, "poll", False))
        except KeyboardInterrupt:
            display.done()
            print(f"cancelling job {job_id} ...", file=sys.stderr, flush=True)
            try:
                r = http.post(f"/v1/inference/jobs/{job_id}/cancel")
                print(r.json().get("message", r.text), file=sys.stderr)
            except (httpx.HTTPError, ValueError) as e:
                _err(f"could not cancel: {e}")
            return 130
        display.done()
        timings = f"wait {job['wait_ms'] / 1000:.2f}s, run {job['run_ms'] / 1000:.2f}s"
        if job["status"] != "succeeded":
            detail = f": {job['error_message']}" if job.get("error_message") else ""
            _err(f"job {job_id} {job['status']}{detail} ({timings})")
            return 1
        try:
            r = http.get(job["result_url"])
        except httpx.TransportError as e:
            raise _unreachable(url, e) from None
        if r.status_code != 200:
            raise _api_error(r)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(r.content)
        print(f"wrote {out} ({len(r.content)} bytes; {timings})", file=sys.stderr, flush=True)
    return 0


def _follow(
    http: httpx.Client, url: str, job_id: str, display: _Status, started: float, poll: bool
) -> dict[str, Any]:
    """The job once finished: from its event stream, or by polling (--poll, a gateway
    without the stream, or a stream that broke off)."""
    if not poll:
        try:
            for event, data in stream_job(http, job_id):
                elapsed = time.monotonic() - started
                if event == "status":
                    display.show(data, elapsed)
                    if data["status"] in TERMINAL:
                        return data
                elif event == "queue":
                    display.queue(data, elapsed)
                elif event == "progress":
                    display.progress(data["step"], data["total_steps"], elapsed)
        except (LookupError, httpx.TransportError):
            pass  # poll instead
    while True:
        try:
            r = http.get(f"/v1/inference/jobs/{job_id}")
        except httpx.TransportError as e:
            raise _unreachable(url, e) from None
        if r.status_code != 200:
            raise _api_error(r)
        job: dict[str, Any] = r.json()
        display.show(job, time.monotonic() - started)
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.25 if time.monotonic() - started < 10 else 1.0)


def list_jobs(args: argparse.Namespace) -> int:
    """`remotegpu jobs list`: the key's jobs, newest first (all pages with --all)."""
    url = _url(args)
    key = getattr(args, "api_key", None) or os.environ.get("REMOTEGPU_API_KEY")
    if not key:
        _err("no API key; pass --api-key or set $REMOTEGPU_API_KEY")
        return 2
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    if args.model:
        params["model"] = args.model
    rows = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        while True:
            try:
                r = http.get("/v1/inference/jobs", params=params)
            except httpx.TransportError as e:
                _err(str(_unreachable(url, e)))
                return 3
            if r.status_code != 200:
                _err(str(_api_error(r)))
                return 2
            page = r.json()
            rows += page["jobs"]
            if not args.all or not page["next_cursor"]:
                break
            params["cursor"] = page["next_cursor"]
    print(f"{'JOB':<36}  {'STATUS':<9}  {'CREATED':<20}  MODEL")
    for j in rows:
        print(f"{j['job_id']:<36}  {j['status']:<9}  {j['created_at']:<20}  {j['model']}")
    return 0


def job_timeline(url: str, api_key: str, job_id: str) -> dict[str, Any]:
    """The job's cold-start timeline (GET /v1/inference/jobs/{id}/timeline); ClientError on failure."""
    try:
        r = httpx.get(
            f"{url.rstrip('/')}/v1/inference/jobs/{job_id}/timeline",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
        )
    except httpx.TransportError as e:
        raise _unreachable(url, e) from None
    if r.status_code != 200:
        raise _api_error(r)
    return dict(r.json())


def show_timeline(args: argparse.Namespace) -> int:
    """`remotegpu jobs timeline JOB_ID`: the phases of the cold start the job waited for."""
    key = getattr(args, "api_key", None) or os.environ.get("REMOTEGPU_API_KEY")
    if not key:
        _err("no API key; pass --api-key or set $REMOTEGPU_API_KEY")
        return 2
    try:
        t = job_timeline(_url(args), key, args.job_id)
    except ClientError as e:
        _err(str(e))
        return e.code
    if args.json:
        print(json.dumps(t, indent=2))
        return 0
    if t["waited_for_capacity"] is None:
        print(f"job {t['job_id']} has not run yet: its timeline is known once a worker takes it")
        return 0
    if not t["waited_for_capacity"]:
        print(f"job {t['job_id']} did not wait for capacity: worker {t['worker_id']} was ready")
        return 0
    cached = {True: "cached on the node", False: "fetched", None: "not reported"}[t["weights_cached"]]
    print(f"job {t['job_id']} waited for worker {t['worker_id']} (weights {cached})")
    print(f"{'PHASE':<18}  {'AT':<24}  {'TOOK':>8}  {'SINCE SUBMIT':>12}")
    for p in t["phases"]:
        took = "" if p["seconds"] is None else f"{p['seconds']:.3f}s"
        print(f"{p['phase']:<18}  {p['at']:<24}  {took:>8}  {p['since_submit_seconds']:>11.3f}s")
    return 0


def list_models(args: argparse.Namespace) -> int:
    url = _url(args)
    try:
        r = httpx.get(f"{url}/v1/inference/models", timeout=30)
    except httpx.TransportError as e:
        _err(str(_unreachable(url, e)))
        return 3
    if r.status_code != 200:
        _err(str(_api_error(r)))
        return 2
    rows = []
    for m in r.json().get("image", []):
        p = m["parameters"]
        rt = m.get("runtime", {})
        size = p["size"]["default"]
        g = p["guidance"]
        state = rt.get("state", "?") if rt.get("available", True) else "unavailable"
        rows.append(
            (
                m["model"],
                state,
                f"{size['width']}x{size['height']}",
                str(p["steps"]["default"]),
                f"{g['default']:g}" + (" fixed" if g.get("fixed") else ""),
                f"{p['input_images']['min']}-{p['input_images']['max']}",
                "yes" if p["negative_prompt"]["supported"] else "no",
            )
        )
    head = ("MODEL", "STATE", "SIZE", "STEPS", "GUIDANCE", "IMAGES", "NEGATIVE")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    for row in (head, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    return 0
