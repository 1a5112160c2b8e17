"""Node-local mode planning: interception per kube-proxy mode, loops refused, unbound config."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from dnsguard.cli import render_plan
from dnsguard.config import Settings
from dnsguard.model import (
    BYPASS_MARK,
    PROBE_MARK,
    Backend,
    Family,
    Hook,
    Mitigation,
    NodeFacts,
    Proto,
    ProxyMode,
    Table,
    Verdict,
)
from dnsguard.plan import PlanRefused, plan
from dnsguard.plan.cache import render_unbound

GOLDEN = Path(__file__).parent / "golden"
CIP = ipaddress.ip_address("198.18.1.10")
LOCAL = ipaddress.ip_address("169.254.20.10")
EP1, EP2 = ipaddress.ip_address("198.18.0.101"), ipaddress.ip_address("198.18.0.102")


def nl(mode: ProxyMode, upstreams=((EP1, 53), (EP2, 53)), **kw) -> Settings:
    return Settings(mitigation=Mitigation.NODELOCAL, upstreams=tuple(upstreams), **kw)


def facts(mode: ProxyMode, **kw) -> NodeFacts:
    return NodeFacts(proxy_mode=mode, dns_ips=(CIP,), families=frozenset({Family.V4}), **kw)


@pytest.mark.parametrize("mode", list(ProxyMode))
@pytest.mark.parametrize("backend", list(Backend))
def test_nodelocal_plan_matches_golden(mode: ProxyMode, backend: Backend) -> None:
    text = render_plan(plan(facts(mode), nl(mode)), backend)
    assert text == (GOLDEN / f"nodelocal-{mode.value}-{backend.value}.txt").read_text()


@pytest.mark.parametrize("mode", [ProxyMode.IPTABLES, ProxyMode.NFTABLES])
def test_clusterip_is_served_locally_where_kube_proxy_dnats(mode: ProxyMode) -> None:
    p = plan(facts(mode), nl(mode))
    assert p.cache is not None and p.cache.listen == (LOCAL, CIP)
    chains = {(c.table, c.hook) for c in p.for_family(Family.V4).chains}
    assert (Table.NAT, Hook.PREROUTING) not in chains  # fallback is kube-proxy's own DNAT


def test_ipvs_mode_serves_link_local_only_and_falls_back_by_dnat() -> None:
    p = plan(facts(ProxyMode.IPVS), nl(ProxyMode.IPVS, upstreams=()))
    assert p.cache is not None and p.cache.listen == (LOCAL,)
    assert p.cache.cluster_upstreams == ((CIP, 53),)  # the ClusterIP, through IPVS
    nat = [c for c in p.for_family(Family.V4).chains if c.table is Table.NAT]
    assert {c.hook for c in nat} == {Hook.PREROUTING, Hook.OUTPUT}
    assert all(r.verdict is Verdict.DNAT and r.to == (CIP, 53) for c in nat for r in c.rules)


def test_every_intercepting_notrack_is_gated_by_the_dead_mans_switch() -> None:
    p = plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES))
    for chain in p.for_family(Family.V4).chains:
        for rule in chain.rules:
            if rule.verdict is Verdict.NOTRACK and rule.match.dport == 53:
                # the one exception: the agent's own health query, which proves the cache
                # healthy before the switch is turned on
                assert rule.match.alive or rule.match.mark == PROBE_MARK, rule.comment


@pytest.mark.parametrize("mode", list(ProxyMode))
def test_agent_probes_pass_first_in_raw_output_whatever_the_switch(mode: ProxyMode) -> None:
    p = plan(facts(mode), nl(mode, upstreams=() if mode is ProxyMode.IPVS else ((EP1, 53),)))
    assert p.cache is not None and p.cache.cluster_ips == (CIP,)
    out = next(c for c in p.for_family(Family.V4).chains
               if c.table is Table.RAW and c.hook is Hook.OUTPUT)
    marked = [r for r in out.rules if r.match.mark is not None]
    assert list(out.rules[:len(marked)]) == marked  # ahead of every interception rule
    probes = {(r.match.dst, r.verdict) for r in marked if r.match.mark == PROBE_MARK}
    assert probes == {(ipaddress.ip_network(a), Verdict.NOTRACK) for a in p.cache.listen}
    bypass = [(r.match.dst, r.verdict) for r in marked if r.match.mark == BYPASS_MARK]
    # in ipvs mode the ClusterIP is not intercepted: nothing to bypass
    assert bypass == ([] if mode is ProxyMode.IPVS else
                      [(ipaddress.ip_network(CIP), Verdict.RETURN)])
    assert all(r.match.proto is Proto.UDP and r.match.dport == 53 for r in marked)


def test_upstream_that_is_intercepted_is_refused_as_a_loop() -> None:
    with pytest.raises(PlanRefused, match=r"invalid --upstream 198\.18\.1\.10: .*query itself"):
        plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES, upstreams=((CIP, 53),)))


def test_iptables_mode_needs_upstream_endpoints() -> None:
    with pytest.raises(PlanRefused, match="needs --upstream"):
        plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES, upstreams=()))


def test_node_nameservers_that_would_loop_are_dropped() -> None:
    f = facts(ProxyMode.IPTABLES, node_nameservers=(CIP, ipaddress.ip_address("198.18.9.9")))
    p = plan(f, nl(ProxyMode.IPTABLES))
    assert p.cache is not None
    assert p.cache.external_upstreams == ((ipaddress.ip_address("198.18.9.9"), 53),)


def test_unbound_config_is_deterministic_and_accepted_by_unbound(tmp_path: Path) -> None:
    p = plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES))
    assert p.cache is not None
    text = render_unbound(p.cache, Path("/run/dnsguard"))
    assert text == (GOLDEN / "unbound-iptables.conf").read_text()
    conf = tmp_path / "unbound.conf"
    conf.write_text(render_unbound(p.cache, tmp_path))
    res = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr

