"""--external-to-cluster: extraction, golden plans, refusals, the engine on the semantic fake,
and facts that follow a Service change from the (fake) API server."""

from __future__ import annotations

import ipaddress
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dnsguard.cli import render_plan
from dnsguard.config import ConfigError, Settings
from dnsguard.facts import Observed, observe, with_cluster
from dnsguard.kube import Backoff, ClusterFacts, KubeSource
from dnsguard.kube.extract import service_external
from dnsguard.model import (
    Backend,
    ExternalService,
    Family,
    Hook,
    Mitigation,
    NodeFacts,
    Proto,
    ProxyMode,
    ServicePort,
    Table,
)
from dnsguard.netfilter import Netfilter
from dnsguard.plan import PlanRefused, plan
from dnsguard.plan.external import shard_chain, sub_chain
from dnsguard.plan.render import parse_iptables_line
from dnsguard.testing.fake_apiserver import FakeApiServer
from dnsguard.testing.fakes import FakeRunner, FakeXtables

GOLDEN = Path(__file__).parent / "golden"
ip = ipaddress.ip_address
CIDRS = (ipaddress.ip_network("198.18.0.0/24"), ipaddress.ip_network("fd00:198:18::/64"))
DUAL = frozenset({Family.V4, Family.V6})
WEB = ExternalService("shop/web", (ip("198.18.1.20"), ip("fd00:198:18:1::14")),
                      (ServicePort(Proto.TCP, 80), ServicePort(Proto.TCP, 443)),
                      (ip("198.19.5.1"), ip("fd00:198:18:5::1")))
DNS = ExternalService("infra/dns", (ip("198.18.1.30"),), (ServicePort(Proto.UDP, 53),),
                      (ip("198.19.5.9"), ip("198.19.5.8")))
ONLY_EXT = Settings(mitigation=Mitigation.NONE, external_to_cluster=True)


def facts(*svcs: ExternalService, mode: ProxyMode = ProxyMode.IPVS) -> NodeFacts:
    return NodeFacts(proxy_mode=mode, pod_cidrs=CIDRS, families=DUAL,
                     external_services=tuple(svcs))


def svc_object(ns: str, name: str, cluster_ips: list[str], *, external: list[str] = (),
               lb: list[dict[str, str]] = (), ports: list[dict[str, Any]] | None = None,
               ) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": "LoadBalancer" if lb else "ClusterIP", "clusterIP": cluster_ips[0],
                 "clusterIPs": cluster_ips, "externalIPs": list(external),
                 "ports": ports if ports is not None else [{"port": 80, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": list(lb)}},
    }


def test_extract_keeps_only_what_the_planner_needs() -> None:
    obj = svc_object("shop", "web", ["198.18.1.20", "fd00:198:18:1::14"],
                     external=["198.19.5.1"],
                     lb=[{"ip": "fd00:198:18:5::1"}, {"hostname": "lb.example"},
                         {"ip": "198.19.5.1"}],
                     ports=[{"port": 80}, {"port": 443, "protocol": "TCP"},
                            {"port": 9, "protocol": "SCTP"}])
    assert service_external(obj) == ExternalService(
        "shop/web", (ip("198.18.1.20"), ip("fd00:198:18:1::14")),
        (ServicePort(Proto.TCP, 80), ServicePort(Proto.TCP, 443)),
        (ip("198.19.5.1"), ip("fd00:198:18:5::1")),
        lb_ips=(ip("fd00:198:18:5::1"), ip("198.19.5.1")))
    assert service_external(svc_object("a", "b", ["198.18.1.1"])) is None  # no external IP
    assert service_external(svc_object("a", "b", ["None"], external=["198.19.0.1"])) is None


@pytest.mark.parametrize("backend", list(Backend))
def test_plan_matches_golden(backend: Backend) -> None:
    text = render_plan(plan(facts(WEB, DNS), ONLY_EXT), backend)
    assert text == (GOLDEN / f"external-dual-{backend.value}.txt").read_text()


def test_chain_names_are_stable_per_service_and_family_and_fit_iptables() -> None:
    name = sub_chain("shop/web", Family.V4)
    assert name == sub_chain("shop/web", Family.V4) != sub_chain("shop/web", Family.V6)
    assert len("DNSGUARD-" + name) <= 28


def test_a_family_without_cluster_ip_or_external_ip_gets_nothing() -> None:
    p = plan(facts(DNS), ONLY_EXT)  # IPv4-only Service
    assert [rs.family for rs in p.rulesets] == [Family.V4]


@pytest.mark.parametrize("mode", [ProxyMode.IPTABLES, ProxyMode.NFTABLES])
def test_refused_where_kube_proxy_handles_external_ips(mode: ProxyMode) -> None:
    with pytest.raises(PlanRefused, match="skip kube-proxy's own DNAT"):
        plan(facts(WEB, mode=mode), ONLY_EXT)


def test_combines_with_drop_invalid_and_nodelocal_fallback() -> None:
    s = Settings(mitigation=Mitigation.NODELOCAL, upstreams=((ip("198.18.0.101"), 53),),
                 external_to_cluster=True, drop_invalid_input=True)
    f = NodeFacts(proxy_mode=ProxyMode.IPVS, dns_ips=(ip("198.18.1.10"),), pod_cidrs=CIDRS,
                  families=DUAL, external_services=(WEB,))
    v4 = plan(f, s).for_family(Family.V4)
    nat_pre = next(c for c in v4.chains_in(Table.NAT) if c.name == "DNSGUARD-PREROUTING")
    # the node-local fallback DNAT first, then the dispatch to the Service's chain
    assert "falls back" in nat_pre.rules[0].comment
    assert "external IP" in nat_pre.rules[-1].comment


def _dnat_ports(p: object, family: Family = Family.V4) -> set[tuple[str, int]]:
    """(Service, port) pairs the plan DNATs to a ClusterIP."""
    return {(r.comment.split()[1], r.match.dport or 0)
            for c in p.for_family(family).chains_in(Table.NAT)  # type: ignore[attr-defined]
            for r in c.rules if r.verdict.name == "DNAT"}


def test_with_notrack_the_dns_service_port_53_is_left_out() -> None:
    """notrack untracks the DNS pods' replies: a DNATed query's reply could not be un-NATed.

    The cluster DNS Service's port 53 is left out; its other ports and other Services stay.
    Without known DNS endpoints any pod's port-53 reply is untracked, so every port 53 is left
    out; with endpoints known, another Service's port 53 keeps its DNAT.
    """
    kube_dns = ExternalService("kube-system/kube-dns", (ip("198.18.1.10"),),
                               (ServicePort(Proto.UDP, 53), ServicePort(Proto.TCP, 53),
                                ServicePort(Proto.TCP, 9153)), (ip("198.19.5.53"),))
    f = NodeFacts(proxy_mode=ProxyMode.IPVS, dns_ips=(ip("198.18.1.10"),), pod_cidrs=CIDRS,
                  families=DUAL, external_services=(kube_dns, DNS, WEB),
                  dns_endpoints=(ip("198.18.0.101"),))
    notrack = Settings(mitigation=Mitigation.NOTRACK, external_to_cluster=True)
    assert _dnat_ports(plan(f, notrack)) == {
        ("kube-system/kube-dns", 9153), ("infra/dns", 53), ("shop/web", 80), ("shop/web", 443)}
    assert ("kube-system/kube-dns", 53) in _dnat_ports(plan(f, ONLY_EXT))  # tracked: kept
    unknown = replace(f, dns_endpoints=())
    assert _dnat_ports(plan(unknown, notrack)) == {
        ("kube-system/kube-dns", 9153), ("shop/web", 80), ("shop/web", 443)}


def _xt_plan() -> tuple[FakeXtables, Netfilter]:
    xt = FakeXtables()
    return xt, Netfilter(xt, Backend.IPTABLES_LEGACY, DUAL)


def test_engine_adds_rewrites_and_removes_service_chains() -> None:
    xt, nf = _xt_plan()
    nf.apply(plan(facts(WEB, DNS), ONLY_EXT))
    assert nf.drift(plan(facts(WEB, DNS), ONLY_EXT)) == []
    web4, dns4 = "DNSGUARD-" + sub_chain("shop/web", Family.V4), \
        "DNSGUARD-" + sub_chain("infra/dns", Family.V4)
    assert {web4, dns4} <= set(xt.tables("iptables-legacy")["nat"].chains)
    # the Service goes away: its chain and dispatch rules go, the other Service's stay
    p = plan(facts(WEB), ONLY_EXT)
    assert nf.apply(p) == ["ipv4/nat"]  # IPv6 untouched: DNS had no IPv6 address
    chains = xt.tables("iptables-legacy")["nat"].chains
    assert dns4 not in chains and web4 in chains
    assert nf.drift(p) == []
    # every Service gone: nothing of ours is left in nat
    empty = plan(facts(), ONLY_EXT)
    assert empty.rulesets == ()
    assert sorted(nf.apply(empty)) == ["ipv4/nat", "ipv6/nat"]
    assert nf.drift(empty) == []
    assert not [c for c in xt.tables("iptables-legacy")["nat"].chains if c.startswith("DNSGUARD")]


def test_service_changes_from_the_api_update_and_remove_rules(tmp_path: Path,
                                                              monkeypatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    with FakeApiServer(bookmark_interval=0.5) as server:
        server.put_service("kube-system", "kube-dns", ["198.18.1.10"])
        server.apply("services", svc_object("shop", "web", ["198.18.1.20"],
                                            lb=[{"ip": "198.19.5.1"}]))
        for i in range(50):  # Services without external IPs are not stored
            server.put_service("bulk", f"s{i}", [f"198.18.2.{i}"])
        src = KubeSource(kubeconfig=str(server.write_kubeconfig(tmp_path / "kc")),
                         dns_services=[("kube-system", "kube-dns")], node_name=None,
                         read_timeout=5.0, watch_timeout=30,
                         backoff=Backoff(initial=0.02, maximum=0.1), external=True)
        xt, nf = _xt_plan()

        def sync_when(pred: Any) -> list[str]:
            end = time.monotonic() + 2.0
            while (cf := src.snapshot()) is None or not pred(cf.external_services):
                assert time.monotonic() < end, cf
                src.wait_changed(0.2)
            return nf.apply(plan(facts(*cf.external_services), ONLY_EXT))

        def dispatch() -> list[str]:
            return [r for r in xt.save("iptables-legacy", "nat").splitlines()
                    if r.startswith("-A DNSGUARD-XOUT-")]

        src.start()
        try:
            assert sync_when(lambda s: len(s) == 1) == ["ipv4/nat"]
            assert ["-d 198.19.5.1/32" in r for r in dispatch()] == [True]
            server.apply("services", svc_object("shop", "web", ["198.18.1.20"],
                                                lb=[{"ip": "198.19.5.2"}]))
            assert sync_when(lambda s: s and s[0].external_ips == (ip("198.19.5.2"),)) == [
                "ipv4/nat"]
            assert ["-d 198.19.5.2/32" in r for r in dispatch()] == [True]
            server.delete("services", "shop", "web")
            assert sync_when(lambda s: not s) == ["ipv4/nat"]
            assert dispatch() == []
            assert "DNSGUARD" not in xt.save("iptables-legacy", "nat")
        finally:
            src.stop()


class Recording:
    """A runner that records what each restore was asked to do."""

    def __init__(self, inner: FakeXtables) -> None:
        self.inner = inner
        self.restores: list[str] = []

    def run(self, argv: Any, *, stdin: str | None = None, timeout: float = 30.0) -> Any:
        if argv[0].endswith("-restore"):
            self.restores.append(stdin or "")
        return self.inner.run(argv, stdin=stdin, timeout=timeout)


def test_a_service_change_is_a_partial_sync_of_the_chains_it_touches() -> None:
    rec = Recording(FakeXtables())
    nf = Netfilter(rec, Backend.IPTABLES_LEGACY, (Family.V4,))
    nf.apply(plan(facts(WEB, DNS), ONLY_EXT))
    rec.restores.clear()
    moved = ExternalService(DNS.key, DNS.cluster_ips, DNS.ports, (ip("198.19.5.7"),))
    p = plan(facts(WEB, moved), ONLY_EXT)
    assert nf.apply(p) == ["ipv4/nat"]
    [text] = rec.restores
    declared = [ln for ln in text.splitlines() if ln.startswith(":")]
    # only the dispatch shard of 198.19.5.0/24 changes: neither Service's own chain, nor the
    # top-level dispatch (same shard), nor the hooks
    net = ipaddress.ip_network("198.19.5.0/24")
    shards = [f":DNSGUARD-{shard_chain(Hook.PREROUTING, net)} - [0:0]",
              f":DNSGUARD-{shard_chain(Hook.OUTPUT, net)} - [0:0]"]
    assert declared == shards
    assert "PREROUTING " not in text and "OUTPUT " not in text
    assert nf.drift(p) == []
    # an external IP in another /24: a new shard, and a jump to it in the top-level chains
    rec.restores.clear()
    far = ExternalService(DNS.key, DNS.cluster_ips, DNS.ports, (ip("198.19.9.7"),))
    p = plan(facts(WEB, far), ONLY_EXT)
    nf.apply(p)
    [text] = rec.restores
    assert "-A DNSGUARD-PREROUTING -d 198.19.9.0/24" in text
    assert "-A DNSGUARD-OUTPUT -d 198.19.9.0/24" in text
    assert f"-A DNSGUARD-{sub_chain(WEB.key, Family.V4)}" not in text
    assert nf.drift(p) == []
    # a Service gone: its chain is deleted in the same transaction, the other is not touched
    rec.restores.clear()
    p = plan(facts(WEB), ONLY_EXT)
    nf.apply(p)
    [text] = rec.restores
    dns4 = "DNSGUARD-" + sub_chain(DNS.key, Family.V4)
    declared = [ln for ln in text.splitlines() if ln.startswith(":")]
    far_shards = [f":DNSGUARD-{shard_chain(h, ipaddress.ip_network('198.19.9.0/24'))} - [0:0]"
                  for h in (Hook.PREROUTING, Hook.OUTPUT)]
    # the top-level jumps to the emptied shard go; the shard and the Service chain are
    # flushed, then deleted
    assert sorted(declared) == sorted([":DNSGUARD-PREROUTING - [0:0]",
                                       ":DNSGUARD-OUTPUT - [0:0]", f":{dns4} - [0:0]",
                                       *far_shards])
    assert f"-X {dns4}" in text and f"-A {dns4}" not in text
    assert f"-A DNSGUARD-{sub_chain(WEB.key, Family.V4)}" not in text
    assert nf.drift(p) == []


@pytest.mark.parametrize("line", [
    '-A DNSGUARD-INPUT -p tcp -m comment --comment "dnsguard: a b" -m conntrack --ctstate INVALID -j DROP',
    '-A X -m comment --comment "" -j ACCEPT',
    '-A X -m comment --comment "it\\\'s" -j ACCEPT',
    "-A X -m comment --comment 'single quoted' -j ACCEPT",
    '-A X -m comment --comment "a\\\\b" -j ACCEPT',
    '-A X -m comment --comment ab"cd" -j ACCEPT',
    '-A X   -j   ACCEPT  ',
])
def test_fast_tokenizer_agrees_with_shlex(line: str) -> None:
    assert parse_iptables_line(line) == tuple(shlex.split(line, posix=True))


def test_api_facts_reach_the_planner_and_the_flag_needs_the_api(monkeypatch) -> None:
    obs = Observed(facts(), Backend.IPTABLES_LEGACY, ())
    cf = ClusterFacts((), (), (), "", (WEB,))
    _, f = with_cluster(ONLY_EXT, obs, cf)
    assert f.external_services == (WEB,)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="--external-to-cluster needs the Kubernetes API"):
        observe(ONLY_EXT, FakeRunner())
