"""Property: whatever Services the API hands us, the rules dnsguard renders are accepted by
``nft -c -f`` and ``iptables-restore --test`` (legacy and nft flavours, both families), or the
odd Service alone is left out (issue 13); whatever the flags say, they are refused in one line
or give rules the kernel tools accept.

The objects are what the API could send: namespaces and names up to its limits (63
characters), unicode where it allows it (port names, ingress hostnames: dnsguard must ignore
them), any IPv4 or IPv6 address (multicast, v4-mapped, compressed, the ones our claims refuse),
ports across and beyond 1-65535, SCTP, load-balancer ingress with and without ``ipMode:
Proxy``, and addresses drawn from a small pool so duplicate claims happen. What it cannot
prove: the kernel's runtime behaviour (``--test`` and ``-c`` only parse and check), and
objects a real API server would refuse to store are included on purpose.
"""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from render_check import kernel_rejections, scratch_netns, unavailable

from dnsguard.cli import build_parser
from dnsguard.config import ConfigError, Settings, settings_from
from dnsguard.kube.extract import service_external
from dnsguard.model import Family, Mitigation, NodeFacts, ProxyMode
from dnsguard.plan import Plan, PlanRefused, plan
from dnsguard.plan.cache import render_unbound
from dnsguard.plan.checks import IPTABLES_COMMENT_MAX, NFT_COMMENT_MAX
from dnsguard.plan.render import iptables_rule, nft_rule

ONLY_EXT = Settings(mitigation=Mitigation.NONE, external_to_cluster=True)
CASES = settings(max_examples=50, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_ALNUM = string.ascii_lowercase + string.digits

@st.composite
def label(draw: st.DrawFn) -> str:
    """A DNS-1123 label as the API allows for namespaces and names: up to 63 characters,
    often the longest (hypothesis alone prefers short text)."""
    size = draw(st.one_of(st.just(63), st.integers(1, 63)))
    middle = draw(st.text(_ALNUM + "-", min_size=max(size - 2, 0), max_size=max(size - 2, 0)))
    ends = draw(st.text(_ALNUM, min_size=2, max_size=2))
    return ends[0] if size == 1 else ends[0] + middle + ends[1]


def _ips(*texts: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(t) for t in texts]


#: ClusterIPs: mostly from the Service ranges, sometimes anything
cluster_ips = st.one_of(
    st.sampled_from(_ips("198.18.1.20", "198.18.1.21", "fd00:198:18:1::14",
                         "fd00:198:18:1:ffff:ffff:ffff:ffff")), st.ip_addresses())
#: external IPs: a small pool of claimable addresses of the longest spelling, so that two
#: Services often claim one; addresses our claims refuse; and anything at all
external_ips = st.one_of(
    st.sampled_from(_ips("198.19.5.1", "198.19.255.255", "fd00:198:18:5:ffff:ffff:ffff:ffff",
                         "fd00:198:18:5::1", "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe")),
    st.sampled_from(_ips("::ffff:198.19.5.3", "224.0.0.1", "ff02::1", "198.18.0.7",
                         "127.0.0.1", "fe80::1", "0.0.0.0", "::", "255.255.255.255",
                         "198.18.9.1", "198.18.1.10")),
    st.ip_addresses())


@st.composite
def service_objects(draw: st.DrawFn) -> dict[str, Any]:
    def ip_text(addresses: st.SearchStrategy[Any]) -> str:
        ip = draw(addresses)
        # the same address as the API might spell it: exploded, compressed
        return str(ip.exploded if draw(st.booleans()) else ip)

    ports = draw(st.lists(st.fixed_dictionaries({
        "port": st.one_of(st.integers(1, 65535), st.just(65535), st.sampled_from([0, 65536])),
        "protocol": st.sampled_from(["TCP", "UDP", "SCTP"]),
        "name": st.text(max_size=15)}), min_size=1, max_size=3))
    ingress = draw(st.lists(st.fixed_dictionaries({"ip": st.builds(ip_text, st.just(
        external_ips))}, optional={
        "ipMode": st.sampled_from(["VIP", "Proxy"]),
        "hostname": st.text(max_size=30)}), max_size=2))
    return {
        "metadata": {"namespace": draw(label()), "name": draw(label()),
                     "uid": draw(st.uuids()).hex,
                     "creationTimestamp": draw(st.sampled_from(
                         ["2026-01-01T00:00:00Z", "2025-06-30T12:00:00Z", ""]))},
        "spec": {"clusterIPs": [ip_text(cluster_ips) for _ in range(draw(st.integers(1, 2)))],
                 "externalIPs": [ip_text(external_ips)
                                 for _ in range(draw(st.integers(0, 3)))],
                 "ports": ports},
        "status": {"loadBalancer": {"ingress": ingress}},
    }


def plan_for(objs: list[dict[str, Any]]) -> tuple[Plan, int]:
    """The plan for the objects (by key: the API never holds two of one name), and how many
    Services reached the planner."""
    services = {s.key: s for s in map(service_external, objs) if s is not None}
    facts = NodeFacts(ProxyMode.IPVS, dns_ips=(ipaddress.ip_address("198.18.1.10"),),
                      pod_cidrs=(ipaddress.ip_network("198.18.0.0/24"),
                                 ipaddress.ip_network("fd00:198:18::/64")),
                      families=frozenset({Family.V4, Family.V6}),
                      external_services=tuple(services.values()),
                      node_ips=(ipaddress.ip_address("198.18.9.1"),))
    return plan(facts, ONLY_EXT), len(services)


@given(st.lists(service_objects(), max_size=6))
@CASES
def test_any_services_plan_and_render_within_the_kernels_limits(
        objs: list[dict[str, Any]]) -> None:
    """No root needed: planning never raises, and every rendered rule passes the checks."""
    p, _ = plan_for(objs)
    for rs in p.rulesets:
        for chain in rs.chains:
            for rule in chain.rules:
                tokens = iptables_rule(chain.name, rule, rs.family)
                assert len(tokens[tokens.index("--comment") + 1]) <= IPTABLES_COMMENT_MAX
                comment = nft_rule(rs.family, rule).rsplit(' comment "', 1)[1][:-1]
                assert len(comment.encode()) <= NFT_COMMENT_MAX
                assert comment.isprintable() and comment.isascii()


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if reason := unavailable():
        pytest.skip(reason)
    with scratch_netns() as ns:
        yield ns


@pytest.mark.root
def test_any_services_give_rules_the_kernel_tools_accept(netns: str) -> None:
    seen = {"examples": 0, "rules": 0, "skipped": 0}

    @given(st.lists(service_objects(), max_size=6))
    @CASES
    def check(objs: list[dict[str, Any]]) -> None:
        p, _ = plan_for(objs)
        assert kernel_rejections(netns, p) == {}
        seen["examples"] += 1
        seen["rules"] += p.rule_count
        seen["skipped"] += len(p.skipped)

    check()
    # the examples did exercise both paths: rules written, and claims refused
    assert seen["rules"] > 0 and seen["skipped"] > 0, seen


#: flag values: valid-looking addresses and ranges of every kind, and arbitrary text
_FLAG_TEXT = st.one_of(
    st.ip_addresses().map(str), st.ip_addresses().map(lambda ip: ip.exploded),
    st.builds(lambda ip, n: f"{ip}/{n}", st.ip_addresses(), st.integers(0, 128)),
    st.sampled_from(["198.18.1.10", "fd00:198:18:1::a", "198.18.0.0/16", "fd00:198:18::/48",
                     "169.254.20.10", "198.18.1.11:5353", "[fd00:198:18::1]:53",
                     "fe80::1%eth0", "fd00::1%\npython-script: x", "::ffff:198.18.1.10"]),
    st.text(max_size=40))


_GOOD = {
    "--dns-ip": ["198.18.1.10", "fd00:198:18:1::a", "198.18.255.255",
                 "fd00:198:18:1:ffff:ffff:ffff:ffff"],
    "--pod-cidr": ["198.18.0.0/24", "fd00:198:18::/64", "198.18.0.0/15", "198.18.0.128/25",
                   "fd00:198:18:ffff:ffff:ffff:ffff:ff00/120"],
    "--local-ip": ["169.254.20.10", "fd00:198:18:2::a", "198.18.2.10"],
    "--upstream": ["198.18.1.11", "198.18.1.11:5353", "[fd00:198:18::1]:53", "fd00:198:18::1",
                   "127.0.0.1:5353", "[fd00:198:18:1:ffff:ffff:ffff:ffff]:65535"],
}


@st.composite
def flag_sets(draw: st.DrawFn) -> list[str]:
    argv = ["plan", "--proxy-mode", draw(st.sampled_from(["ipvs", "ipvs", "iptables",
                                                          "nftables"])),
            "--mitigation", draw(st.sampled_from(["notrack", "nodelocal"]))]
    for flag, good in _GOOD.items():
        # mostly values a user would give, so that plans get rendered; sometimes anything
        odd = draw(st.integers(0, 9)) == 0
        for value in draw(st.lists(_FLAG_TEXT if odd else st.sampled_from(good),
                                   min_size=flag != "--local-ip", max_size=2)):
            argv += [flag, value]
    return argv


@pytest.mark.root
def test_any_flag_values_give_a_one_line_error_or_rules_the_kernel_accepts(netns: str) -> None:
    """Flags are the other untrusted input: every value is refused in one line naming its
    flag, refused as a plan, or rendered into rules (and unbound.conf) that hold no injected
    line."""
    seen = {"refused": 0, "rules": 0}

    @given(flag_sets())
    @CASES
    def check(argv: list[str]) -> None:
        try:
            s = settings_from(build_parser().parse_args(argv), {})
        except ConfigError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("invalid --")
            seen["refused"] += 1
            return
        mode = ProxyMode(argv[2])
        facts = NodeFacts(mode, dns_ips=s.dns_ips, pod_cidrs=s.pod_cidrs,
                          families=frozenset({Family.V4, Family.V6}))
        try:
            p = plan(facts, s)
        except PlanRefused as exc:
            assert "\n" not in str(exc)
            seen["refused"] += 1
            return
        assert kernel_rejections(netns, p) == {}
        seen["rules"] += p.rule_count
        if p.cache is not None:
            conf = render_unbound(p.cache, s.state_dir)
            keys = {ln.split(":")[0].strip() for ln in conf.splitlines() if ln.strip()}
            assert "python-script" not in keys

    check()
    assert seen["refused"] > 0 and seen["rules"] > 0, seen
