"""The fake API server speaks the list/watch protocol the way kube-apiserver does.

These tests talk raw HTTP to it, so the other kube tests (which run the official client against
it) rest on checked ground. They cannot prove that kube-apiserver behaves the same in every
detail the fake leaves out: RBAC, API priority and fairness, watch-cache timing, TLS and real
authentication (see the fake's module docstring).
"""

from __future__ import annotations

import json
import time

import pytest
import urllib3

from dnsguard.testing.fake_apiserver import FakeApiServer, Fault

SVC = "/api/v1/namespaces/kube-system/services"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices"


@pytest.fixture
def server():
    with FakeApiServer(bookmark_interval=0.2) as s:
        s.put_service("kube-system", "kube-dns", ["10.96.0.10"])
        s.put_service("kube-system", "metrics", ["10.96.0.20"])
        s.put_service("default", "kubernetes", ["10.96.0.1"])
        yield s


@pytest.fixture
def http():
    pool = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=1))
    yield pool
    pool.clear()


def get(http, server, path, *, token=True, **query):
    headers = {"Authorization": f"Bearer {server.token}"} if token else {}
    return http.request("GET", server.url + path, fields=query, headers=headers,
                        preload_content=False)


def events(resp, n):
    """The first ``n`` watch events (or fewer if the stream ends)."""
    out, buf = [], b""
    for chunk in resp.stream(amt=None):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
            if len(out) == n:
                return out
    return out


def test_list_with_field_selector_and_resource_version(http, server):
    r = get(http, server, SVC, fieldSelector="metadata.name=kube-dns")
    body = json.loads(r.data)
    assert r.status == 200 and body["kind"] == "ServiceList"
    assert [i["metadata"]["name"] for i in body["items"]] == ["kube-dns"]
    assert body["metadata"]["resourceVersion"] == "3"
    everywhere = json.loads(get(http, server, "/api/v1/services").data)
    assert len(everywhere["items"]) == 3


def test_auth_unknown_paths_and_unsupported_selectors(http, server):
    assert get(http, server, SVC, token=False).status == 401
    assert get(http, server, "/api/v1/pods").status == 404
    assert get(http, server, "/api/v1/namespaces/x/nodes").status == 404
    assert get(http, server, SVC, fieldSelector="spec.clusterIP=1.2.3.4").status == 400
    one = get(http, server, SVC + "/kube-dns")
    assert json.loads(one.data)["spec"]["clusterIP"] == "10.96.0.10"
    assert get(http, server, SVC + "/nope").status == 404


def test_pages_are_a_consistent_snapshot(http, server):
    first = json.loads(get(http, server, "/api/v1/services", limit="2").data)
    assert len(first["items"]) == 2 and first["metadata"]["continue"]
    server.put_service("zzz", "late", ["10.96.9.9"])  # after the first page: not in this list
    rest = json.loads(get(http, server, "/api/v1/services", limit="2",
                          **{"continue": first["metadata"]["continue"]}).data)
    assert [i["metadata"]["name"] for i in rest["items"]] == ["metrics"]
    assert "continue" not in rest["metadata"]
    assert rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert get(http, server, "/api/v1/services", limit="2", **{"continue": "bogus"}).status == 410


def test_watch_streams_changes_after_the_resource_version(http, server):
    r = get(http, server, SVC, watch="true", resourceVersion="3",
            labelSelector="app=dns")
    assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
    server.put_service("kube-system", "kube-dns", ["10.96.0.10"], labels={"app": "dns"})
    server.put_service("kube-system", "kube-dns", ["10.96.0.11"], labels={"app": "dns"})
    server.put_service("kube-system", "kube-dns", ["10.96.0.11"], labels={"app": "other"})
    got = events(r, 3)
    # entering the selector is ADDED, leaving it is DELETED, as with kube-apiserver
    assert [(e["type"], e["object"]["metadata"]["resourceVersion"]) for e in got] == [
        ("ADDED", "4"), ("MODIFIED", "5"), ("DELETED", "6")]
    r.release_conn()


def test_watch_without_resource_version_starts_with_the_state(http, server):
    r = get(http, server, SVC, watch="1", fieldSelector="metadata.name=metrics",
            timeoutSeconds="1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events(r, 5)] == [
        ("ADDED", "metrics")]  # and the stream ended cleanly at timeoutSeconds


def test_bookmarks_carry_the_latest_resource_version(http, server):
    r = get(http, server, SLICES, watch="true", resourceVersion="3",
            allowWatchBookmarks="true")
    server.put_service("default", "other", ["10.96.0.30"])  # not a slice: only moves the rv
    bookmark = events(r, 1)[0]
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["resourceVersion"] == "4"
    assert bookmark["object"]["kind"] == "EndpointSlice"
    r.release_conn()


def test_too_old_resource_version_is_410_in_the_stream(http):
    with FakeApiServer(history=2) as server:
        for i in range(5):
            server.put_service("kube-system", "kube-dns", [f"10.96.0.{10 + i}"])
        r = get(http, server, SVC, watch="true", resourceVersion="1")
        assert r.status == 200
        (err,) = events(r, 2)
        assert err["type"] == "ERROR" and err["object"]["code"] == 410
        assert "too old resource version" in err["object"]["message"]
        ok = get(http, server, SVC, watch="true", resourceVersion="3", timeoutSeconds="1")
        assert [e["type"] for e in events(ok, 5)] == ["MODIFIED", "MODIFIED"]


def test_injected_http_faults(http, server):
    server.inject(Fault.HTTP_429, retry_after=7, watch=False)
    server.inject(Fault.HTTP_500, resource="services")
    r = get(http, server, SVC)
    assert (r.status, r.headers["Retry-After"]) == (429, "7")
    assert json.loads(r.data)["reason"] == "TooManyRequests"
    assert get(http, server, SVC).status == 500
    assert get(http, server, SVC).status == 200
    assert [q.fault for q in server.requests] == [Fault.HTTP_429, Fault.HTTP_500, None]


def test_injected_close_and_stall(http, server):
    server.inject(Fault.CLOSE)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        get(http, server, SVC)
    server.inject(Fault.STALL)
    start = time.monotonic()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        http.request("GET", server.url + SVC, timeout=urllib3.Timeout(connect=1, read=0.3),
                     headers={"Authorization": "Bearer fake-token"})
    assert time.monotonic() - start < 2


def test_break_and_freeze_open_watches(http, server):
    cut = get(http, server, SVC, watch="true", resourceVersion="3")
    assert server.wait_for(lambda: server.watchers == 1)
    server.break_watches()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        events(cut, 1)
    frozen = get(http, server, SVC, watch="true", resourceVersion="3")
    assert server.wait_for(lambda: server.watchers == 1)
    server.freeze_watches()
    server.put_service("kube-system", "kube-dns", ["10.96.0.99"])
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        events(frozen, 1)  # the change never arrives on a half-open stream
    assert server.watchers == 0


def test_outage_closes_every_connection_until_restored(http, server):
    with server.down(), pytest.raises(urllib3.exceptions.ProtocolError):
        get(http, server, SVC)
    assert get(http, server, SVC).status == 200
