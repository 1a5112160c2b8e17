"""--external-to-cluster claims external IPs safely (issue 13, finding 2: CVE-2020-8554 class):
never a node, pod, ClusterIP, DNS, API server or special address; load-balancer status before
spec.externalIPs, then the oldest Service; ipMode Proxy left alone; --external-cidr limits."""

from __future__ import annotations

import ipaddress
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from dnsguard.cli import _replanner, render_plan
from dnsguard.config import Settings
from dnsguard.facts import Observed, with_cluster
from dnsguard.kube import Backoff, ClusterFacts, KubeSource
from dnsguard.kube.extract import node_addresses, service_external
from dnsguard.metrics import Metrics, SkipReport
from dnsguard.model import (
    Backend,
    ExternalService,
    Family,
    Mitigation,
    NodeFacts,
    Proto,
    ProxyMode,
    ServicePort,
)
from dnsguard.plan import plan
from dnsguard.testing.fake_apiserver import FakeApiServer, node_object

ip = ipaddress.ip_address
net = ipaddress.ip_network
ONLY_EXT = Settings(mitigation=Mitigation.NONE, external_to_cluster=True)
NODE_IP, OTHER_NODE_IP, API_IP = ip("198.18.9.1"), ip("198.18.9.2"), ip("198.18.9.100")


def svc(key: str, *ext: str, lb: tuple[str, ...] = (), created: str = "2026-01-01T00:00:00Z",
        uid: str = "", cluster: str = "198.18.1.20", port: int = 10250) -> ExternalService:
    return ExternalService(key, (ip(cluster),), (ServicePort(Proto.TCP, port),),
                           tuple(ip(a) for a in (*ext, *lb)), lb_ips=tuple(ip(a) for a in lb),
                           created=created, uid=uid or key)


def facts(*svcs: ExternalService) -> NodeFacts:
    return NodeFacts(ProxyMode.IPVS, dns_ips=(ip("198.18.1.10"),),
                     pod_cidrs=(net("198.18.0.0/24"),), families=frozenset({Family.V4}),
                     external_services=svcs, node_ips=(NODE_IP, OTHER_NODE_IP),
                     api_server_ips=(API_IP,), dns_endpoints=(ip("198.18.0.53"),))


def claimed(p: Any) -> dict[str, set[str]]:
    """Service -> the external IPs its dispatch rules match, from the rendered rules."""
    out: dict[str, set[str]] = {}
    for line in render_plan(p, Backend.IPTABLES_NFT).splitlines():
        if "external IP " in line and "from the node" in line:
            key, rest = line.split('"dnsguard: ', 1)[1].split(" ", 1)
            out.setdefault(key, set()).add(rest.split("external IP ", 1)[1].split()[0])
    return out


@pytest.mark.parametrize(("addr", "what"), [
    (str(NODE_IP), "this node: kubelet :10250 would hand its scrapers' tokens to the Service"),
    (str(OTHER_NODE_IP), "another node"),
    ("198.18.0.7", "a pod"),
    ("198.18.1.10", "the DNS ClusterIP"),
    ("198.18.0.53", "a DNS endpoint"),
    ("198.18.1.30", "another Service's ClusterIP"),
    (str(API_IP), "the API server"),
    ("127.0.0.1", "loopback"), ("169.254.20.10", "link-local"), ("224.0.0.251", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"),
])
def test_nobody_claims_a_reserved_address(addr: str, what: str) -> None:
    thief = svc("evil/thief", addr, "198.19.5.5")
    other = svc("shop/db", "198.19.5.6", cluster="198.18.1.30")
    p = plan(facts(thief, other), ONLY_EXT)
    assert claimed(p)["evil/thief"] == {"198.19.5.5"}, what  # keeps its good address
    assert [(s.key, s.reason) for s in p.skipped] == [("evil/thief", "reserved_ip")]
    assert addr in p.skipped[0].detail


def test_load_balancer_status_beats_an_older_services_external_ip() -> None:
    lb = svc("shop/web", lb=("198.19.5.1",), created="2026-06-01T00:00:00Z")
    squatter = svc("evil/squat", "198.19.5.1", created="2020-01-01T00:00:00Z")
    p = plan(facts(squatter, lb), ONLY_EXT)
    assert claimed(p) == {"shop/web": {"198.19.5.1"}}
    assert [(s.key, s.reason) for s in p.skipped] == [("evil/squat", "duplicate_ip")]


def test_a_duplicate_goes_to_the_oldest_service_in_any_order() -> None:
    """Before: the name that sorted first won, so a new Service could take an address."""
    old = svc("z-team/old", "198.19.5.1", created="2025-01-01T00:00:00Z")
    new = svc("a-team/new", "198.19.5.1", created="2026-01-01T00:00:00Z")
    tie_b = svc("b/tie", "198.19.5.2", created="2025-01-01T00:00:00Z", uid="bbbb")
    tie_a = svc("c/tie", "198.19.5.2", created="2025-01-01T00:00:00Z", uid="aaaa")
    undated = svc("a/undated", "198.19.5.3", created="")
    dated = svc("z/dated", "198.19.5.3", created="2026-11-01T00:00:00Z")
    results = {repr((claimed(p := plan(facts(*order), ONLY_EXT)), p.skipped))
               for order in itertools.permutations((old, new, tie_b, tie_a, undated, dated))}
    assert len(results) == 1  # the same winner on every node, whatever the watch order
    p = plan(facts(old, new, tie_b, tie_a, undated, dated), ONLY_EXT)
    assert claimed(p) == {"z-team/old": {"198.19.5.1"}, "c/tie": {"198.19.5.2"},
                          "z/dated": {"198.19.5.3"}}
    assert {(s.key, s.reason) for s in p.skipped} == {
        ("a-team/new", "duplicate_ip"), ("b/tie", "duplicate_ip"), ("a/undated", "duplicate_ip")}


def test_external_cidr_limits_what_may_be_claimed() -> None:
    s = svc("shop/web", "198.19.5.1", "198.19.200.1")
    p = plan(facts(s), Settings(mitigation=Mitigation.NONE, external_to_cluster=True,
                                external_cidrs=(net("198.19.0.0/24"), net("198.19.5.0/24"))))
    assert claimed(p) == {"shop/web": {"198.19.5.1"}}
    assert [(s.reason, "198.19.200.1" in s.detail) for s in p.skipped] == [
        ("outside_external_cidr", True)]


def lb_service(ingress: list[dict[str, str]], external: list[str] = ()) -> dict[str, Any]:
    return {"metadata": {"namespace": "shop", "name": "web", "uid": "u-1",
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {"clusterIPs": ["198.18.1.20"], "ports": [{"port": 80}],
                     "externalIPs": list(external)},
            "status": {"loadBalancer": {"ingress": ingress}}}


def test_ip_mode_proxy_ingress_is_left_to_its_load_balancer() -> None:
    got = service_external(lb_service([{"ip": "198.19.5.1", "ipMode": "Proxy"},
                                       {"ip": "198.19.5.2", "ipMode": "VIP"},
                                       {"ip": "198.19.5.3"}], external=["198.19.5.4"]))
    assert got is not None
    assert got.external_ips == (ip("198.19.5.4"), ip("198.19.5.2"), ip("198.19.5.3"))
    assert got.lb_ips == (ip("198.19.5.2"), ip("198.19.5.3"))
    assert (got.created, got.uid) == ("2026-01-02T03:04:05Z", "u-1")
    assert service_external(lb_service([{"ip": "198.19.5.1", "ipMode": "Proxy"}])) is None


def test_node_addresses_are_the_ip_addresses_of_the_node() -> None:
    obj = {"metadata": {"name": "n1"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "198.18.9.1"}, {"type": "Hostname", "address": "n1"},
        {"type": "ExternalIP", "address": "fd00:198:18:9::1"},
        {"type": "InternalIP", "address": "fe80::1%eth0"}]}}
    assert node_addresses(obj) == (ip("198.18.9.1"), ip("fd00:198:18:9::1"))


def test_the_api_gives_every_nodes_addresses_and_a_node_ip_is_not_claimed(
        tmp_path: Path) -> None:
    """Through the real client against the fake API server: all Nodes are watched in external
    mode, and a Service claiming another node's kubelet address gets no rule. What it cannot
    prove: a real API server's field validation (it would refuse some of these objects)."""
    with FakeApiServer() as server:
        server.put_service("kube-system", "kube-dns", ["198.18.1.10"])
        for name, addr in (("n1", "198.18.9.1"), ("n2", "198.18.9.2")):
            server.apply("nodes", {**node_object(name), "status": {"addresses": [
                {"type": "InternalIP", "address": addr}]}})
        obj = lb_service([], external=["198.18.9.2", "198.19.5.5"])
        obj["metadata"] = {"namespace": "evil", "name": "kubelet"}
        obj["spec"]["ports"] = [{"port": 10250}]
        server.apply("services", obj)
        src = KubeSource(kubeconfig=str(server.write_kubeconfig(tmp_path / "kc")),
                         dns_services=[("kube-system", "kube-dns")], node_name="n1",
                         read_timeout=5.0, watch_timeout=30,
                         backoff=Backoff(initial=0.02, maximum=0.1), external=True)
        src.start()
        try:
            end = time.monotonic() + 10
            while (cf := src.snapshot()) is None or len(cf.node_ips) < 2:
                assert time.monotonic() < end, cf
                src.wait_changed(0.2)
        finally:
            src.stop()
    assert cf.node_ips == (ip("198.18.9.1"), ip("198.18.9.2"))
    assert ip("127.0.0.1") in cf.api_server_ips  # the fake server's address in the kubeconfig
    obs = Observed(NodeFacts(ProxyMode.IPVS, pod_cidrs=(net("198.18.0.0/24"),)),
                   Backend.IPTABLES_NFT, ())
    eff, f = with_cluster(ONLY_EXT, obs, cf)
    p = plan(f, eff)
    assert claimed(p) == {"evil/kubelet": {"198.19.5.5"}}
    assert [(s.key, s.reason) for s in p.skipped] == [("evil/kubelet", "reserved_ip")]


class _Source:
    """Just what `_replanner` reads of a KubeSource: the latest facts."""

    def __init__(self, cf: Any) -> None:
        self.cf = cf

    def snapshot(self) -> Any:
        return self.cf


def test_the_agents_replans_count_a_refused_claim_once(caplog: pytest.LogCaptureFixture) -> None:
    thief = svc("evil/thief", str(NODE_IP), "198.19.5.5")
    cf = ClusterFacts((), (), (net("198.18.0.0/24"),), "", (thief,), node_ips=(NODE_IP,))
    obs = Observed(NodeFacts(ProxyMode.IPVS), Backend.IPTABLES_NFT, ())
    m = Metrics(CollectorRegistry())
    skips = SkipReport(m.services_skipped)
    replan = _replanner(_Source(cf), ONLY_EXT, obs, skips)  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="dnsguard.metrics"):
        first, second = replan(), replan()
    assert first is not None and first == second
    assert claimed(first) == {"evil/thief": {"198.19.5.5"}}
    assert [r.getMessage() for r in caplog.records if "evil/thief" in r.getMessage()] == [
        f"leaving Service evil/thief out of the plan (reserved_ip): external IP {NODE_IP}: "
        "a node, API server, DNS or ClusterIP address"]
    assert m.registry.get_sample_value("dnsguard_services_skipped_total",
                                       {"reason": "reserved_ip"}) == 1.0
