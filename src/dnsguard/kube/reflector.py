"""A small reflector: list, then watch from the list's resourceVersion, forever.

Why our own and not ``kubernetes.watch.Watch`` or an informer: we need a client read timeout on
the stream (a half-open connection must not hang us), bookmarks, relist on 410 without losing
the last good state, backoff with jitter on an injected waiter, and a store of extracted values
rather than deserialized model objects. The official client still does everything below HTTP
semantics: configuration, TLS, authentication (and token refresh), URL and query building.

One reflector handles one resource kind with one selector (`ListWatch`). Its loop::

    list (paginated, consistent)  ->  store := extracted values, rv := list rv
    watch from rv (bookmarks on, server timeoutSeconds, client read timeout)
        ADDED/MODIFIED/DELETED -> store, rv;  BOOKMARK -> rv;  ERROR 410 -> relist
        server ended the watch -> watch again from rv (no relist, no backoff)
        transport error, 5xx, 429, read timeout -> back off (Retry-After honoured), watch again
    stop event -> return; `interrupt` shuts the socket so a blocked read returns at once

Invariants: the store only changes from a complete list or an event, never because of an
error, so when the API is unreachable readers keep the last good values. ``on_change`` runs
(outside the lock) only when a stored value really changed, or on the first sync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dnsguard.kube.backoff import Backoff, Waiter, event_wait
from dnsguard.kube.errors import (
    TRANSPORT_ERRORS,
    KubeApiError,
    KubeExpired,
    from_exception,
    from_status,
)
from dnsguard.kube.extract import object_key

__all__ = ["ListWatch", "Reflector"]

log = logging.getLogger("dnsguard.kube")

V = TypeVar("V")

#: A watch the server ends sooner than this without sending anything is treated as a failure
#: (and backed off), so a misbehaving server cannot make us spin.
MIN_WATCH_SECONDS = 1.0


@dataclass(frozen=True)
class ListWatch:
    """How to list and watch one kind: client list functions plus selectors.

    ``list_fn`` is a generated client method such as ``CoreV1Api.list_namespaced_service``
    with any path arguments bound; the API watches through the same function with
    ``watch=True``, so ``watch_fn`` defaults to it.
    """

    kind: str
    list_fn: Callable[..., Any]
    watch_fn: Callable[..., Any] | None = None
    field_selector: str | None = None
    label_selector: str | None = None
    #: list page size; pages keep a large list (every Service) from arriving as one huge body
    page_size: int = 500


class Reflector(Generic[V]):
    """Keeps ``{namespace/name: extract(object)}`` for one `ListWatch` current."""

    def __init__(self, name: str, lw: ListWatch, extract: Callable[[Mapping[str, Any]], V | None],
                 *, read_timeout: float, watch_timeout: int, connect_timeout: float | None = None,
                 backoff: Backoff | None = None, wait: Waiter = event_wait,
                 on_change: Callable[[], None] | None = None,
                 now: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.name = name
        self.lw = lw
        self.extract = extract
        self.read_timeout = read_timeout
        self.watch_timeout = watch_timeout
        self.connect_timeout = connect_timeout or min(read_timeout, 10.0)
        self.backoff = backoff or Backoff()
        self.wait = wait
        self.on_change = on_change or (lambda: None)
        self.now = now
        self.monotonic = monotonic
        self.rand = rand
        self._lock = threading.Lock()
        self._store: dict[str, V] = {}
        self._rv: str | None = None
        self._synced = False
        self._resp: Any = None
        self._events = 0  # events applied by the current watch
        # status, guarded by _lock
        self._connected = False
        self._lists = 0
        self._relists = 0
        self._watches = 0
        self._errors = 0
        self._last_error = ""
        self._last_error_at: float | None = None
        self._last_list_at: float | None = None
        self._last_event_at: float | None = None

    # -- reading ------------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        """True once a list has completed; the store is meaningful from then on."""
        with self._lock:
            return self._synced

    @property
    def resource_version(self) -> str:
        with self._lock:
            return self._rv or ""

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    def items(self) -> dict[str, V]:
        with self._lock:
            return dict(self._store)

    def values(self) -> list[V]:
        """Stored values in key order (deterministic for callers that render them)."""
        with self._lock:
            return [self._store[k] for k in sorted(self._store)]

    def status(self) -> dict[str, object]:
        with self._lock:
            return {
                "kind": self.lw.kind, "connected": self._connected, "synced": self._synced,
                "items": len(self._store), "resource_version": self._rv or "",
                "lists": self._lists, "relists": self._relists, "watches": self._watches,
                "errors": self._errors, "last_error": self._last_error,
                "last_error_at": self._last_error_at, "last_list_at": self._last_list_at,
                "last_event_at": self._last_event_at,
            }

    def last_error(self) -> tuple[float, str] | None:
        with self._lock:
            if self._last_error_at is None:
                return None
            return self._last_error_at, self._last_error

    # -- talking to the API -------------------------------------------------------------------
    def _request(self, fn: Callable[..., Any], what: str, **params: Any) -> Any:
        if self.lw.field_selector is not None:
            params["field_selector"] = self.lw.field_selector
        if self.lw.label_selector is not None:
            params["label_selector"] = self.lw.label_selector
        try:
            return fn(_preload_content=False,
                      _request_timeout=(self.connect_timeout, self.read_timeout),
                      **{k: v for k, v in params.items() if v is not None})
        except TRANSPORT_ERRORS as exc:
            raise from_exception(f"{what} {self.name}", exc) from exc

    def list_once(self) -> None:
        """One complete, paginated, consistent list; replaces the store. Raises KubeApiError.

        No resourceVersion is sent: the read is consistent (served from the watch cache on
        current API servers), so a relist never moves us back in time.
        """
        fresh: dict[str, V] = {}
        token: str | None = None
        rv = ""
        while True:
            resp = self._request(self.lw.list_fn, "list", limit=self.lw.page_size,
                                 _continue=token)
            try:
                body = json.loads(resp.data)
            except TRANSPORT_ERRORS as exc:
                raise from_exception(f"list {self.name}", exc) from exc
            finally:
                resp.release_conn()
            if not isinstance(body, dict):
                raise KubeApiError(f"list {self.name}: the answer is not a list object")
            for obj in body.get("items") or ():
                value = self.extract(obj)
                if value is not None:
                    fresh[object_key(obj)] = value
            meta = body.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or "")
            token = meta.get("continue") or None
            if token is None:
                break
            del body  # one page in memory at a time
        with self._lock:
            changed = fresh != self._store or not self._synced
            if self._synced:
                self._relists += 1
            self._store, self._rv, self._synced = fresh, rv, True
            self._lists += 1
            self._connected = True
            self._last_list_at = self.now()
        log.debug("listed %s: %d items at resourceVersion %s", self.name, len(fresh), rv)
        if changed:
            self.on_change()

    def _lines(self, resp: Any) -> Iterator[bytes]:
        """Newline-delimited JSON events as the chunks arrive (never waits for a full buffer)."""
        buf = bytearray()
        for chunk in resp.stream(amt=None, decode_content=False):
            buf += chunk
            while (i := buf.find(b"\n")) >= 0:
                line = bytes(buf[:i])
                del buf[:i + 1]
                if line.strip():
                    yield line
        if buf.strip():
            yield bytes(buf)  # a cut-off last line fails to parse and counts as an error

    def _watch(self, stop: threading.Event) -> None:
        """Watch from the stored resourceVersion until the server ends it.

        Counts the events it applied in ``_events`` (also when it raises). Raises KubeExpired
        when the resourceVersion is too old, KubeApiError on failures.
        """
        # spread reconnects: [T, 2T) like client-go, so agents restarted together drift apart
        timeout = self.watch_timeout + int(self.rand() * self.watch_timeout)
        resp = self._request(self.lw.watch_fn or self.lw.list_fn, "watch", watch=True,
                             allow_watch_bookmarks=True, resource_version=self._rv,
                             timeout_seconds=timeout)
        with self._lock:
            self._resp = resp
            self._watches += 1
            self._connected = True
        try:
            for line in self._lines(resp):
                if stop.is_set():
                    return
                self._handle(json.loads(line))
                self._events += 1
        except TRANSPORT_ERRORS as exc:
            if stop.is_set():
                return  # the socket was shut down by interrupt()
            raise from_exception(f"watch {self.name}", exc) from exc
        finally:
            with self._lock:
                self._resp = None
            resp.close()  # never hand a half-read stream back to the pool
            resp.release_conn()

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise from_status(f"watch {self.name}", obj)
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        changed = False
        with self._lock:
            self._last_event_at = self.now()
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                key = object_key(obj)
                value = self.extract(obj) if kind != "DELETED" else None
                old = self._store.get(key)
                if value is None:
                    changed = self._store.pop(key, None) is not None
                else:
                    changed = old != value
                    self._store[key] = value
            elif kind != "BOOKMARK":
                log.warning("watch %s: ignoring event of unknown type %r", self.name, kind)
            if rv:
                self._rv = rv
        if changed:
            self.on_change()

    # -- the loop -----------------------------------------------------------------------------
    def _failed(self, exc: KubeApiError) -> None:
        with self._lock:
            self._connected = False
            self._errors += 1
            self._last_error = str(exc)
            self._last_error_at = self.now()

    def run(self, stop: threading.Event) -> None:
        """List and watch until ``stop`` is set; never raises for API trouble.

        Backoff counts consecutive failures and restarts from the first step after progress
        (a completed list, or an event). A 410 is answered with an immediate relist once; a
        second 410 before any event arrives backs off too, so a server that keeps expiring us
        cannot make us hammer it with lists.
        """
        failures = 0
        expired = 0
        need_list = not self.synced
        while not stop.is_set():
            listed = False
            self._events = 0
            retry_after = 0.0
            try:
                if need_list:
                    self.list_once()
                    need_list, listed = False, True
                started = self.monotonic()
                self._watch(stop)
                if (not self._events and not stop.is_set()
                        and self.monotonic() - started < MIN_WATCH_SECONDS):
                    raise KubeApiError(f"watch {self.name}: closed at once without any event")
            except KubeExpired as exc:
                need_list = True
                if self._events:
                    failures, expired = self._recovered(failures), 0
                expired += 1
                if expired == 1:
                    log.info("%s; listing again", exc)
                    continue
                failures += 1
                self._failed(exc)
                log.warning("%s (again before any event); listing again after a backoff", exc)
            except KubeApiError as exc:
                if listed or self._events:
                    failures, expired = self._recovered(failures), 0
                failures += 1
                self._failed(exc)
                retry_after = exc.retry_after or 0.0
                (log.warning if failures == 1 else log.info)("%s", exc)
            except Exception as exc:  # a bug, e.g. in an extractor: keep the thread, say so
                log.exception("%s: unexpected error; listing again after a backoff", self.name)
                need_list = True
                failures += 1
                self._failed(KubeApiError(f"{self.name}: internal error: {exc!r}"))
            else:
                # the server ended the watch (its timeoutSeconds): watch again from our rv
                if listed or self._events:
                    failures, expired = self._recovered(failures), 0
                continue
            delay = self.backoff.delay(failures, at_least=retry_after)
            log.debug("%s: retrying in %.2fs (failure %d)", self.name, delay, failures)
            if self.wait(stop, delay):
                break
        with self._lock:
            self._connected = False

    def _recovered(self, failures: int) -> int:
        if failures:
            log.info("%s: talking to the API server again after %d failure(s)", self.name,
                     failures)
        return 0

    def interrupt(self) -> None:
        """Make a read blocked in `run` return now (called after setting the stop event)."""
        with self._lock:
            resp = self._resp
        if resp is None:
            return
        try:
            resp.shutdown()
        except (AttributeError, ValueError, RuntimeError, OSError):
            conn = getattr(resp, "connection", None)
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
