"""What a client without a valid key, or a slow or stalled one, can cost the gateway.

The figures (peak memory growth, time to cut off slow headers) are printed: run with -s.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import SCHNELL, RunningGateway, auth
from tests.gateway.test_server import start_gateway
from tests.waiting import wait_for

UPLOAD = 59 * 1024 * 1024
BAD_KEY = "rgpu_0123456789abcdef.not-a-valid-secret"
# Six 59 MB bodies buffered would add ~350 MB (more with copies); not reading them adds
# next to nothing. The bound leaves room for allocator noise, nowhere near one body.
RSS_GROWTH_BOUND_MB = 40


def _status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1))


def _request_head(port: int, key: str, length: int, path: str = "/v1/inference/image") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _read_response_head(sock: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1")


@pytest.fixture
def gateway_process(tmp_path: Path) -> Any:
    """A `remotegpu gateway` process on SQLite; yields (process, url, env)."""
    running: list[Any] = []

    def start(**env: str) -> tuple[Any, str]:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            proc, url, _data, _env = start_gateway(
                tmp_path / str(len(running)), f"sqlite:///{tmp_path}/gw{len(running)}.db", [SCHNELL]
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        running.append(proc)
        return proc, url

    yield start
    for proc in running:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_uploads_without_a_valid_key_are_not_buffered(gateway_process: Any) -> None:
    """Six concurrent 59 MB uploads with a bad key: each gets 401 with the Bearer challenge,
    and the server's peak resident memory grows by less than RSS_GROWTH_BOUND_MB."""
    proc, url = gateway_process()
    body = b"x" * UPLOAD
    warm = httpx.post(f"{url}/v1/inference/image", content=b"{}", headers=auth(BAD_KEY))
    assert warm.status_code == 401
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from now
    before = _status_kb(proc.pid, "VmRSS")
    answers: list[httpx.Response | Exception] = []

    def upload() -> None:
        try:
            answers.append(
                httpx.post(f"{url}/v1/inference/image", content=body, headers=auth(BAD_KEY), timeout=120)
            )
        except Exception as e:  # noqa: BLE001 - reported below
            answers.append(e)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    growth_mb = (_status_kb(proc.pid, "VmHWM") - before) / 1024
    print(f"\npeak RSS growth of the gateway for 6 x 59 MB unauthenticated uploads: {growth_mb:.1f} MB")
    assert len(answers) == 6
    for r in answers:
        assert isinstance(r, httpx.Response), r
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    assert growth_mb < RSS_GROWTH_BOUND_MB
    assert proc.poll() is None


@pytest.mark.parametrize("who", ["bad key", "no key", "admin key"])
def test_a_request_without_an_inference_key_is_answered_before_its_body_is_sent(
    gateway: RunningGateway, who: str
) -> None:
    """The client sends the headers of a 59 MB upload and 1 MB of it, then waits: the
    401/403 comes without the server waiting for (or reading) the rest."""
    key = {"bad key": BAD_KEY, "no key": "", "admin key": gateway.key("a", ["admin"])}[who]
    head = _request_head(gateway.port, key, UPLOAD)
    if not key:
        head = head.replace(b"Authorization: Bearer \r\n", b"")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(head + b"x" * (1024 * 1024))
        answer = _read_response_head(sock)
    expected = 403 if who == "admin key" else 401
    assert answer.startswith(f"HTTP/1.1 {expected} "), answer


def test_admin_and_worker_uploads_are_authenticated_before_they_are_read(gateway: RunningGateway) -> None:
    """The same for the admin API and the internal worker API (FastAPI reads a body before
    it runs the route's dependencies: the auth check must come first)."""
    for path in ("/v1/admin/keys", "/internal/v1/jobs/j/complete"):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
            sock.sendall(_request_head(gateway.port, BAD_KEY, UPLOAD, path) + b"x" * 65536)
            answer = _read_response_head(sock)
        assert answer.startswith("HTTP/1.1 401 "), (path, answer)


def test_headers_sent_byte_by_byte_are_cut_off(gateway_process: Any) -> None:
    """A slowloris client (a byte of headers every 0.1 s, forever) gets 408 and is
    disconnected once the header timeout (here 2 s) has passed, however much it sends."""
    timeout = 2.0
    _proc, url = gateway_process(REMOTEGPU_HEADER_TIMEOUT_SECONDS=str(timeout))
    port = int(url.rsplit(":", 1)[1])
    drip = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        try:
            for byte in drip:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - started > 60:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        cut_after = time.monotonic() - started
        try:
            sock.settimeout(5)
            got = sock.recv(1024)
        except OSError:
            pass
    print(f"\nslow headers cut off after {cut_after:.1f} s (header timeout {timeout:g} s)")
    # Generous on a loaded machine: the cut-off is a timer, never early.
    assert timeout <= cut_after < timeout + 20, cut_after
    assert got.startswith(b"HTTP/1.1 408 ") or got == b"", got


def _closed_after(port: int, send: bytes, limit: float = 30) -> float:
    """Seconds until the server closes a connection that sent `send` and then nothing.

    Counted from before the connect: the server's timer starts when it accepts, which can
    come before connect() returns here, so a clock started after it would read short.
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        sock.sendall(send)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            return float("inf")
        except ConnectionResetError:
            pass
        return time.monotonic() - started


def test_idle_and_silent_connections_are_closed(start_gateway: Callable[..., RunningGateway]) -> None:
    g = start_gateway(header_timeout_seconds=1.0, keep_alive_timeout_seconds=1)
    assert 1.0 <= _closed_after(g.port, b"") < 20  # connected, never sent a byte
    assert 1.0 <= _closed_after(g.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") < 20  # idle keep-alive


def test_a_stalled_body_gets_408(start_gateway: Callable[..., RunningGateway]) -> None:
    g = start_gateway(body_timeout_seconds=1.0)
    key = g.key()
    with socket.create_connection(("127.0.0.1", g.port), timeout=30) as sock:
        sock.sendall(_request_head(g.port, key, 1000) + b'{"prompt": ')
        answer = b""
        while chunk := sock.recv(65536):  # until the server hangs up
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower()
    assert b"did not arrive within 1 s" in answer


def _bodies(g: RunningGateway) -> dict[str, float]:
    text = g.http.get("/metrics").text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^remotegpu_http_request_bodies\{state="(\w+)"\} (\S+)$', text, re.M)
    }


def test_bodies_are_read_a_bounded_number_at_a_time(start_gateway: Callable[..., RunningGateway]) -> None:
    """With one body at a time: a stalled upload holds the slot; a second upload waits
    (its body unread) until the first one's body timeout frees the slot, then succeeds."""
    g = start_gateway(max_concurrent_bodies=1, body_timeout_seconds=3.0)
    key = g.key()
    stalled = socket.create_connection(("127.0.0.1", g.port), timeout=30)
    stalled.sendall(_request_head(g.port, key, 1000) + b'{"prompt": ')
    wait_for(lambda: _bodies(g).get("reading") == 1, timeout=30, what="the stalled body is being read")
    answers: list[int] = []

    def second() -> None:
        r = httpx.post(
            f"{g.url}/v1/inference/image", json={"prompt": "a", "model": SCHNELL}, headers=auth(key)
        )
        answers.append(r.status_code)

    t = threading.Thread(target=second)
    t.start()
    wait_for(lambda: _bodies(g).get("waiting") == 1, timeout=30, what="the second body waits for a slot")
    assert not answers  # not answered while the stalled body holds the only slot
    first = _read_response_head(stalled)
    stalled.close()
    t.join(30)
    assert first.startswith("HTTP/1.1 408 "), first
    assert answers == [202]
    wait_for(lambda: _bodies(g) == {"reading": 0, "waiting": 0}, timeout=30, what="the slots to be free")


def test_a_stalled_request_does_not_hold_up_a_shutdown(gateway_process: Any, tmp_path: Path) -> None:
    """SIGTERM while a client is stalled mid-body: the gateway gives the request
    REMOTEGPU_SHUTDOWN_TIMEOUT_SECONDS, not its 120 s body timeout (or the kubelet's SIGKILL),
    then cancels it and stops cleanly (its own shutdown runs: "gateway stopped")."""
    from remotegpu_gateway.store import Store

    proc, url = gateway_process(REMOTEGPU_SHUTDOWN_TIMEOUT_SECONDS="2")
    store = Store(f"sqlite:///{tmp_path}/gw0.db")
    key = store.create_key("k", ["inference"])[1]
    store.close()
    port = int(url.rsplit(":", 1)[1])

    def bodies_read() -> float:
        text = httpx.get(f"{url}/metrics").text
        found = re.search(r'^remotegpu_http_request_bodies\{state="reading"\} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(_request_head(port, key, 1000) + b'{"prompt": ')
        wait_for(lambda: bodies_read() == 1, 30, "the gateway to read the stalled body")
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=110)[0]
        took = time.monotonic() - stopped
    # uvicorn re-raises the SIGTERM once shut down: the exit status is the signal's.
    assert proc.returncode in (0, -signal.SIGTERM), output[-3000:]
    assert "timeout graceful shutdown exceeded" in output and "gateway stopped" in output, output[-3000:]
    assert took < 60, f"the stalled request held the shutdown up for {took:.0f} s"
