"""KubeSource and its reflectors against the fake API server, through the official client.

What these tests prove: the real client, configured from a kubeconfig, lists and watches the
right paths with the right selectors, bookmarks, timeouts and resourceVersions; facts follow
Service and EndpointSlice changes within a second; a 410 leads to a relist that misses nothing;
an outage keeps the last facts and status says so; a half-open watch is abandoned at the read
timeout; 429/500 are retried after a backoff that honours Retry-After.

What they cannot prove (the fake is not kube-apiserver): RBAC (the ClusterRole in deploy/ is
checked only by reading it), API priority and fairness (429s here are scripted), the watch
cache's timing (bookmark cadence, when a real server answers 410), TLS, token rotation and
real authentication, HTTP/2 and protobuf.
"""

from __future__ import annotations

import ipaddress
import threading
import time

import pytest

from dnsguard.kube import (
    Backoff,
    ClusterFacts,
    KubeApiError,
    KubeConfigError,
    KubeSource,
    load_once,
)
from dnsguard.kube import client as kclient
from dnsguard.kube.extract import service_cluster_ips
from dnsguard.kube.reflector import Reflector
from dnsguard.testing.fake_apiserver import FakeApiServer, Fault
from tests.support.kube import wait_facts

ip = ipaddress.ip_address
DNS = [("kube-system", "kube-dns")]
FAST = Backoff(initial=0.02, maximum=0.1)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    with FakeApiServer(bookmark_interval=0.5) as s:
        s.put_service("kube-system", "kube-dns", ["10.96.0.10", "fd00::a"])
        s.put_endpoint_slice("kube-system", "kube-dns-v4", service="kube-dns",
                             endpoints=["10.244.1.5", ("10.244.2.6", False), "10.244.0.4"])
        s.put_endpoint_slice("kube-system", "other-x", service="other", endpoints=["10.9.9.9"])
        s.put_node("node-a", ["10.244.1.0/24", "fd00:1::/64"])
        s.put_node("node-b", ["10.244.2.0/24"])
        yield s


@pytest.fixture
def kubeconfig(server, tmp_path):
    return str(server.write_kubeconfig(tmp_path / "kubeconfig"))


@pytest.fixture
def source(kubeconfig):
    sources = []

    def make(**kw):
        args = {"kubeconfig": kubeconfig, "dns_services": DNS, "node_name": "node-a",
                "read_timeout": 5.0, "watch_timeout": 30, "backoff": FAST} | kw
        s = KubeSource(**args)
        sources.append(s)
        return s
    yield make
    for s in sources:
        s.stop()


def started(src, server, watchers=3):
    src.start()
    assert server.wait_for(lambda: src.snapshot() is not None and server.watchers >= watchers)
    return src.snapshot()


INITIAL = ClusterFacts(
    dns_ips=(ip("10.96.0.10"), ip("fd00::a")),
    dns_endpoints=((ip("10.244.0.4"), 53), (ip("10.244.1.5"), 53)),
    pod_cidrs=(ipaddress.ip_network("10.244.1.0/24"), ipaddress.ip_network("fd00:1::/64")),
    resource_versions="",
)


def same(a, b):
    return (a.dns_ips, a.dns_endpoints, a.pod_cidrs) == (b.dns_ips, b.dns_endpoints, b.pod_cidrs)


# -- startup ----------------------------------------------------------------------------------
def test_load_once_lists_with_selectors_and_does_not_watch(server, kubeconfig):
    facts = load_once(kubeconfig=kubeconfig, dns_services=DNS, node_name="node-a")
    assert same(facts, INITIAL)
    assert "service kube-system/kube-dns@5" in facts.resource_versions
    assert server.watch_requests() == []
    queries = {(r.path, r.query.get("fieldSelector"), r.query.get("labelSelector"))
               for r in server.list_requests()}
    assert queries == {
        ("/api/v1/namespaces/kube-system/services", "metadata.name=kube-dns", None),
        ("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices", None,
         "kubernetes.io/service-name=kube-dns"),
        ("/api/v1/nodes", "metadata.name=node-a", None),
    }
    assert {r.authorization for r in server.requests} == {"Bearer fake-token"}


def test_startup_lists_then_watches_from_the_list_resource_version(server, source):
    src = source(watch_timeout=30)
    assert src.snapshot() is None  # nothing listed yet
    facts = started(src, server)
    assert same(facts, INITIAL)
    for w in server.watch_requests():
        assert w.query["resourceVersion"] == "5"
        assert w.query["allowWatchBookmarks"] == "true"
        assert 30 <= int(w.query["timeoutSeconds"]) < 60
    st = src.status()
    assert st["connected"] and st["synced"] and not st["stale"]


def test_without_node_name_pod_cidrs_are_empty(server, source):
    facts = started(source(node_name=None), server, watchers=2)
    assert facts.pod_cidrs == ()
    assert facts.dns_ips == INITIAL.dns_ips


def test_missing_service_gives_empty_facts_then_appears(server, source, caplog):
    server.delete("services", "kube-system", "kube-dns")
    src = source()
    facts = started(src, server)
    assert facts.dns_ips == ()
    assert "service kube-system/kube-dns does not exist" in caplog.text
    server.put_service("kube-system", "kube-dns", ["10.96.0.10"])
    assert wait_facts(src, lambda f: f.dns_ips == (ip("10.96.0.10"),))


def test_several_dns_services_keep_flag_order(server, source):
    server.put_service("dns2", "coredns", ["10.96.1.1"])
    server.put_endpoint_slice("dns2", "coredns-1", service="coredns", endpoints=["10.244.7.7"])
    src = source(dns_services=[("dns2", "coredns"), *DNS])
    facts = started(src, server, watchers=5)
    assert facts.dns_ips == (ip("10.96.1.1"), ip("10.96.0.10"), ip("fd00::a"))
    assert (ip("10.244.7.7"), 53) in facts.dns_endpoints


# -- changes ----------------------------------------------------------------------------------
def test_cluster_ip_change_reaches_the_snapshot_within_a_second(server, source):
    src = source()
    started(src, server)
    assert not src.wait_changed(0.05)  # nothing changed since the snapshot
    t0 = time.monotonic()
    server.put_service("kube-system", "kube-dns", ["10.96.0.53"])
    assert src.wait_changed(1.0)
    assert time.monotonic() - t0 < 1.0
    assert src.snapshot().dns_ips == (ip("10.96.0.53"),)


def test_peek_does_not_swallow_the_agents_wake_up(server, source):
    src = source()
    started(src, server)
    server.put_service("kube-system", "kube-dns", ["10.96.0.54"])
    assert server.wait_for(lambda: src.peek().dns_ips == (ip("10.96.0.54"),))
    assert src.wait_changed(0.5)  # a status reader peeked; the agent is still told
    assert src.snapshot().dns_ips == (ip("10.96.0.54"),)
    assert not src.wait_changed(0.05)


def test_endpoint_changes_reach_dns_endpoints(server, source):
    src = source()
    started(src, server)
    server.put_endpoint_slice("kube-system", "kube-dns-v4", service="kube-dns",
                              endpoints=["10.244.1.5", ("10.244.0.4", False), "10.244.3.8"])
    facts = wait_facts(src, lambda f: (ip("10.244.3.8"), 53) in f.dns_endpoints)
    assert facts.dns_endpoints == ((ip("10.244.1.5"), 53), (ip("10.244.3.8"), 53))
    server.put_endpoint_slice("kube-system", "kube-dns-v6", service="kube-dns",
                              endpoints=["fd00::5"])
    facts = wait_facts(src, lambda f: len(f.dns_endpoints) == 3)
    assert facts.dns_endpoints[-1] == (ip("fd00::5"), 53)
    server.delete("endpointslices", "kube-system", "kube-dns-v4")
    assert wait_facts(src, lambda f: f.dns_endpoints == ((ip("fd00::5"), 53),))


def test_irrelevant_changes_do_not_wake_the_agent(server, source):
    src = source()
    started(src, server)
    server.put_endpoint_slice("kube-system", "other-x", service="other", endpoints=["10.9.9.8"])
    server.put_node("node-b", ["10.244.9.0/24"])
    # same ClusterIPs, different ports: the stored value is equal, so no wake-up either
    server.put_service("kube-system", "kube-dns", ["10.96.0.10", "fd00::a"],
                       ports=[("dns", "UDP", 53)])
    assert not src.wait_changed(0.5)


def test_node_pod_cidr_assigned_after_start(server, source):
    server.put_node("node-c")
    src = source(node_name="node-c")
    assert started(src, server).pod_cidrs == ()
    server.put_node("node-c", ["10.244.5.0/24"])
    assert wait_facts(src, lambda f: f.pod_cidrs == (ipaddress.ip_network("10.244.5.0/24"),))


# -- expiry -----------------------------------------------------------------------------------
def test_410_relists_and_misses_nothing(tmp_path):
    with FakeApiServer(history=3, bookmark_interval=60) as server:
        server.put_service("kube-system", "kube-dns", ["10.96.0.10"])
        server.put_endpoint_slice("kube-system", "a", service="kube-dns", endpoints=["10.1.0.1"])
        kc = server.write_kubeconfig(tmp_path / "kc")
        src = KubeSource(kubeconfig=str(kc), dns_services=DNS, node_name=None,
                         read_timeout=5, watch_timeout=30, backoff=FAST)
        try:
            started(src, server, watchers=2)
            with server.down():
                # more changes than the history holds, while the watch is away
                server.put_service("kube-system", "kube-dns", ["10.96.0.11"])
                server.put_endpoint_slice("kube-system", "b", service="kube-dns",
                                          endpoints=["10.1.0.2"])
                server.delete("endpointslices", "kube-system", "a")
                for i in range(5):
                    server.put_service("default", f"noise{i}", ["10.96.7.7"])
                server.put_service("kube-system", "kube-dns", ["10.96.0.12"])
            # each reflector recovers on its own: wait for both
            wait_facts(src, lambda f: f.dns_ips == (ip("10.96.0.12"),)
                       and f.dns_endpoints == ((ip("10.1.0.2"), 53),), timeout=3)
            relists = {k: v["relists"] for k, v in src.status()["reflectors"].items()}
            assert all(n >= 1 for n in relists.values()), relists
            # and the watch resumed from the relist's resourceVersion: later changes still arrive
            server.put_endpoint_slice("kube-system", "b", service="kube-dns",
                                      endpoints=["10.1.0.3"])
            assert wait_facts(src, lambda f: f.dns_endpoints == ((ip("10.1.0.3"), 53),))
        finally:
            src.stop()


def test_410_response_to_a_watch_relists(server, source):
    src = source()
    started(src, server)
    lists_before = len(server.list_requests("services"))
    server.inject(Fault.HTTP_410, watch=True, resource="services")
    server.break_watches()
    server.put_service("kube-system", "kube-dns", ["10.96.0.77"])
    assert wait_facts(src, lambda f: f.dns_ips == (ip("10.96.0.77"),), timeout=2)
    assert len(server.list_requests("services")) == lists_before + 1


# -- failures ---------------------------------------------------------------------------------
def test_outage_keeps_the_last_facts_and_status_says_so(server, source):
    src = source()
    before = started(src, server)
    server.outage()
    try:
        assert server.wait_for(lambda: not src.status()["connected"], timeout=3)
        # several failed reconnects, each one counted, and the facts still the last ones
        assert server.wait_for(lambda: all(
            r["errors"] >= 3 for r in src.status()["reflectors"].values()), timeout=10)
        assert same(src.snapshot(), before)
        st = src.status()
        assert st["stale"] and st["synced"] and st["last_error"]
        assert all(r["errors"] >= 1 for r in st["reflectors"].values())
    finally:
        server.restore()
    server.put_service("kube-system", "kube-dns", ["10.96.0.99"])
    assert wait_facts(src, lambda f: f.dns_ips == (ip("10.96.0.99"),), timeout=2)
    assert server.wait_for(lambda: src.status()["connected"], timeout=2)
    assert not src.status()["stale"]


def test_half_open_watch_is_abandoned_at_the_read_timeout(server, source):
    # a healthy idle watch gets bookmarks more often than the read timeout, as from a real
    # API server (every minute there, with our default read timeout of 90 s)
    server.bookmark_interval = 0.2
    src = source(read_timeout=1.0)
    started(src, server)
    time.sleep(1.2)  # idle for longer than the read timeout: bookmarks keep the watch alive
    assert src.status()["reflectors"]["service kube-system/kube-dns"]["errors"] == 0
    watches = len(server.watch_requests("services"))
    server.freeze_watches()
    server.put_service("kube-system", "kube-dns", ["10.96.0.42"])
    # No timing window (the machine is shared): what proves the frozen stream was abandoned at
    # the read timeout is how the change arrived. Only two things end a frozen stream: our read
    # timeout or the server's watch timeout (30 s); the wait is far shorter than the latter.
    wait_facts(src, lambda f: f.dns_ips == (ip("10.96.0.42"),), timeout=10)
    st = src.status()
    # on a new watch (the frozen stream sends nothing), opened after exactly one error
    assert len(server.watch_requests("services")) == watches + 1
    assert st["reflectors"]["service kube-system/kube-dns"]["errors"] == 1
    assert "read timeout" in st["last_error"]


def test_stalled_list_is_retried_after_the_read_timeout(server, source):
    server.inject(Fault.STALL, watch=False, resource="services")
    src = source(read_timeout=0.5)
    facts = started(src, server)
    assert same(facts, INITIAL)
    # the stalled list was given up at the read timeout, then retried: no timing window needed
    stalled = [r for r in server.requests
               if not r.watch and r.resource == "services" and r.fault is Fault.STALL]
    assert len(stalled) == 1 and len(server.list_requests("services")) == 1
    reflector = src.status()["reflectors"]["service kube-system/kube-dns"]
    assert reflector["errors"] == 1 and "read timeout" in reflector["last_error"]


class Recorder:
    """A waiter that records the delays it is asked for and returns at once."""

    def __init__(self):
        self.delays = []

    def __call__(self, stop, seconds):
        self.delays.append(seconds)
        return stop.is_set()


def test_429_and_500_back_off_then_succeed(server, kubeconfig):
    server.inject(Fault.HTTP_429, watch=False, resource="services", retry_after=3)
    server.inject(Fault.HTTP_500, watch=False, resource="services", times=2)
    rec = Recorder()
    api = kclient.new_api_client(kubeconfig)
    r = Reflector("service kube-system/kube-dns", kclient.service(api, "kube-system", "kube-dns"),
                  service_cluster_ips, read_timeout=5, watch_timeout=30,
                  backoff=Backoff(initial=0.5, maximum=30, jitter=0.5, rand=lambda: 0.0),
                  wait=rec)
    stop = threading.Event()
    t = threading.Thread(target=r.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert server.wait_for(lambda: r.synced)
        # Retry-After 3 honoured, then 0.5 s doubling (jitter 0 here)
        assert rec.delays == [3.0, 1.0, 2.0]
        assert r.values() == [(ip("10.96.0.10"), ip("fd00::a"))]
        st = r.status()
        assert st["errors"] == 3 and "HTTP 500" in st["last_error"]
    finally:
        stop.set()
        r.interrupt()
        t.join(2)
        api.close()
    assert not t.is_alive()


def test_backoff_restarts_after_progress(server, kubeconfig):
    rec = Recorder()
    api = kclient.new_api_client(kubeconfig)
    r = Reflector("svc", kclient.service(api, "kube-system", "kube-dns"), service_cluster_ips,
                  read_timeout=5, watch_timeout=30,
                  backoff=Backoff(initial=1, jitter=0, rand=lambda: 0.0), wait=rec)
    server.inject(Fault.CLOSE, watch=True, times=2)
    stop = threading.Event()
    t = threading.Thread(target=r.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert server.wait_for(lambda: server.watchers == 1)
        server.inject(Fault.HTTP_500, watch=True)
        server.put_service("kube-system", "kube-dns", ["10.96.0.1"])  # progress: an event
        assert server.wait_for(lambda: r.values() == [(ip("10.96.0.1"),)])
        server.break_watches()
        assert server.wait_for(lambda: len(rec.delays) == 4 and server.watchers == 1)
        # list ok, two cut watches (1, 2), then after the event the count starts over: the
        # cut watch is failure 1 again, the injected 500 failure 2
        assert rec.delays == [1.0, 2.0, 1.0, 2.0]
    finally:
        stop.set()
        r.interrupt()
        t.join(2)
        api.close()


def test_a_crashing_extractor_does_not_kill_the_reflector(server, kubeconfig):
    calls = []

    def extract(obj):
        calls.append(obj)
        if len(calls) == 2:
            raise KeyError("bug")
        return service_cluster_ips(obj)

    api = kclient.new_api_client(kubeconfig)
    r = Reflector("svc", kclient.service(api, "kube-system", "kube-dns"), extract,
                  read_timeout=5, watch_timeout=30, backoff=FAST)
    stop = threading.Event()
    t = threading.Thread(target=r.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert server.wait_for(lambda: r.synced and server.watchers == 1)
        server.put_service("kube-system", "kube-dns", ["10.96.0.2"])  # the crashing call
        assert server.wait_for(lambda: r.values() == [(ip("10.96.0.2"),)])  # relisted
        assert "internal error" in r.status()["last_error"]
    finally:
        stop.set()
        r.interrupt()
        t.join(2)
        api.close()


def test_stop_interrupts_an_open_watch_promptly(server, source):
    src = source(read_timeout=30.0)
    started(src, server)
    t0 = time.monotonic()
    src.stop()
    assert time.monotonic() - t0 < 1.0
    assert not any(t.is_alive() for t in threading.enumerate()
                   if t.name.startswith("dnsguard-kube"))


# -- one-shot errors --------------------------------------------------------------------------
def test_load_once_raises_typed_errors(server, kubeconfig, tmp_path):
    with pytest.raises(KubeConfigError, match="--kubeconfig"):
        load_once(kubeconfig=str(tmp_path / "missing"), dns_services=DNS, node_name=None)
    server.inject(Fault.HTTP_500)
    with pytest.raises(KubeApiError, match="HTTP 500"):
        load_once(kubeconfig=kubeconfig, dns_services=DNS, node_name=None)
    server.stop()
    with pytest.raises(KubeApiError, match="connect"):
        load_once(kubeconfig=kubeconfig, dns_services=DNS, node_name=None, read_timeout=2)


def test_in_cluster_config_missing_is_a_config_error(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="in-cluster"):
        KubeSource(kubeconfig=None, dns_services=DNS, node_name=None)


# -- scale ------------------------------------------------------------------------------------
def test_every_service_paginated_into_small_values(tmp_path):
    """The generic reflector at the shape of the later all-Services watch (kept small here)."""
    with FakeApiServer() as server:
        for i in range(1200):
            server.put_service(f"ns{i % 7}", f"svc{i}", [f"10.{96 + i // 65536}.{i // 256 % 256}."
                                                        f"{i % 256}"])
        api = kclient.new_api_client(str(server.write_kubeconfig(tmp_path / "kc")))
        try:
            r = Reflector("all services", kclient.all_services(api), service_cluster_ips,
                          read_timeout=5, watch_timeout=30)
            r.list_once()
        finally:
            api.close()
        pages = server.list_requests("services")
        assert [p.query.get("continue") is not None for p in pages] == [False, True, True]
        items = r.items()
        assert len(items) == 1200
        assert items["ns5/svc12"] == (ip("10.96.0.12"),)
        # only extracted values are kept, not objects
        assert all(type(v) is tuple for v in items.values())
