"""An in-process fake Kubernetes API server speaking the real list/watch HTTP+JSON protocol.

Tests run the official client against it, so the client's URL building, query parameters,
authentication header and response handling are exercised for real; only the server is fake.

What it serves (GET only), for ``services``, ``endpointslices`` (discovery.k8s.io/v1) and
``nodes``: single objects by name, and lists and watches cluster-wide or per namespace, with
``fieldSelector`` (metadata.name / metadata.namespace, ``=``, ``==``, ``!=``), ``labelSelector``
(``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``), ``limit``/``continue`` (consistent pages),
``resourceVersion``, ``timeoutSeconds`` and ``allowWatchBookmarks``.

Semantics kept from kube-apiserver: one global, increasing resourceVersion; a watch from
resourceVersion N sends every matching change after N, and a 200 stream with an ERROR event
(410 Expired, "too old resource version") when N predates the bounded event history; a watch
without a resourceVersion (or "0") starts with synthetic ADDED events for the current state;
an object leaving a selector is sent as DELETED, one entering it as ADDED; watch responses are
chunked JSON lines; BOOKMARK events carry the latest resourceVersion; the server ends a watch at
its ``timeoutSeconds`` with a clean end of stream.

Faults, for the client's error paths: `inject` (close the connection unanswered, stall — accept
and send nothing —, HTTP 500, HTTP 429 with Retry-After, HTTP 410), `break_watches` (cut every
open stream), `freeze_watches` (open streams go silent forever: a half-open connection),
`outage`/`restore` (every connection closed at once), `compact` (drop the event history).

What it cannot stand in for: RBAC and admission, API priority and fairness (its 429s are
scripted, not load-driven), the watch cache's timing (bookmark cadence, consistent reads served
from the cache, "too large resource version" waits), TLS and real authentication (it only checks
that the kubeconfig's bearer token arrives), HTTP/2, and protobuf.
"""

from __future__ import annotations

import base64
import collections
import copy
import enum
import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "DNS_PORTS",
    "FakeApiServer",
    "Fault",
    "RequestRecord",
    "endpoint_slice_object",
    "node_object",
    "service_object",
]

Obj = dict[str, Any]

#: The ports of a kube-dns Service and its EndpointSlices, as CoreDNS ships them.
DNS_PORTS: tuple[tuple[str, str, int], ...] = (
    ("dns", "UDP", 53), ("dns-tcp", "TCP", 53), ("metrics", "TCP", 9153))


@dataclass(frozen=True)
class _Resource:
    kind: str
    api_version: str
    namespaced: bool


_RESOURCES = {
    "services": _Resource("Service", "v1", True),
    "endpointslices": _Resource("EndpointSlice", "discovery.k8s.io/v1", True),
    "nodes": _Resource("Node", "v1", False),
}
_PREFIX = {"services": "/api/v1", "nodes": "/api/v1",
           "endpointslices": "/apis/discovery.k8s.io/v1"}


class Fault(enum.Enum):
    CLOSE = "close"  #: close the connection without an answer
    STALL = "stall"  #: read the request, send nothing until the client gives up
    HTTP_500 = "500"
    HTTP_429 = "429"  #: Too Many Requests with a Retry-After header
    HTTP_410 = "410"  #: Gone, as a whole response (real servers send it for expired continues)


@dataclass
class _FaultRule:
    fault: Fault
    times: int
    watch: bool | None
    resource: str | None
    retry_after: int

    def matches(self, resource: str | None, watch: bool) -> bool:
        return ((self.watch is None or self.watch == watch)
                and (self.resource is None or self.resource == resource))


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it, for assertions about what the client sent."""

    method: str
    path: str
    query: Mapping[str, str]
    resource: str | None
    watch: bool
    fault: Fault | None
    authorization: str | None


@dataclass(frozen=True)
class _Event:
    rv: int
    resource: str
    type: str
    obj: Obj
    old: Obj | None


class _BadRequest(Exception):
    pass


# -- objects ----------------------------------------------------------------------------------
def service_object(namespace: str, name: str, cluster_ips: Sequence[str], *,
                   ports: Sequence[tuple[str, str, int]] = DNS_PORTS,
                   labels: Mapping[str, str] | None = None) -> Obj:
    """A ClusterIP Service; ``["None"]`` makes it headless."""
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips if ip != "None"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "labels": dict(labels or {})},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ips[0] if cluster_ips else "",
            "clusterIPs": list(cluster_ips),
            "ipFamilies": families,
            "ports": [{"name": n, "protocol": p, "port": port, "targetPort": port}
                      for n, p, port in ports],
            "selector": {"k8s-app": "kube-dns"},
        },
    }


def endpoint_slice_object(namespace: str, name: str, *, service: str,
                          endpoints: Sequence[str | tuple[str, bool | None]],
                          address_type: str | None = None,
                          ports: Sequence[tuple[str, str, int]] = DNS_PORTS) -> Obj:
    """An EndpointSlice of ``service``; an endpoint is an address or (address, ready)."""
    eps: list[Obj] = []
    for ep in endpoints:
        addr, ready = (ep, True) if isinstance(ep, str) else ep
        conditions = {} if ready is None else {"ready": ready, "serving": ready,
                                               "terminating": False}
        eps.append({"addresses": [addr], "conditions": conditions})
    first = next((e if isinstance(e, str) else e[0] for e in endpoints), "")
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": namespace, "name": name,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by":
                                    "endpointslice-controller.k8s.io"}},
        "addressType": address_type or ("IPv6" if ":" in first else "IPv4"),
        "endpoints": eps,
        "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
    }


def node_object(name: str, pod_cidrs: Sequence[str] = ()) -> Obj:
    spec: Obj = {}
    if pod_cidrs:
        spec = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": spec}


# -- selectors --------------------------------------------------------------------------------
Predicate = Callable[[Obj], bool]


def _terms(selector: str | None) -> list[str]:
    return [t.strip() for t in (selector or "").split(",") if t.strip()]


def _split_term(term: str) -> tuple[str, str, str]:
    for op in ("!=", "==", "="):
        key, sep, value = term.partition(op)
        if sep:
            return key.strip(), op, value.strip()
    return term, "", ""


def _field_selector(selector: str | None) -> Predicate:
    checks: list[Predicate] = []
    for term in _terms(selector):
        key, op, value = _split_term(term)
        if key not in ("metadata.name", "metadata.namespace") or not op:
            raise _BadRequest(f'field label not supported: "{term}"')
        attr = key.split(".")[1]

        def check(obj: Obj, attr: str = attr, op: str = op, value: str = value) -> bool:
            actual = str(obj["metadata"].get(attr, ""))
            return (actual == value) != (op == "!=")
        checks.append(check)
    return lambda obj: all(c(obj) for c in checks)


def _label_selector(selector: str | None) -> Predicate:
    checks: list[Predicate] = []
    for term in _terms(selector):
        if " in " in term or " notin " in term or "(" in term:
            raise _BadRequest(f"set-based label selector not supported by the fake: {term}")
        key, op, value = _split_term(term)

        def check(obj: Obj, key: str = key, op: str = op, value: str = value) -> bool:
            labels = obj["metadata"].get("labels") or {}
            if not op:
                return (key[1:] not in labels) if key.startswith("!") else key in labels
            return (labels.get(key) == value) != (op == "!=")
        checks.append(check)
    return lambda obj: all(c(obj) for c in checks)


def _status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _route(path: str) -> tuple[str, str | None, str | None] | None:
    """``(resource, namespace, name)`` for a path we serve, None otherwise."""
    for resource, prefix in _PREFIX.items():
        if not path.startswith(prefix + "/"):
            continue
        parts = path[len(prefix) + 1:].split("/")
        ns = None
        if parts[0] == "namespaces" and len(parts) >= 3:
            ns, parts = parts[1], parts[2:]
        if parts[0] != resource or len(parts) > 2 or (ns and not _RESOURCES[resource].namespaced):
            continue
        return resource, ns, parts[1] if len(parts) == 2 else None
    return None


# -- the server -------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeApiServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up mid-request is part of the tests, not an error


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests stay quiet; RequestRecord is the log

    def setup(self) -> None:
        super().setup()
        # headers and body go out as separate writes; without this, Nagle plus the client's
        # delayed ACK adds 40 ms to every answer
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        if self.server.fake.is_down:
            return  # the socket is closed unanswered
        super().handle()

    def do_GET(self) -> None:
        self.server.fake._serve(self)


@dataclass
class _Watch:
    resource: str
    match: Predicate
    cursor: int
    bookmarks: bool
    deadline: float
    frozen_at: int
    broken_at: int
    next_bookmark: float = 0.0
    sent: list[bytes] = field(default_factory=list)


class FakeApiServer:
    """See the module docstring. Use as a context manager; `url` once started."""

    def __init__(self, *, history: int = 1000, bookmark_interval: float = 1.0,
                 token: str = "fake-token") -> None:
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.requests: list[RequestRecord] = []
        self._cond = threading.Condition()
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {r: {} for r in _RESOURCES}
        self._history: collections.deque[_Event] = collections.deque(maxlen=history)
        self._rv = 0
        self._floor = 0  # the oldest resourceVersion a watch may still start from
        self._faults: list[_FaultRule] = []
        self._freeze_gen = 0
        self._break_gen = 0
        self._down = False
        self._stopped = threading.Event()
        self._watchers = 0
        self._pages: collections.OrderedDict[str, tuple[int, list[Obj]]] = (
            collections.OrderedDict())
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FakeApiServer:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-apiserver")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing at this server with its bearer token (JSON is valid YAML)."""
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    # -- state --------------------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def _record(self, resource: str, type_: str, obj: Obj, old: Obj | None) -> None:
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0].rv
        self._history.append(_Event(self._rv, resource, type_, obj, old))
        self._cond.notify_all()

    def apply(self, resource: str, obj: Mapping[str, Any]) -> Obj:
        """Create or replace an object; returns it as stored (with its new resourceVersion)."""
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        ns = meta.get("namespace", "") if _RESOURCES[resource].namespaced else ""
        key = (ns, meta["name"])
        with self._cond:
            old = self._objects[resource].get(key)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()))
            self._objects[resource][key] = new
            self._record(resource, "MODIFIED" if old else "ADDED", new, old)
        return copy.deepcopy(new)

    def delete(self, resource: str, namespace: str | None, name: str) -> None:
        with self._cond:
            old = self._objects[resource].pop((namespace or "", name))
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record(resource, "DELETED", gone, old)

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        with self._cond:
            obj = self._objects[resource].get((namespace or "", name))
            return copy.deepcopy(obj) if obj else None

    def put_service(self, namespace: str, name: str, cluster_ips: Sequence[str],
                    **kw: Any) -> Obj:
        return self.apply("services", service_object(namespace, name, cluster_ips, **kw))

    def put_endpoint_slice(self, namespace: str, name: str, **kw: Any) -> Obj:
        return self.apply("endpointslices", endpoint_slice_object(namespace, name, **kw))

    def put_node(self, name: str, pod_cidrs: Sequence[str] = ()) -> Obj:
        return self.apply("nodes", node_object(name, pod_cidrs))

    def compact(self) -> None:
        """Forget the event history: any watch from an older resourceVersion gets 410."""
        with self._cond:
            self._history.clear()
            self._floor = self._rv

    # -- faults -------------------------------------------------------------------------------
    def inject(self, fault: Fault, *, times: int = 1, watch: bool | None = None,
               resource: str | None = None, retry_after: int = 1) -> None:
        """The next ``times`` matching requests get ``fault`` (None matches any)."""
        with self._cond:
            self._faults.append(_FaultRule(fault, times, watch, resource, retry_after))

    def break_watches(self) -> None:
        """Cut every open watch stream mid-body (a dropped connection)."""
        with self._cond:
            self._break_gen += 1
            self._cond.notify_all()

    def freeze_watches(self) -> None:
        """Every open watch stream goes silent and stays open: a half-open connection."""
        with self._cond:
            self._freeze_gen += 1
            self._cond.notify_all()

    @property
    def is_down(self) -> bool:
        return self._down

    def outage(self) -> None:
        """Until `restore`: open watches are cut and every new connection is closed at once."""
        self._down = True
        self.break_watches()

    def restore(self) -> None:
        self._down = False

    @contextmanager
    def down(self) -> Iterator[None]:
        self.outage()
        try:
            yield
        finally:
            self.restore()

    @property
    def watchers(self) -> int:
        """Watch streams currently open and not frozen."""
        with self._cond:
            return self._watchers

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` (e.g. ``lambda: s.watchers >= 3``) until true or ``timeout``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    def watch_requests(self, resource: str | None = None) -> list[RequestRecord]:
        return [r for r in self.requests if r.watch and resource in (None, r.resource)]

    def list_requests(self, resource: str | None = None) -> list[RequestRecord]:
        return [r for r in self.requests
                if not r.watch and r.fault is None and resource in (None, r.resource)]

    # -- serving ------------------------------------------------------------------------------
    def _take_fault(self, resource: str | None, watch: bool) -> _FaultRule | None:
        with self._cond:
            for rule in self._faults:
                if rule.times > 0 and rule.matches(resource, watch):
                    rule.times -= 1
                    return rule
        return None

    @staticmethod
    def _send_json(h: _Handler, code: int, doc: Obj,
                   headers: Iterable[tuple[str, str]] = ()) -> None:
        body = json.dumps(doc).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)

    def _serve(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        route = _route(url.path)
        resource = route[0] if route else None
        watch = query.get("watch") in ("true", "1")
        fault = None if self._down else self._take_fault(resource, watch)
        self.requests.append(RequestRecord("GET", url.path, query, resource, watch,
                                           fault.fault if fault else None,
                                           h.headers.get("Authorization")))
        if self._down:
            self._abort(h)
            return
        if fault is not None:
            self._fault(h, fault)
            return
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            self._send_json(h, 401, _status(401, "Unauthorized", "Unauthorized"))
            return
        if route is None:
            self._send_json(h, 404, _status(404, "NotFound", f"the server could not find "
                                            f"the requested resource ({url.path})"))
            return
        resource, ns, name = route
        try:
            match = self._predicate(ns, query)
            if name is not None:
                self._get_one(h, resource, ns, name)
            elif watch:
                self._watch(h, resource, match, query)
            else:
                self._list(h, resource, match, query)
        except _BadRequest as exc:
            self._send_json(h, 400, _status(400, "BadRequest", str(exc)))
        except OSError:
            h.close_connection = True  # the client went away: nothing to tell it

    @staticmethod
    def _abort(h: _Handler) -> None:
        h.close_connection = True
        with suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)

    def _fault(self, h: _Handler, rule: _FaultRule) -> None:
        if rule.fault is Fault.CLOSE:
            self._abort(h)
        elif rule.fault is Fault.STALL:
            self._hold(h)
        elif rule.fault is Fault.HTTP_500:
            self._send_json(h, 500, _status(500, "InternalError", "injected: internal error"))
        elif rule.fault is Fault.HTTP_429:
            self._send_json(h, 429, _status(429, "TooManyRequests",
                                            "injected: too many requests, please try again"),
                            [("Retry-After", str(rule.retry_after))])
        else:
            self._send_json(h, 410, _status(410, "Expired", "injected: the resourceVersion "
                                            "or continue token has expired"))

    def _hold(self, h: _Handler, broken_at: int | None = None) -> None:
        """Send nothing until the client hangs up, the server stops or watches are broken."""
        h.close_connection = True
        sock = h.connection
        while not self._stopped.is_set() and broken_at in (None, self._break_gen):
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready:
                try:
                    if not sock.recv(1, socket.MSG_PEEK):
                        return  # the client closed: its read timeout fired
                except OSError:
                    return
                time.sleep(0.05)  # pipelined bytes: keep ignoring them
        self._abort(h)

    @staticmethod
    def _predicate(ns: str | None, query: Mapping[str, str]) -> Predicate:
        by_field = _field_selector(query.get("fieldSelector"))
        by_label = _label_selector(query.get("labelSelector"))
        return lambda obj: ((ns is None or obj["metadata"].get("namespace") == ns)
                            and by_field(obj) and by_label(obj))

    def _get_one(self, h: _Handler, resource: str, ns: str | None, name: str) -> None:
        obj = self.get(resource, ns, name)
        if obj is None:
            doc = _status(404, "NotFound", f'{resource} "{name}" not found')
            doc["details"] = {"name": name, "kind": resource}
            self._send_json(h, 404, doc)
            return
        self._send_json(h, 200, obj)

    def _list(self, h: _Handler, resource: str, match: Predicate,
              query: Mapping[str, str]) -> None:
        r = _RESOURCES[resource]
        limit = int(query["limit"]) if query.get("limit", "").isdigit() else 0
        token = query.get("continue")
        with self._cond:
            if token:
                try:
                    page_id, offset = json.loads(base64.b64decode(token))
                    rv, items = self._pages[page_id]
                except (ValueError, KeyError, TypeError):
                    self._send_json(h, 410, _status(410, "Expired", "The provided continue "
                                                    "parameter is too old"))
                    return
            else:
                offset, rv = 0, self._rv
                items = [o for _, o in sorted(self._objects[resource].items()) if match(o)]
                page_id = uuid.uuid4().hex
                if limit and len(items) > limit:
                    self._pages[page_id] = (rv, items)
                    while len(self._pages) > 32:
                        self._pages.popitem(last=False)
        page = items[offset:offset + limit] if limit else items[offset:]
        meta: Obj = {"resourceVersion": str(rv)}
        if limit and offset + limit < len(items):
            meta["continue"] = base64.b64encode(
                json.dumps([page_id, offset + limit]).encode()).decode()
        self._send_json(h, 200, {"kind": f"{r.kind}List", "apiVersion": r.api_version,
                                 "metadata": meta, "items": page})

    # -- watch --------------------------------------------------------------------------------
    def _watch(self, h: _Handler, resource: str, match: Predicate,
               query: Mapping[str, str]) -> None:
        raw_rv = query.get("resourceVersion") or "0"
        if not raw_rv.isdigit():
            raise _BadRequest(f"invalid resourceVersion {raw_rv!r}")
        timeout = int(query.get("timeoutSeconds") or "1800")
        now = time.monotonic()
        initial: list[tuple[str, Obj]] = []
        with self._cond:
            w = _Watch(resource, match, int(raw_rv),
                       bookmarks=query.get("allowWatchBookmarks") in ("true", "1"),
                       deadline=now + timeout, frozen_at=self._freeze_gen,
                       broken_at=self._break_gen, next_bookmark=now + self.bookmark_interval)
            if raw_rv == "0":
                initial = [("ADDED", o) for _, o in sorted(self._objects[resource].items())
                           if match(o)]
                w.cursor = self._rv
            expired = w.cursor < self._floor
            floor = self._floor
            self._watchers += 1
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            if expired:
                self._chunk(h, {"type": "ERROR", "object": _status(
                    410, "Expired", f"too old resource version: {raw_rv} ({floor})")})
                self._end(h)
                return
            for type_, obj in initial:
                self._chunk(h, {"type": type_, "object": obj})
            self._stream(h, w)
        finally:
            with self._cond:
                self._watchers -= 1

    def _stream(self, h: _Handler, w: _Watch) -> None:
        r = _RESOURCES[w.resource]
        while True:
            with self._cond:
                while True:
                    if self._stopped.is_set() or self._break_gen != w.broken_at:
                        self._abort(h)
                        return
                    if self._freeze_gen != w.frozen_at:
                        break
                    if w.cursor < self._floor:  # fell behind the history: like a real server
                        self._chunk(h, {"type": "ERROR", "object": _status(
                            410, "Expired", f"too old resource version: {w.cursor} "
                                            f"({self._floor})")})
                        self._end(h)
                        return
                    pending = [e for e in self._history if e.rv > w.cursor]
                    now = time.monotonic()
                    if pending or now >= w.deadline or (w.bookmarks and now >= w.next_bookmark):
                        break
                    wake = min(w.deadline, w.next_bookmark if w.bookmarks else w.deadline)
                    self._cond.wait(max(0.0, min(wake - now, 0.5)))
                frozen = self._freeze_gen != w.frozen_at
                cursor = self._rv
            if frozen:
                with self._cond:
                    self._watchers -= 1
                try:
                    self._hold(h, w.broken_at)
                finally:
                    with self._cond:
                        self._watchers += 1
                return
            for e in pending:
                if e.resource == w.resource and (visible := self._visible(e, w.match)):
                    self._chunk(h, {"type": visible[0], "object": visible[1]})
            w.cursor = max(cursor, pending[-1].rv if pending else 0)
            now = time.monotonic()
            if w.bookmarks and (now >= w.next_bookmark or now >= w.deadline):
                self._chunk(h, {"type": "BOOKMARK", "object": {
                    "kind": r.kind, "apiVersion": r.api_version,
                    "metadata": {"resourceVersion": str(w.cursor)}}})
                w.next_bookmark = now + self.bookmark_interval
            if now >= w.deadline:
                self._end(h)
                return

    @staticmethod
    def _visible(e: _Event, match: Predicate) -> tuple[str, Obj] | None:
        """What a selector-filtered watcher sees of an event (ADDED/DELETED at the edges)."""
        now_in = e.type != "DELETED" and match(e.obj)
        was_in = e.old is not None and match(e.old)
        if e.type == "DELETED":
            return ("DELETED", e.obj) if was_in else None
        if now_in:
            return ("MODIFIED" if was_in else "ADDED"), e.obj
        if was_in:
            assert e.old is not None
            gone = copy.deepcopy(e.old)
            gone["metadata"]["resourceVersion"] = str(e.rv)
            return "DELETED", gone
        return None

    @staticmethod
    def _chunk(h: _Handler, event: Obj) -> None:
        data = json.dumps(event).encode() + b"\n"
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.flush()

    @staticmethod
    def _end(h: _Handler) -> None:
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()
