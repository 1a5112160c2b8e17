"""A small HTTP/1.x GET server whose threads, memory and time per client are bounded.

It serves dnsguard's /metrics, /healthz and /readyz on the node's network, where anyone who can
reach the node can connect. ``http.server.ThreadingHTTPServer`` gives every connection a thread
that blocks in ``readline`` with no deadline: 300 idle connections held 300 threads, and a few
thousand would take the pod past its memory limit. Here:

* **One event-loop thread reads every request.** Connections are non-blocking sockets in a
  selector; a connection costs a socket and a buffer of at most `Limits.max_request_bytes`, never
  a thread.
* **Total deadline per request.** A connection must deliver its whole request head within
  `Limits.request_timeout` of being accepted, counted from accept, not from its last byte: a
  slow-loris that trickles a byte a second gets no more time than an idle one.
* **Connection cap, oldest first out.** At most `Limits.max_connections` are open. A new one
  beyond the cap closes, at once, the oldest connection still sending its request (the one that
  has had the longest to finish and has not); if every open connection is already being
  answered, the new one is closed instead. A real client (kubelet's probe, Prometheus) sends its
  request within a millisecond of connecting, so a flood of idle connections pushes out other
  idle connections, not the probe.
* **A fixed pool answers.** Complete requests go to `Limits.workers` threads that build the
  response and send it under `Limits.write_timeout` (a client that never reads cannot hold a
  worker longer). Connections waiting for a worker still count against the cap, so the queue is
  bounded too.
* **No keep-alive.** Every response says ``Connection: close``; kubelet and Prometheus both
  reconnect, and there is no idle keep-alive state to bound.

Only ``GET`` and ``HEAD`` are served; request bodies are never read.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

__all__ = ["BoundedHTTPServer", "Handler", "Limits", "Response"]

log = logging.getLogger("dnsguard.httpd")

#: (status, body, content type)
Response = tuple[int, bytes, str]
#: the request path (query string removed) -> the response
Handler = Callable[[str], Response]

@dataclass(frozen=True)
class Limits:
    """The bounds; defaults sized for kubelet probes and one or two Prometheus servers."""

    #: open connections at once, being read or answered
    max_connections: int = 64
    #: seconds from accept to the end of the request head
    request_timeout: float = 5.0
    #: seconds to send the whole response
    write_timeout: float = 10.0
    #: a request head larger than this is refused (431)
    max_request_bytes: int = 8192
    #: threads that build and send responses
    workers: int = 4


class _Conn:
    __slots__ = ("buf", "deadline", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.buf = sock, deadline, bytearray()


class BoundedHTTPServer:
    """Listen on ``address`` at once; `start` serves on a daemon thread, `shutdown` stops."""

    def __init__(self, address: tuple[str, int], handler: Handler,
                 limits: Limits | None = None) -> None:
        limits = limits or Limits()
        self.handler, self.limits = handler, limits
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address[0], address[1], type=socket.SOCK_STREAM)[0]
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(sockaddr)
            self._listener.listen(min(limits.max_connections, 128))
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        #: connections still sending their request, oldest first (dicts keep insertion order)
        self._reading: dict[socket.socket, _Conn] = {}
        self._answering = 0
        self._lock = threading.Lock()  # guards _answering, changed by workers
        self._pool = ThreadPoolExecutor(max_workers=limits.workers,
                                        thread_name_prefix="metrics-answer")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: connections closed for the cap or the deadline (tests and logs)
        self.evicted = 0
        self.timed_out = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="metrics")
        self._thread.start()

    def shutdown(self) -> None:
        """Stop accepting, close every connection, wait for the loop and the workers."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    # ---------------------------------------------------------------- the event loop

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                timeout = None
                if self._reading:
                    oldest = next(iter(self._reading.values()))
                    timeout = max(0.0, oldest.deadline - time.monotonic())
                for key, _ in self._sel.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        return
                    elif (conn := self._reading.get(key.fileobj)) is not None:  # type: ignore[call-overload]
                        self._read(conn)  # (None: evicted earlier in this same turn)
                self._expire(time.monotonic())
        except Exception:  # the loop must never die silently: probes would fail with no reason
            log.exception("metrics server loop failed")
        finally:
            for conn in list(self._reading.values()):
                self._drop(conn)

    def _accept(self) -> None:
        # bounded per turn, so a flood of connects cannot starve the reads and deadlines
        for _ in range(self.limits.max_connections):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving those already open
                log.warning("metrics server cannot accept: %s", exc)
                return
            if not self._make_room():
                sock.close()
                self.evicted += 1
                continue
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.limits.request_timeout)
            self._reading[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ)

    def _full(self) -> bool:
        with self._lock:
            return len(self._reading) + self._answering >= self.limits.max_connections

    def _make_room(self) -> bool:
        """Close the oldest unfinished connections until one more fits; False if none can go.

        Each is read once more first: a request that arrived since the last select (a probe
        accepted in this same burst of connects) is answered, not thrown away with the flood.
        """
        while self._full() and self._reading:
            oldest = next(iter(self._reading.values()))
            self._read(oldest)
            if oldest.sock in self._reading:  # still incomplete: it goes
                self._drop(oldest)
                self.evicted += 1
        return not self._full()

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(self.limits.max_request_bytes + 1 - len(conn.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.buf += data
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.buf.find(b"\n\n")
        if end >= 0:
            self._hand_over(conn, bytes(conn.buf[:end]))
        elif len(conn.buf) > self.limits.max_request_bytes:
            self._hand_over(conn, None)

    def _expire(self, now: float) -> None:
        while self._reading:
            oldest = next(iter(self._reading.values()))
            if oldest.deadline > now:
                return
            self._drop(oldest)
            self.timed_out += 1

    def _drop(self, conn: _Conn) -> None:
        self._reading.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _hand_over(self, conn: _Conn, head: bytes | None) -> None:
        """Move a complete request (None: too large) from the loop to a worker."""
        self._reading.pop(conn.sock, None)
        self._sel.unregister(conn.sock)
        with self._lock:
            self._answering += 1
        try:
            self._pool.submit(self._answer, conn.sock, head)
        except RuntimeError:  # shutting down
            self._answered(conn.sock)

    # ---------------------------------------------------------------- the workers

    def _answer(self, sock: socket.socket, head: bytes | None) -> None:
        try:
            method, response = self._respond(head)
            self._send(sock, response, with_body=method != "HEAD")
        except Exception:
            log.exception("metrics server failed to answer")
        finally:
            self._answered(sock)

    def _respond(self, head: bytes | None) -> tuple[str, Response]:
        if head is None:
            return "GET", (431, b"request head too large\n", "text/plain")
        parts = head.split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "GET", (400, b"bad request\n", "text/plain")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return "GET", (405, b"method not allowed\n", "text/plain")
        return method, self.handler(target.split("?", 1)[0])

    def _send(self, sock: socket.socket, response: Response, with_body: bool) -> None:
        code, body, ctype = response
        head = (f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode("latin-1")
        data = memoryview(head + body if with_body else head)
        deadline = time.monotonic() + self.limits.write_timeout
        while data:
            left = deadline - time.monotonic()
            if left <= 0:
                return  # the client does not read: give the worker back
            sock.settimeout(left)
            try:
                sent = sock.send(data)
            except OSError:  # timeout, reset
                return
            data = data[sent:]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    def _answered(self, sock: socket.socket) -> None:
        sock.close()
        with self._lock:
            self._answering -= 1
