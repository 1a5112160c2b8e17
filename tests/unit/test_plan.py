"""Planner and renderers: output per mode/family/backend against golden text, and refusals."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from dnsguard.cli import render_plan
from dnsguard.config import Settings
from dnsguard.model import Backend, Family, NodeFacts, ProxyMode
from dnsguard.plan import PlanRefused, plan

GOLDEN = Path(__file__).parent / "golden"
V4, V6 = ipaddress.ip_address("198.18.1.10"), ipaddress.ip_address("fd00:198:18:1::a")
CIDR4, CIDR6 = ipaddress.ip_network("198.18.0.0/24"), ipaddress.ip_network("fd00:198:18::/64")


def facts(mode: ProxyMode, ips=(V4,), cidrs=(CIDR4,)) -> NodeFacts:
    return NodeFacts(proxy_mode=mode, dns_ips=tuple(ips), pod_cidrs=tuple(cidrs),
                     families=frozenset({Family.V4, Family.V6}))


@pytest.mark.parametrize("backend", list(Backend))
@pytest.mark.parametrize("stack", ["v4", "dual"])
def test_ipvs_plan_matches_golden(backend: Backend, stack: str) -> None:
    f = facts(ProxyMode.IPVS, (V4,) if stack == "v4" else (V4, V6),
              (CIDR4,) if stack == "v4" else (CIDR4, CIDR6))
    text = render_plan(plan(f, Settings()), backend)
    golden = GOLDEN / f"ipvs-{stack}-{backend.value}.txt"
    assert text == golden.read_text()


def test_ipvs_plan_untracks_both_directions() -> None:
    p = plan(facts(ProxyMode.IPVS), Settings())
    rules = p.for_family(Family.V4).chains[0].rules
    requests = [r for r in rules if r.match.dport == 53]
    replies = [r for r in rules if r.match.sport == 53]
    assert {r.match.proto.value for r in requests} == {"udp", "tcp"}  # type: ignore[union-attr]
    assert all(r.match.dst == ipaddress.ip_network("198.18.1.10/32") for r in requests)
    # replies are matched only towards pods, never towards node addresses (masqueraded NodePorts)
    assert all(r.match.src == CIDR4 and r.match.dst == CIDR4 for r in replies)
    assert len(replies) == 2


@pytest.mark.parametrize("mode", [ProxyMode.IPTABLES, ProxyMode.NFTABLES])
def test_notrack_to_cluster_ip_is_refused_where_kube_proxy_dnats(mode: ProxyMode) -> None:
    with pytest.raises(PlanRefused) as exc:
        plan(facts(mode), Settings())
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"kube-proxy {mode.value} mode" in msg and "198.18.1.10" in msg
    assert "--mitigation nodelocal" in msg


def test_ipvs_without_pod_cidr_of_that_family_is_refused() -> None:
    with pytest.raises(PlanRefused, match=r"IPv6 --pod-cidr .*fd00:198:18:1::a"):
        plan(facts(ProxyMode.IPVS, (V4, V6), (CIDR4,)), Settings())


def test_notrack_needs_a_dns_ip() -> None:
    with pytest.raises(PlanRefused, match="needs --dns-ip"):
        plan(facts(ProxyMode.IPVS, (), (CIDR4,)), Settings())


def test_v6_only_plan_owns_nothing_in_v4() -> None:
    p = plan(facts(ProxyMode.IPVS, (V6,), (CIDR6,)), Settings())
    assert [rs.family for rs in p.rulesets] == [Family.V6]
    assert p.for_family(Family.V4).chains == ()


def test_known_dns_endpoints_narrow_the_reply_rule_to_those_pods() -> None:
    ep1, ep2 = ipaddress.ip_address("198.18.5.7"), ipaddress.ip_address("198.18.9.3")
    f = NodeFacts(proxy_mode=ProxyMode.IPVS, dns_ips=(V4,), pod_cidrs=(CIDR4,),
                  dns_endpoints=(ep1, ep2), families=frozenset({Family.V4}))
    rules = plan(f, Settings()).for_family(Family.V4).chains[0].rules
    replies = [r.match for r in rules if r.match.sport == 53]
    assert {(str(m.src), str(m.dst)) for m in replies} == {
        ("198.18.5.7/32", "198.18.0.0/24"), ("198.18.9.3/32", "198.18.0.0/24")}
