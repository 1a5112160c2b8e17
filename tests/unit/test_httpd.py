"""The bounded metrics/health server, in-process on loopback with small limits.

What this proves: routing and status codes; that idle and trickling connections are closed at
their deadline however often they send a byte; that connections beyond the cap push out the
oldest unfinished one while a real request still gets its answer; that a client which never
reads cannot keep a worker; that the thread count does not grow with connections. The real
agent under a flood, in a lab node, is tests/integration/test_metrics.py.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from dnsguard.httpd import BoundedHTTPServer, Limits, Response
from dnsguard.metrics import Metrics, Probe, serve


def wait_for(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def routes(path: str) -> Response:
    if path == "/big":
        return 200, b"x" * (16 << 20), "text/plain"
    if path == "/boom":
        raise RuntimeError("handler failed")
    return (200, b"ok\n", "text/plain") if path == "/ok" else (404, b"not found\n", "text/plain")


@contextlib.contextmanager
def running(request_timeout: float) -> Iterator[BoundedHTTPServer]:
    s = BoundedHTTPServer(("127.0.0.1", 0), routes,
                          Limits(max_connections=8, request_timeout=request_timeout,
                                 write_timeout=0.5, max_request_bytes=1024, workers=2))
    s.start()
    try:
        yield s
    finally:
        s.shutdown()


@pytest.fixture
def server() -> Iterator[BoundedHTTPServer]:
    with running(request_timeout=0.5) as s:
        yield s


def connect(s: BoundedHTTPServer) -> socket.socket:
    return socket.create_connection(s.server_address, timeout=10)


def request(s: BoundedHTTPServer, raw: bytes) -> bytes:
    with connect(s) as c:
        c.sendall(raw)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
        return out


def closed_by_server(c: socket.socket) -> bool:
    """True once the server has closed ``c`` (EOF or reset); never blocks long."""
    c.settimeout(0.05)
    try:
        return c.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_routes_methods_and_sizes(server: BoundedHTTPServer) -> None:
    ok = request(server, b"GET /ok?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nok\n")
    assert b"Connection: close" in ok and b"Content-Length: 3" in ok
    assert request(server, b"GET /nope HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    head = request(server, b"HEAD /ok HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert request(server, b"POST /ok HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert request(server, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    big = b"GET /ok HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n"
    assert request(server, big).startswith(b"HTTP/1.1 431 ")
    # a failing handler loses its connection, not the server
    assert request(server, b"GET /boom HTTP/1.1\r\n\r\n") == b""
    assert request(server, b"GET /ok HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def test_idle_and_trickling_connections_are_closed_at_their_deadline(
        server: BoundedHTTPServer) -> None:
    with connect(server) as idle, connect(server) as loris:
        loris.sendall(b"GET /ok HTTP/1.1\r\n")
        sent = 0
        # the slow-loris keeps sending a header byte every 50 ms; the deadline counts from accept
        while not closed_by_server(loris):
            try:
                loris.sendall(b"X")
            except OSError:
                break
            sent += 1
            assert sent < 1000, "the trickling connection was never closed"
        wait_for(lambda: closed_by_server(idle))
        assert server.timed_out == 2


@pytest.fixture
def patient_server() -> Iterator[BoundedHTTPServer]:
    """A request deadline no test reaches: only the cap closes connections."""
    with running(request_timeout=60.0) as s:
        yield s


def test_the_cap_pushes_out_the_oldest_unfinished_connection(
        patient_server: BoundedHTTPServer) -> None:
    server = patient_server
    threads = threading.active_count()
    idle = [connect(server) for _ in range(40)]
    try:
        # a real client arriving after the flood still gets its answer
        assert request(server, b"GET /ok HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")
        wait_for(lambda: server.evicted >= 40 + 1 - 8)
        assert server.timed_out == 0
        still_open = [c for c in idle if not closed_by_server(c)]
        assert len(still_open) <= 8
        assert set(still_open) <= set(idle[-8:])  # the newest survive, the oldest were closed
        assert threading.active_count() <= threads + 2  # the two workers, never one per client
    finally:
        for c in idle:
            c.close()


def test_a_client_that_never_reads_gives_its_worker_back(server: BoundedHTTPServer) -> None:
    stuck = []
    try:
        for _ in range(2):  # as many as there are workers
            c = connect(server)
            stuck.append(c)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.sendall(b"GET /big HTTP/1.1\r\n\r\n")
        wait_for(lambda: server._answering == 0)  # write deadline: both workers free again
        assert request(server, b"GET /ok HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    finally:
        for c in stuck:
            c.close()


def test_metrics_serve_answers_health_and_readiness() -> None:
    ep = serve(("127.0.0.1", 0), Metrics(CollectorRegistry()), lambda: Probe(True, "alive"),
               lambda: Probe(False, "rules not in sync"))
    srv = ep.server
    assert srv is not None
    try:
        assert request(srv, b"GET /healthz HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\nalive\n")
        ready = request(srv, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert ready.startswith(b"HTTP/1.1 503 ") and ready.endswith(b"rules not in sync\n")
        body = request(srv, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert b'dnsguard_sync_errors_total{reason="lock_held"} 0.0' in body
    finally:
        ep.shutdown()


def test_an_address_in_use_is_logged_and_taken_once_free(
        caplog: pytest.LogCaptureFixture) -> None:
    """A rollout: the previous agent still holds the port; the new one serves once it goes."""
    old = BoundedHTTPServer(("127.0.0.1", 0), routes)
    old.start()
    ok = Probe(True, "new agent")
    ep = serve(old.server_address, Metrics(CollectorRegistry()), lambda: ok, lambda: ok,
               retry_every=0.05)
    try:
        assert ep.server is None
        assert "--metrics-address 127.0.0.1:" in caplog.text
        assert request(old, b"GET /ok HTTP/1.1\r\n\r\n").endswith(b"ok\n")
        old.shutdown()
        wait_for(lambda: ep.server is not None)
        assert ep.server is not None
        assert request(ep.server, b"GET /healthz HTTP/1.1\r\n\r\n").endswith(b"new agent\n")
    finally:
        ep.shutdown()


def test_a_port_in_use_is_an_error_at_construction() -> None:
    s = BoundedHTTPServer(("127.0.0.1", 0), routes)
    try:
        with pytest.raises(OSError):
            BoundedHTTPServer(s.server_address, routes)
    finally:
        s.shutdown()
