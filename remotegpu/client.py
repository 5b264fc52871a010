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

From Python, `Client` speaks the same API, extensions included (gateway/README.md):

    from remotegpu.client import Client

    with Client("http://127.0.0.1:8000", api_key) as c:
        sub = c.submit({"model": "remotegpu/tiny-random-flux1", "prompt": "a lighthouse",
                        "priority": "low", "deadline_seconds": 600},
                       idempotency_key="order-42", wait=30)  # Idempotency-Key, Prefer: wait=30
        job = sub.final or c.follow(sub.job_id)  # the event stream (status, queue, progress)
        png = c.result(sub.job_id)
        mine = list(c.jobs(status="succeeded"))  # every page, newest first
        deliveries = c.webhooks(sub.job_id)      # the job's webhook deliveries

`c.events(job_id, last_event_id=None)` yields the stream's events (kind, data, id: pass the
last id to resume), `c.timeline(job_id)` the
cold-start timeline, `c.cancel(job_id)` cancels; with an admin key
`c.webhook_secret(key_id)` creates or rotates a key's webhook signing secret. Errors
raise `ClientError` with the service's message and a hint.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

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


@dataclass
class Submission:
    """A submit's answer: the job, whether an Idempotency-Key replayed it, and its final
    status when `Prefer: wait` saw it finish (else None)."""

    job_id: str
    result_url: str
    replayed: bool
    final: dict[str, Any] | None


class Client:
    """The public API (and its extensions) for Python programs; ClientError on failure."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        self.url = (url or os.environ.get("REMOTEGPU_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("REMOTEGPU_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _unreachable(self.url, e) from None
        if r.status_code not in ok:
            raise _api_error(r)
        return r

    def submit(
        self, body: dict[str, Any], *, idempotency_key: str | None = None, wait: float | None = None
    ) -> Submission:
        """POST /v1/inference/image. `wait` (seconds, at most 60) sends `Prefer: wait=N`."""
        headers = {}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if wait:
            headers["Prefer"] = f"wait={wait:g}"
        timeout = self.http.timeout.read or 60.0
        r = self._call(
            "POST",
            "/v1/inference/image",
            (200, 202),
            json=body,
            headers=headers,
            timeout=timeout + (wait or 0),
        )
        data = r.json()
        return Submission(
            job_id=data["job_id"],
            result_url=data["result_url"],
            replayed=r.headers.get("Idempotent-Replayed") == "true",
            final=data if r.status_code == 200 else None,
        )

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/inference/jobs/{job_id}").json())

    def jobs(
        self, status: str | None = None, model: str | None = None, limit: int = 50
    ) -> Iterator[dict[str, Any]]:
        """The key's jobs, newest first, every page (GET /v1/inference/jobs)."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if model:
            params["model"] = model
        while True:
            page = self._call("GET", "/v1/inference/jobs", params=params).json()
            yield from page["jobs"]
            if not page["next_cursor"]:
                return
            params["cursor"] = page["next_cursor"]

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[ServerEvent]:
        """The job's Server-Sent Events (`status`, `queue`, `progress`) until it ends; after
        `last_event_id` (an earlier event's id), only what changed since."""
        path = f"/v1/inference/jobs/{job_id}/events"
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with self.http.stream("GET", path, headers=headers, timeout=httpx.Timeout(60, read=90)) as r:
                if r.status_code != 200:
                    r.read()
                    raise _api_error(r)
                yield from iter_sse(r.iter_lines())
        except httpx.TransportError as e:
            raise _unreachable(self.url, e) from None

    def follow(self, job_id: str) -> dict[str, Any]:
        """The job's final status, from its event stream (polling if the stream breaks off)."""
        return _follow(self, job_id, _Status(quiet=True), time.monotonic(), poll=False)

    def webhooks(self, job_id: str) -> list[dict[str, Any]]:
        """The job's webhook deliveries (status, attempts, last answer, next try)."""
        return list(self._call("GET", f"/v1/inference/jobs/{job_id}/webhooks").json()["deliveries"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/inference/jobs/{job_id}/cancel").json())

    def result(self, job_id: str) -> bytes:
        """The finished job's image, in the format it asked for."""
        return self._call("GET", f"/v1/inference/jobs/{job_id}/result").content

    def timeline(self, job_id: str) -> dict[str, Any]:
        """The job's cold-start timeline (GET /v1/inference/jobs/{id}/timeline)."""
        return dict(self._call("GET", f"/v1/inference/jobs/{job_id}/timeline").json())

    def webhook_secret(self, key_id: str) -> str:
        """Creates or rotates an API key's `whsec_` webhook signing secret (an admin key's call)."""
        r = self._call("POST", f"/v1/admin/keys/{key_id}/webhook-secret")
        return str(r.json()["webhook_secret"])


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


class ServerEvent(NamedTuple):
    """One Server-Sent Event: its kind (`status`, `queue`, `progress`), data and id (the
    job's revision: `Last-Event-ID` to resume after it)."""

    event: str
    data: dict[str, Any]
    id: str | None


def iter_sse(lines: Iterator[str]) -> Iterator[ServerEvent]:
    """The events of a Server-Sent Events stream; comments and retry lines skipped."""
    event, data, event_id = "message", "", None
    for line in lines:
        if not line:
            if data:
                yield ServerEvent(event, json.loads(data), event_id)
            event, data = "message", ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif line.startswith("id:"):
            event_id = line[3:].strip()


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

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
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
        if self.quiet:
            return
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
        if self.tty and not self.quiet:
            sys.stderr.write("\n")
            sys.stderr.flush()


def generate(args: argparse.Namespace) -> int:
    try:
        return _generate(args)
    except ClientError as e:
        _err(str(e))
        return e.code


def _generate(args: argparse.Namespace) -> int:
    key = getattr(args, "api_key", None) or os.environ.get("REMOTEGPU_API_KEY")
    if not key:
        raise ClientError(
            "no API key.\nhint: create one with `remotegpu keys create --name me --scope inference` "
            "(same --data-dir as the service), then export REMOTEGPU_API_KEY=<the secret> or pass --api-key"
        )
    body = build_request(args)
    out = output_path(args)
    with Client(_url(args), key) as client:
        sub = client.submit(
            body, idempotency_key=getattr(args, "idempotency_key", None), wait=getattr(args, "wait", None)
        )
        job_id = sub.job_id
        replayed = " (the Idempotency-Key's original job)" if sub.replayed else ""
        print(f"job {job_id} accepted ({args.model}){replayed}", file=sys.stderr, flush=True)
        started = time.monotonic()
        display = _Status()
        try:
            job = sub.final or _follow(client, job_id, display, started, poll=getattr(args, "poll", False))
        except KeyboardInterrupt:
            display.done()
            print(f"cancelling job {job_id} ...", file=sys.stderr, flush=True)
            try:
                print(client.cancel(job_id).get("message", ""), file=sys.stderr)
            except ClientError as e:
                _err(f"could not cancel: {e}")
            return 130
        display.done()
        timings = f"wait {job['wait_ms'] / 1000:.2f}s, run {job['run_ms'] / 1000:.2f}s"
        if job["status"] != "succeeded":
            detail = f": {job['error_message']}" if job.get("error_message") else ""
            _err(f"job {job_id} {job['status']}{detail} ({timings})")
            return 1
        image = client.result(job_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(image)
        print(f"wrote {out} ({len(image)} bytes; {timings})", file=sys.stderr, flush=True)
    return 0


def _follow(client: Client, job_id: str, display: _Status, started: float, poll: bool) -> dict[str, Any]:
    """The job once finished: from its event stream, or by polling (--poll, a gateway
    without the stream, or a stream that broke off)."""
    last_event_id = None
    for _attempt in range(0 if poll else 3):  # a stream that breaks off is resumed where it was
        try:
            for event, data, event_id in client.events(job_id, last_event_id):
                last_event_id = event_id
                elapsed = time.monotonic() - started
                if event == "status":
                    display.show(data, elapsed)
                    if data["status"] in TERMINAL:
                        return data
                elif event == "queue":
                    display.queue(data, elapsed)
                elif event == "progress":
                    display.progress(data["step"], data["total_steps"], elapsed)
        except ClientError as e:
            if e.code != 3:
                break  # an answer, not a broken connection (a gateway without the stream): poll
    while True:
        job = client.job(job_id)
        display.show(job, time.monotonic() - started)
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.25 if time.monotonic() - started < 10 else 1.0)


def list_jobs(args: argparse.Namespace) -> int:
    """`remotegpu jobs list`: the key's jobs, newest first (all pages with --all)."""
    key = getattr(args, "api_key", None) or os.environ.get("REMOTEGPU_API_KEY")
    if not key:
        _err("no API key; pass --api-key or set $REMOTEGPU_API_KEY")
        return 2
    with Client(_url(args), key, timeout=30) as client:
        try:
            jobs = client.jobs(status=args.status, model=args.model, limit=args.limit)
            rows = list(jobs) if args.all else list(itertools.islice(jobs, args.limit))
        except ClientError as e:
            _err(str(e))
            return e.code
    print(f"{'JOB':<36}  {'STATUS':<9}  {'CREATED':<20}  MODEL")
    for j in rows:
        print(f"{j['job_id']:<36}  {j['status']:<9}  {j['created_at']:<20}  {j['model']}")
    return 0


def job_timeline(url: str, api_key: str, job_id: str) -> dict[str, Any]:
    """The job's cold-start timeline (GET /v1/inference/jobs/{id}/timeline); ClientError on failure."""
    with Client(url, api_key, timeout=30) as client:
        return client.timeline(job_id)


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
