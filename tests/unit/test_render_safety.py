"""Renderers refuse what the kernel would refuse and never emit a value they did not check
(issue 13: comment limits, zone IDs, control characters; a bad Service skipped alone)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dnsguard.cli import render_plan
from dnsguard.config import Settings
from dnsguard.kube.extract import node_pod_cidrs, service_external
from dnsguard.metrics import Metrics, SkipReport
from dnsguard.model import (
    Backend,
    ExternalService,
    Family,
    Match,
    Mitigation,
    NodeFacts,
    Proto,
    ProxyMode,
    Rule,
    ServicePort,
    Verdict,
)
from dnsguard.plan import plan
from dnsguard.plan.cache import CacheSpec, render_unbound
from dnsguard.plan.checks import (
    NFT_COMMENT_MAX,
    UnsafeValue,
    check_addr,
    fit_comment,
    short_label,
)
from dnsguard.plan.external import Skipped
from dnsguard.plan.render import (
    format_iptables_line,
    iptables_rule,
    nft_rule,
    parse_iptables_line,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network
DUAL = frozenset({Family.V4, Family.V6})
CIDRS = (net("198.18.0.0/24"), net("fd00:198:18:ffff::/64"))
ONLY_EXT = Settings(mitigation=Mitigation.NONE, external_to_cluster=True)
LONG = "observability/kube-prometheus-stack-alertmanager-external-lb"


def svc(key: str, *, ext: tuple[str, ...] = ("198.19.5.1",), port: int = 9093,
        cluster: tuple[str, ...] = ("198.18.1.20",)) -> ExternalService:
    return ExternalService(key, tuple(ip(a) for a in cluster), (ServicePort(Proto.TCP, port),),
                           tuple(ip(a) for a in ext))


def facts(*svcs: ExternalService) -> NodeFacts:
    return NodeFacts(ProxyMode.IPVS, pod_cidrs=CIDRS, families=DUAL, external_services=svcs)


def nft_comments(text: str) -> list[str]:
    """Each rule's comment, prefixed with its chain's name."""
    out, chain = [], ""
    for ln in text.splitlines():
        if ln.strip().startswith("chain "):
            chain = ln.split()[1]
        elif ' comment "' in ln:
            out.append(chain + ": " + ln.rsplit(' comment "', 1)[1][:-1])
    return out


def test_the_reported_service_renders_every_nft_comment_within_128_bytes() -> None:
    """The issue's reproduction: this name made every node's ``nft -f`` fail."""
    p = plan(facts(svc(LONG, ext=("198.19.5.1", "fd00:198:18:5:ffff:ffff:ffff:ffff"),
                       cluster=("198.18.1.20", "fd00:198:18:1::14"))), ONLY_EXT)
    comments = nft_comments(render_plan(p, Backend.NFTABLES))
    assert comments and max(len(c.split(": ", 1)[1]) for c in comments) <= NFT_COMMENT_MAX
    assert len(set(comments)) == len(comments)  # in a chain, every rule's comment differs
    assert any("observability/kube-prometheus-stack" in c for c in comments)  # readable


def test_long_comments_are_cut_deterministically_and_stay_unique() -> None:
    a, b = "x" * 200 + "a", "x" * 200 + "b"
    assert fit_comment(a, 128) == fit_comment(a, 128)
    assert fit_comment(a, 128) != fit_comment(b, 128)
    assert len(fit_comment(a, 128)) == 128 and fit_comment("short", 128) == "short"
    assert len(short_label("n" * 63 + "/" + "m" * 63)) == 48
    assert short_label("ns/na\nme") != short_label("ns/na\tme")
    assert "\n" not in short_label("ns/na\nme")


@pytest.mark.parametrize("comment", ['say "hi"', "new\nline", "tab\there", "it's", "back\\slash",
                                     "nul\x00", "clustér"])
def test_comments_with_quotes_control_or_non_ascii_characters_are_refused(comment: str) -> None:
    rule = Rule(Match(proto=Proto.UDP), Verdict.ACCEPT, comment)
    with pytest.raises(UnsafeValue):
        nft_rule(Family.V4, rule)
    with pytest.raises(UnsafeValue):
        iptables_rule("X", rule, Family.V4)


def test_iptables_comments_fit_the_kernel_field_so_the_diff_stays_stable() -> None:
    """iptables silently cuts a comment to 255 bytes: a longer one would drift forever."""
    tokens = iptables_rule("X", Rule(Match(), Verdict.ACCEPT, "c" * 300), Family.V4)
    assert len(tokens[tokens.index("--comment") + 1]) == 255


def test_zone_ids_and_wrong_families_never_reach_rule_text() -> None:
    """``ipaddress`` keeps ``fd00::1%<newline>...``; the issue injected a line with it."""
    zoned = ipaddress.ip_network("fd00::1%\npython-script:")  # a /128 with a zone ID
    for rule in (Rule(Match(dst=zoned), Verdict.ACCEPT, "c"),
                 Rule(Match(), Verdict.DNAT, "c", to=(ip("fd00::1%eth0"), 53)),
                 Rule(Match(dst=net("198.18.0.1/32")), Verdict.ACCEPT, "c"),
                 Rule(Match(proto=Proto.UDP, dport=0), Verdict.ACCEPT, "c"),
                 Rule(Match(), Verdict.DNAT, "c", to=(ip("fd00::1"), 65536))):
        with pytest.raises(UnsafeValue):
            nft_rule(Family.V6, rule)
        with pytest.raises(UnsafeValue):
            iptables_rule("X", rule, Family.V6)
    with pytest.raises(UnsafeValue):
        check_addr(ip("fd00::1%eth0"))


def test_restore_lines_refuse_control_characters_and_escape_quotes() -> None:
    with pytest.raises(UnsafeValue):
        format_iptables_line(("-A", "X", "--comment", "a\n-F"))
    tokens = ("-A", "X", "--comment", 'a "b" \\c')
    assert parse_iptables_line(format_iptables_line(tokens)) == tokens


def test_a_service_with_unsafe_values_is_skipped_alone() -> None:
    good = svc("shop/web")
    zoned = svc("shop/zoned", ext=("fd00:198:18:5::1%eth0\npython-script: x",))
    port0 = svc("shop/port0", port=0)
    p = plan(facts(zoned, good, port0), ONLY_EXT)
    assert {(s.key, s.reason) for s in p.skipped} == {("shop/zoned", "invalid"),
                                                       ("shop/port0", "invalid")}
    text = render_plan(p, Backend.NFTABLES) + render_plan(p, Backend.IPTABLES_NFT)
    assert "shop/web" in text and "shop/zoned" not in text and "shop/port0" not in text
    assert p.rulesets == plan(facts(good), ONLY_EXT).rulesets


def test_a_skipped_service_is_logged_and_counted_once(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics(CollectorRegistry())
    report = SkipReport(m.services_skipped)
    assert m.registry.get_sample_value("dnsguard_services_skipped_total",
                                       {"reason": "invalid"}) == 0.0  # created at zero
    s = Skipped("shop/zoned", "invalid", "address with a zone ID")
    with caplog.at_level(logging.WARNING, logger="dnsguard.metrics"):
        report([s])
        report([s])  # the next replan: nothing new
        report([])
        report([s])  # back again: reported again
    assert [r.getMessage().count("shop/zoned") for r in caplog.records] == [1, 1]
    assert m.registry.get_sample_value("dnsguard_services_skipped_total",
                                       {"reason": "invalid"}) == 2.0


def test_a_zone_id_never_reaches_unbound_conf() -> None:
    """The issue's injection: ``fd00::1%<newline>python-script: ...`` as an upstream."""
    zoned = ip("fd00::1%\npython-script: x.py")
    spec = CacheSpec(listen=(ip("169.254.20.10"),), health_port=53053,
                     cluster_domain="cluster.local", cluster_upstreams=((zoned, 53),),
                     external_upstreams=(), ipv6=True)
    with pytest.raises(UnsafeValue):
        render_unbound(spec, Path("/run/dnsguard"))
    ok = CacheSpec(listen=spec.listen, health_port=53053, cluster_domain="cluster.local",
                   cluster_upstreams=((ip("fd00::1"), 53),), external_upstreams=(), ipv6=True)
    assert "forward-addr: fd00::1@53" in render_unbound(ok, Path("/run/dnsguard"))


def test_an_api_address_with_a_zone_id_is_ignored() -> None:

    obj = {"metadata": {"namespace": "a", "name": "b"},
           "spec": {"clusterIPs": ["198.18.1.1"], "ports": [{"port": 80}],
                    "externalIPs": ["fd00::1%\npython-script: x", "198.19.0.1"]}}
    got = service_external(obj)
    assert got is not None and got.external_ips == (ip("198.19.0.1"),)


def test_a_node_pod_cidr_with_a_zone_id_or_of_every_address_is_ignored() -> None:

    obj = {"metadata": {"name": "n1"},
           "spec": {"podCIDRs": ["fd00:198:18::%\nx/64", "0.0.0.0/0", "198.18.0.0/24"]}}
    assert node_pod_cidrs(obj) == (net("198.18.0.0/24"),)
