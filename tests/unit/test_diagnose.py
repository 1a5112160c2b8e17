"""Doctor's classifiers: each finding fires on its evidence, with its severity, and not otherwise.

Grouped by finding. Inputs are built as plain sample values; nothing here touches the node.
The last group runs the sampler against a fake /proc, a scripted runner, a fake clock and a
fake probe, to show that the window is measured, not slept, and deltas are what classifiers get.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from dnsguard.diagnose import EXIT_CRITICAL, EXIT_OK, EXIT_WARNING, classify, exit_code
from dnsguard.diagnose.conntrack import classify_conntrack
from dnsguard.diagnose.dns import classify_probes, classify_rcvbuf, classify_resolv
from dnsguard.diagnose.findings import FINDING_IDS, Finding, Severity, render_table, to_json
from dnsguard.diagnose.intercept import classify_interception
from dnsguard.diagnose.kernel import classify_kernel, parse_release
from dnsguard.diagnose.rules import (
    classify_notrack,
    discover_dns_ips,
    nft_notrack_rules,
    xt_notrack_rules,
)
from dnsguard.diagnose.sampler import Sampler, SamplerConfig
from dnsguard.diagnose.samples import (
    ConntrackWindow,
    DnsServerWindow,
    ProbeSample,
    ResolvSample,
    RulesSample,
    RuleText,
    Samples,
)
from dnsguard.model import ProxyMode
from dnsguard.node.conntrack import ConntrackStats
from dnsguard.node.procnet import DnsServer, ResolvConf, UdpCounters
from dnsguard.probe import ProbeConfig, ProbeReport, SlowLookup
from dnsguard.testing.fakes import FakeRunner

CLUSTER_DNS = ipaddress.ip_address("10.96.0.10")


def ids(findings: list[Finding]) -> dict[str, Severity]:
    return {f.id: f.severity for f in findings}


# --- conntrack counters -------------------------------------------------------------------

BASE = {"found": 0, "invalid": 0, "insert": 0, "insert_failed": 10, "drop": 5,
        "early_drop": 7, "error": 0, "clash_resolve": 3}


def window(after: dict[str, int] | None = None, *, entries: tuple[int, int] = (100, 100),
           limit: int | None = 262144, before: dict[str, int] | None = None,
           seconds: float = 5.0) -> ConntrackWindow:
    b = dict(BASE if before is None else before)
    a = {**b, **(after or {})}
    return ConntrackWindow(
        ConntrackStats("test", b, entries[0], limit, 65536),
        ConntrackStats("test", a, entries[1], limit, 65536), seconds)


def test_quiet_counters_with_big_lifetime_totals_say_nothing() -> None:
    assert classify_conntrack(window()) == []


@pytest.mark.parametrize(("entries", "severity"), [
    (196_607, None),                 # 74.99%
    (196_608, Severity.WARNING),     # 75%
    (235_930, Severity.CRITICAL),    # 90%
])
def test_table_full_by_fill_ratio(entries: int, severity: Severity | None) -> None:
    found = ids(classify_conntrack(window(entries=(entries, entries))))
    assert found.get("conntrack-table-full") is severity
    assert set(found) <= {"conntrack-table-full"}


def test_table_full_when_drop_rises_even_if_the_table_looks_roomy() -> None:
    found = ids(classify_conntrack(window({"drop": 6})))
    assert found == {"conntrack-table-full": Severity.CRITICAL}


def test_table_full_needs_a_limit() -> None:
    assert classify_conntrack(window(entries=(10**6, 10**6), limit=None)) == []


@pytest.mark.parametrize(("counter", "finding"), [
    ("early_drop", "conntrack-early-drop"),
    ("insert_failed", "conntrack-insert-failed"),
])
def test_lost_packet_counters_warn_then_go_critical_by_rate(counter: str, finding: str) -> None:
    slow = classify_conntrack(window({counter: BASE[counter] + 4}, seconds=5.0))  # 0.8/s
    fast = classify_conntrack(window({counter: BASE[counter] + 5}, seconds=5.0))  # 1/s
    assert ids(slow) == {finding: Severity.WARNING}
    assert ids(fast) == {finding: Severity.CRITICAL}
    assert any(f"{counter} +4 in 5.0s" in e for e in slow[0].evidence)


def test_clash_resolve_rising_is_info() -> None:
    found = classify_conntrack(window({"clash_resolve": 9}))
    assert ids(found) == {"conntrack-clash": Severity.INFO}


def test_counters_this_kernel_lacks_produce_no_finding() -> None:
    # 4.x: no clash_resolve; an old proc file without early_drop.
    before = {"insert_failed": 1}
    w = ConntrackWindow(ConntrackStats("t", before, 1, 100000), ConntrackStats(
        "t", {"insert_failed": 1}, 1, 100000), 5.0)
    assert w.delta("clash_resolve") is None and w.delta("early_drop") is None
    assert classify_conntrack(w) == []


def test_a_counter_going_backwards_is_not_a_delta() -> None:
    w = window({"insert_failed": 2})  # wrapped or reset: 10 -> 2
    assert w.delta("insert_failed") is None
    assert classify_conntrack(w) == []


# --- kernel version -----------------------------------------------------------------------

@pytest.mark.parametrize(("release", "severity", "missing"), [
    ("4.14.320-242.534.amzn2.x86_64", Severity.WARNING, 3),
    ("4.19.0-27-amd64", Severity.WARNING, 2),
    ("5.4.0-150-generic", Severity.WARNING, 1),
    ("5.6.0", Severity.INFO, 0),
    ("6.1.0-18-amd64", Severity.INFO, 0),
    ("6.18.44-fc-v595", Severity.INFO, 0),
])
def test_kernel_version_against_the_race_fixes(release: str, severity: Severity,
                                               missing: int) -> None:
    [f] = classify_kernel(release, has_clash_counter=not missing)
    assert f.id == "kernel-clash-fixes"
    assert f.severity is severity
    assert sum("missing" in e for e in f.evidence) == missing


def test_backported_clash_counter_downgrades_an_old_version_to_info() -> None:
    [f] = classify_kernel("4.18.0-513.el8.x86_64", has_clash_counter=True)
    assert f.severity is Severity.INFO and "backported" in f.summary


def test_unknown_kernel_says_nothing() -> None:
    assert classify_kernel(None, None) == []
    assert classify_kernel("custom-kernel", None) == []
    assert parse_release("5.10.0-28-cloud-amd64") == (5, 10)


# --- NOTRACK vs DNAT ----------------------------------------------------------------------

def raw_save(*rules: str, chains: tuple[str, ...] = ()) -> str:
    lines = ["# Generated by iptables-nft-save v1.8.9", "*raw",
             ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT"]
    return "\n".join(lines) + "\n"


def rules_sample(*dumps: RuleText, mode: ProxyMode | None = ProxyMode.IPTABLES,
                 dns: tuple[str, ...] = ("10.96.0.10",), nft: RuleText | None = None
                 ) -> RulesSample:
    return RulesSample(mode, "test", tuple(ipaddress.ip_address(i) for i in dns),
                       "--dns-ip" if dns else "", tuple(dumps), nft)


def v4(text: str, flavour: str = "nft") -> RuleText:
    return RuleText(f"iptables-{flavour} (ipv4)", 4, text)


NOTRACK_TO_DNS = ('-A PREROUTING -d 10.96.0.10/32 -p udp -m comment --comment "dns fix" '
                  "-m udp --dport 53 -j CT --notrack")


@pytest.mark.parametrize("mode", [ProxyMode.IPTABLES, ProxyMode.NFTABLES])
def test_notrack_to_the_cluster_ip_is_critical_where_kube_proxy_dnats(mode: ProxyMode) -> None:
    [f] = classify_notrack(rules_sample(v4(raw_save(NOTRACK_TO_DNS)), mode=mode))
    assert (f.id, f.severity) == ("notrack-breaks-dnat", Severity.CRITICAL)
    assert any("UDP 10.96.0.10:53" in e and '"dns fix"' in e for e in f.evidence)


def test_notrack_in_ipvs_mode_or_without_kube_proxy_is_fine() -> None:
    dump = v4(raw_save(NOTRACK_TO_DNS))
    assert classify_notrack(rules_sample(dump, mode=ProxyMode.IPVS)) == []
    assert classify_notrack(rules_sample(dump, mode=None)) == []


@pytest.mark.parametrize("rule", [
    "-A PREROUTING -d 10.96.0.11/32 -p udp -m udp --dport 53 -j CT --notrack",  # other IP
    "-A PREROUTING ! -d 10.96.0.10/32 -p udp -m udp --dport 53 -j NOTRACK",     # excluded
    "-A PREROUTING -d 10.96.0.10/32 -p udp -m udp --dport 5353 -j CT --notrack",
    "-A PREROUTING -d 10.96.0.10/32 -p icmp -j CT --notrack",
    "-A PREROUTING -d 10.96.0.10/32 -p udp -m udp ! --dport 53 -j CT --notrack",
    "-A PREROUTING -d 10.96.0.10/32 -p udp -m udp --dport 53 -j ACCEPT",         # not notrack
    "-A ORPHAN -d 10.96.0.10/32 -p udp -m udp --dport 53 -j CT --notrack",       # never reached
])
def test_rules_that_cannot_catch_dns_to_the_cluster_ip(rule: str) -> None:
    assert classify_notrack(rules_sample(v4(raw_save(rule, chains=("ORPHAN",))))) == []


@pytest.mark.parametrize("rule", [
    "-A PREROUTING -p udp -m udp --dport 53 -j NOTRACK",                          # any dst
    "-A PREROUTING -d 10.96.0.0/12 -p tcp -m tcp --dport 53 -j CT --notrack",     # range
    "-A OUTPUT -d 10.96.0.10/32 -p udp -m multiport --dports 53,5353 -j CT --notrack",
    "-A PREROUTING -d 10.96.0.10/32 -p udp -m udp --dport 50:60 -j CT --notrack",
    "-A PREROUTING -d 10.96.0.10/32 -j CT --notrack",                             # all protocols
    "-A MINE -d 10.96.0.10/32 -p udp -m udp --dport 53 -j CT --notrack",          # via a jump
])
def test_rules_that_catch_dns_to_the_cluster_ip(rule: str) -> None:
    dump = v4(raw_save("-A PREROUTING -j MINE", rule, chains=("MINE",)), flavour="legacy")
    [f] = classify_notrack(rules_sample(dump))
    assert f.severity is Severity.CRITICAL
    assert any(rule in e for e in f.evidence)


def test_ipv6_rules_only_match_ipv6_cluster_ips() -> None:
    rule = "-A PREROUTING -d fd00:10:96::a/128 -p udp -m udp --dport 53 -j CT --notrack"
    dump = RuleText("iptables-nft (ipv6)", 6, raw_save(rule))
    assert classify_notrack(rules_sample(dump)) == []
    assert classify_notrack(rules_sample(dump, dns=("fd00:10:96::a",)))


def test_without_a_known_cluster_ip_a_rule_for_any_destination_is_still_critical() -> None:
    anywhere = v4(raw_save("-A PREROUTING -p udp -m udp --dport 53 -j NOTRACK"))
    specific = v4(raw_save(NOTRACK_TO_DNS))
    excluded = v4(raw_save("-A PREROUTING ! -d 10.0.0.1/32 -p udp --dport 53 -j NOTRACK"))
    assert ids(classify_notrack(rules_sample(anywhere, dns=()))) == {
        "notrack-breaks-dnat": Severity.CRITICAL}
    assert classify_notrack(rules_sample(specific, dns=())) == []
    assert ids(classify_notrack(rules_sample(excluded, dns=()))) == {
        "notrack-breaks-dnat": Severity.WARNING}


NFT_RULESET = """\
table inet dnsguard {
	chain PREROUTING {
		type filter hook prerouting priority raw; policy accept;
		ip daddr 10.96.0.10 udp dport 53 counter packets 0 bytes 0 notrack comment "dnsguard: x"
	}
}
table ip late {
	chain pre {
		type filter hook prerouting priority filter; policy accept;
		udp dport 53 notrack
	}
}
table ip other {
	set dns {
		type ipv4_addr
		elements = { 10.96.0.10,
				10.96.0.11 }
	}
	chain out {
		type filter hook output priority -300; policy accept;
		jump sub
	}
	chain sub {
		ip daddr @dns meta l4proto { tcp, udp } th dport 53 notrack
		ip daddr { 10.1.0.1, 10.1.0.2 } udp dport 53 notrack
		ip daddr 10.96.0.10 tcp dport != 53 notrack
	}
}
table ip raw {
	chain PREROUTING {
		type filter hook prerouting priority raw; policy accept;
		udp dport 53 counter packets 0 bytes 0 notrack
	}
}
"""


def test_nft_notrack_rules_before_conntrack_only() -> None:
    rules = nft_notrack_rules(RuleText("nft list ruleset", None, NFT_RULESET))
    texts = [r.text for r in rules]
    # 'late' runs after conntrack (priority filter): a notrack there changes nothing;
    # 'ip raw' belongs to iptables-nft and is read from its dump.
    assert not any(r.source.endswith("table ip late") for r in rules)
    assert not any(r.source.endswith("table ip raw") for r in rules)
    assert len(texts) == 4
    catching = [r for r in rules if r.catches(CLUSTER_DNS, "udp")]
    assert [r.chain for r in catching] == ["chain PREROUTING", "chain sub"]  # @dns: opaque set
    assert not rules[2].catches(CLUSTER_DNS, "udp")  # { 10.1.0.1, 10.1.0.2 }
    assert not rules[3].catches(CLUSTER_DNS, "tcp")  # dport != 53


def test_nft_ruleset_finding_and_iptables_nft_tables_counted_once() -> None:
    nft = RuleText("nft list ruleset", None, NFT_RULESET)
    [f] = classify_notrack(rules_sample(mode=ProxyMode.NFTABLES, nft=nft))
    assert f.severity is Severity.CRITICAL
    assert sum("table ip raw" in e for e in f.evidence) == 1  # no iptables-nft dump: read here
    with_dump = classify_notrack(rules_sample(v4(raw_save()), mode=ProxyMode.NFTABLES, nft=nft))
    assert not any("table ip raw" in e for e in with_dump[0].evidence)


def test_xt_rules_unparsable_values_still_count_as_matching() -> None:
    rules = xt_notrack_rules(v4(raw_save("-A PREROUTING -d not-an-ip -j CT --notrack")))
    assert len(rules) == 1 and rules[0].catches(CLUSTER_DNS, "udp")


KUBE_NAT = """\
*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp cluster IP" -m tcp --dport 53 -j KUBE-SVC-ERIFXISQEP7F7OF4
COMMIT
"""

KUBE_NFT = """\
table ip6 kube-proxy {
	map service-ips {
		type ipv6_addr . inet_proto . inet_service : verdict
		elements = { fd00:10:96::a . tcp . 53 : goto service-NWBZK7IH-kube-system/kube-dns/tcp/dns-tcp,
				fd00:10:96::a . udp . 53 : goto service-FY5PMXPG-kube-system/kube-dns/udp/dns,
				fd00:10:96::1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https }
	}
}
"""


def test_dns_cluster_ips_discovered_from_kube_proxy_rules() -> None:
    found = discover_dns_ips([v4(KUBE_NAT)], RuleText("nft list ruleset", None, KUBE_NFT))
    assert [str(i) for i in found] == ["10.96.0.10", "fd00:10:96::a"]
    assert discover_dns_ips([v4(raw_save())], None) == ()


# --- node-local cache interception -------------------------------------------------------

# What a node-local cache in iptables mode looks like (dnsguard's cache mode; NodeLocal
# DNSCache is the same without the xt_recent switch): both addresses on a local link and
# NOTRACK for DNS to them, so the packets are delivered locally instead of DNATed.
NODELOCAL_RAW = raw_save(
    '-A PREROUTING -m comment --comment "dnsguard: hook DNSGUARD-PREROUTING" '
    "-j DNSGUARD-PREROUTING",
    *(f'-A DNSGUARD-PREROUTING -d {ip}/32 -p udp -m comment --comment "dnsguard: udp DNS to '
      f'{ip} goes to the node-local cache" -m udp --dport 53 -m recent --rcheck --seconds 2 '
      "--name dnsguard-alive4 --mask 255.255.255.255 --rdest -j CT --notrack"
      for ip in ("169.254.20.10", "10.96.0.10")),
    chains=("DNSGUARD-PREROUTING",))
LOCAL = ((ipaddress.ip_address("169.254.20.10"), "dnsguard0"), (CLUSTER_DNS, "dnsguard0"))
CACHE_LISTENING = frozenset({("169.254.20.10", 53), ("10.96.0.10", 53), ("127.0.0.1", 5353)})


def cache_node(local: tuple[tuple[object, str], ...] = LOCAL) -> RulesSample:
    s = rules_sample(v4(NODELOCAL_RAW))
    return RulesSample(**{**s.__dict__, "local_addresses": local})


def probed(ip: str, answered: bool) -> ProbeSample:
    return ProbeSample(f"cluster DNS {ip}", report(10, timeouts=0 if answered else 10),
                       server=ipaddress.ip_address(ip))


def test_notrack_to_a_cluster_ip_the_node_serves_itself_is_not_broken_dnat() -> None:
    assert classify_notrack(cache_node()) == []
    # ...while the same rules without the local addresses would break DNS.
    assert ids(classify_notrack(cache_node(local=()))) == {
        "notrack-breaks-dnat": Severity.CRITICAL}


def test_a_running_cache_is_not_a_finding() -> None:
    assert classify_interception(cache_node(), CACHE_LISTENING, ()) == []
    assert classify_interception(cache_node(), frozenset({("0.0.0.0", 53)}), ()) == []


def test_interception_with_nothing_listening_is_critical() -> None:
    [f] = classify_interception(cache_node(), frozenset({("127.0.0.1", 5353)}),
                                (probed("10.96.0.10", answered=False),))
    assert (f.id, f.severity) == ("interception-without-cache", Severity.CRITICAL)
    assert any("10.96.0.10 is held by link dnsguard0" in e for e in f.evidence)
    assert any("dnsguard-alive4" in e for e in f.evidence)  # the rule steering it there
    assert any("0 of 10 lookups answered" in e for e in f.evidence)


def test_interception_with_a_working_fallback_is_a_warning() -> None:
    only_link_local = ((ipaddress.ip_address("169.254.20.10"), "dnsguard0"),)
    node = cache_node(local=only_link_local)
    probe = (ProbeSample("node-local cache 169.254.20.10", report(10),
                         server=ipaddress.ip_address("169.254.20.10")),)
    [f] = classify_interception(node, frozenset(), probe)
    assert f.severity is Severity.WARNING


def test_a_cache_on_another_local_ip_is_checked_too() -> None:
    other = ipaddress.ip_address("198.18.9.53")
    node = RulesSample(**{**cache_node(local=((other, "dnsguard0"),)).__dict__,
                          "cache_ips": (other,)})
    [f] = classify_interception(node, CACHE_LISTENING, ())
    assert f.severity is Severity.CRITICAL and "198.18.9.53 is held" in f.evidence[0]


def test_no_local_address_no_interception() -> None:
    assert classify_interception(cache_node(local=()), frozenset(), ()) == []
    assert classify_interception(cache_node(), None, ()) == []  # listeners unreadable


# --- DNS servers, probes, resolv.conf -----------------------------------------------------

SERVER = DnsServer("net:[4026532001]", (4242,), ("coredns",))


def udp(rcvbuf: int, datagrams: int = 1000, drops: int | None = 0) -> UdpCounters:
    return UdpCounters(rcvbuf, rcvbuf, datagrams, drops)


@pytest.mark.parametrize(("delta", "severity"), [
    (0, None), (4, Severity.WARNING), (5, Severity.CRITICAL)])
def test_rcvbuf_errors_rising_in_a_dns_server_namespace(delta: int,
                                                        severity: Severity | None) -> None:
    w = DnsServerWindow(SERVER, udp(100), udp(100 + delta, 5000, delta), 5.0)
    found = classify_rcvbuf((w,))
    assert ids(found).get("dns-server-rcvbuf-overflow") is severity
    if severity:
        assert "coredns (pid 4242" in found[0].evidence[0]
        assert f"RcvbufErrors +{delta}" in found[0].evidence[0]


def report(lookups: int, *, slow: int = 0, timeouts: int = 0, errors: int = 0) -> ProbeReport:
    return ProbeReport(
        target="10.96.0.10:53", via="wire", concurrency=4, elapsed=5.0, lookups=lookups,
        queries=2 * lookups, timeout=5.0,
        percentiles={"p50": 0.001, "p90": 0.002, "p99": None if timeouts else 0.003,
                     "p99.9": None if timeouts else 0.004},
        max=None if timeouts else 1.5, at_least_1s=slow + timeouts, at_least_5s=timeouts,
        timeouts=timeouts, errors={"refused": errors} if errors else {},
        rcodes={"NOERROR": 2 * (lookups - timeouts - errors)},
        slow=tuple(SlowLookup(1.0, None, "x", "timeout") for _ in range(timeouts)),
        slow_count=slow + timeouts)


def test_probe_all_good_says_nothing() -> None:
    assert classify_probes((ProbeSample("cluster DNS 10.96.0.10", report(100)),)) == []


@pytest.mark.parametrize(("slow", "timeouts", "severity"), [
    (1, 0, Severity.WARNING), (0, 4, Severity.WARNING), (3, 2, Severity.CRITICAL)])
def test_slow_or_timed_out_lookups(slow: int, timeouts: int, severity: Severity) -> None:
    found = classify_probes((ProbeSample("cluster DNS 10.96.0.10",
                                         report(100, slow=slow, timeouts=timeouts)),))
    assert ids(found) == {"dns-slow-lookups": severity}
    assert f"{slow + timeouts} of 100 lookups slow or failed" in found[0].evidence[0]


def test_some_failed_lookups_count_as_slow() -> None:
    r = report(100, errors=3)
    r = ProbeReport(**{**r.__dict__, "slow_count": 3})
    found = classify_probes((ProbeSample("cluster DNS 10.96.0.10", r),))
    assert ids(found) == {"dns-slow-lookups": Severity.WARNING}  # 3% < 5%
    assert "failed 3 (refused 3)" in found[0].evidence[0]


def test_nothing_answered_or_probe_failed_is_unreachable() -> None:
    dead = ProbeSample("cluster DNS 10.96.0.10", report(20, timeouts=20))
    refused = ProbeSample("node-local cache 169.254.20.10", report(20, errors=20))
    broken = ProbeSample("cluster DNS fd00::a", None, "Network is unreachable")
    found = classify_probes((dead, refused, broken))
    assert ids(found) == {"dns-unreachable": Severity.CRITICAL}
    assert len(found[0].evidence) == 3


@pytest.mark.parametrize(("conf", "expected"), [
    (ResolvConf(search=("default.svc.cluster.local", "svc.cluster.local", "cluster.local"),
                ndots=5), (Severity.WARNING, 4)),
    (ResolvConf(search=("corp.example",), ndots=2), (Severity.INFO, 2)),
    (ResolvConf(search=("a", "b", "c"), ndots=1), None),  # tried as is first: found at once
    (ResolvConf(search=(), ndots=5), None),
])
def test_search_amplification(conf: ResolvConf, expected: tuple[Severity, int] | None) -> None:
    found = classify_resolv(ResolvSample("/etc/resolv.conf", conf))
    if expected is None:
        assert found == []
        return
    [f] = found
    assert (f.id, f.severity) == ("resolv-search-amplification", expected[0])
    assert f"tried {expected[1]} times" in f.summary


# --- presentation and exit codes ----------------------------------------------------------

def test_exit_codes_follow_the_worst_severity_and_never_use_2() -> None:
    info = Finding("conntrack-clash", Severity.INFO, "s", (), "f")
    warn = Finding("conntrack-early-drop", Severity.WARNING, "s", (), "f")
    crit = Finding("notrack-breaks-dnat", Severity.CRITICAL, "s", (), "f")
    assert exit_code([]) == exit_code([info]) == EXIT_OK == 0
    assert exit_code([info, warn]) == EXIT_WARNING == 3
    assert exit_code([warn, crit, info]) == EXIT_CRITICAL == 4


def test_unknown_ids_are_refused_and_ids_are_the_documented_set() -> None:
    with pytest.raises(ValueError):
        Finding("dns-is-slow", Severity.INFO, "s", (), "f")
    assert len(FINDING_IDS) == 15


def test_table_and_json_list_worst_first() -> None:
    info = Finding("conntrack-clash", Severity.INFO, "race rescued", ("clash_resolve +1",), "no")
    crit = Finding("notrack-breaks-dnat", Severity.CRITICAL, "broken", ("-A PREROUTING",), "fix")
    table = render_table([info, crit])
    assert table.index("CRITICAL  notrack-breaks-dnat") < table.index("INFO      conntrack-clash")
    assert "- clash_resolve +1" in table and "fix: fix" in table
    doc = json.loads(json.dumps(to_json([info, crit], window_seconds=5)))
    assert [f["id"] for f in doc["findings"]] == ["notrack-breaks-dnat", "conntrack-clash"]
    assert doc["exit_code"] == 4 and doc["window_seconds"] == 5


def test_classify_combines_and_missing_samples_give_nothing() -> None:
    assert classify(Samples(window=5.0)) == []
    no_clash_counter = {k: v for k, v in BASE.items() if k != "clash_resolve"}
    found = classify(Samples(window=5.0, kernel_release="5.4.0", conntrack=window(
        {"insert_failed": 20}, before=no_clash_counter),
        rules=rules_sample(v4(raw_save(NOTRACK_TO_DNS)))))
    assert ids(found) == {"notrack-breaks-dnat": Severity.CRITICAL,
                          "conntrack-insert-failed": Severity.CRITICAL,
                          "kernel-clash-fixes": Severity.WARNING}


# --- the sampler (edge I/O, faked) --------------------------------------------------------

PROC_STAT = ("entries  clashres found new invalid ignore delete chainlength insert insert_failed "
             "drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n"
             "{n:08x}  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 "
             "{f:08x} 00000000 00000000 00000000  00000000 00000000 00000000 00000000\n")
SNMP = ("Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n"
        "Udp: {d} 0 {e} {d} {e} 0 0\n")


class FakeNode:
    """A /proc tree whose counters move when the sampler 'sleeps'."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sys/kernel").mkdir(parents=True)
        (root / "sys/kernel/osrelease").write_text("6.1.0-18-amd64\n")
        (root / "sys/net/netfilter").mkdir(parents=True)
        (root / "sys/net/netfilter/nf_conntrack_max").write_text("1000\n")
        (root / "net/stat").mkdir(parents=True)
        pid = root / "4242"
        (pid / "net").mkdir(parents=True)
        (pid / "ns").mkdir()
        (pid / "comm").write_text("dnsmasq\n")
        (pid / "ns/net").symlink_to("net:[4026532999]")
        (root / "77").mkdir()
        (root / "77/comm").write_text("bash\n")
        self.set(entries=100, insert_failed=0, rcvbuf=0, datagrams=0)
        self.slept: list[float] = []
        self.now = 1000.0

    def set(self, *, entries: int, insert_failed: int, rcvbuf: int, datagrams: int) -> None:
        (self.root / "net/stat/nf_conntrack").write_text(
            PROC_STAT.format(n=entries, f=insert_failed))
        (self.root / "sys/net/netfilter/nf_conntrack_count").write_text(f"{entries}\n")
        (self.root / "4242/net/snmp").write_text(SNMP.format(d=datagrams, e=rcvbuf))

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        self.set(entries=950, insert_failed=12, rcvbuf=40, datagrams=900)


def test_sampler_measures_a_window_without_sleeping_and_feeds_deltas(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    runner = FakeRunner()
    runner.add(["iptables-nft-save"], KUBE_NAT + raw_save(NOTRACK_TO_DNS))
    probed: list[ProbeConfig] = []

    def prober(cfg: ProbeConfig) -> ProbeReport:
        probed.append(cfg)
        return report(50)

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.96.0.10\nsearch a.svc.cluster.local svc.cluster.local "
                      "cluster.local\noptions ndots:5\n")
    sampler = Sampler(runner, tmp_path, clock=node.clock, sleep=node.sleep, prober=prober)
    samples = sampler.sample(SamplerConfig(window=2.0, proxy_mode=ProxyMode.IPTABLES,
                                           resolv_conf=resolv))
    assert node.slept == [2.0]
    assert samples.window == 2.0
    assert samples.kernel_release == "6.1.0-18-amd64"
    assert samples.rules is not None and [str(i) for i in samples.rules.dns_ips] == ["10.96.0.10"]
    assert [str(c.server) for c in probed] == ["10.96.0.10"]
    assert probed[0].duration == 2.0 and probed[0].rate
    [server] = samples.dns_servers
    assert server.server.comms == ("dnsmasq",) and server.rcvbuf_errors == 40

    found = ids(classify(samples))
    assert found == {
        "notrack-breaks-dnat": Severity.CRITICAL,
        "conntrack-table-full": Severity.CRITICAL,       # 950 of 1000
        "conntrack-insert-failed": Severity.CRITICAL,    # 12 in 2 s
        "dns-server-rcvbuf-overflow": Severity.CRITICAL,  # 40 in 2 s
        "resolv-search-amplification": Severity.WARNING,
        "kernel-clash-fixes": Severity.INFO,
    }


def test_sampler_without_anything_to_read_still_answers(tmp_path: Path) -> None:
    node_clock = iter(float(i) for i in range(100))
    samples = Sampler(FakeRunner(), tmp_path / "empty", clock=lambda: next(node_clock),
                      sleep=lambda s: None, prober=lambda c: report(1)).sample(
        SamplerConfig(window=1.0, resolv_conf=None))
    assert classify(samples) == []
    assert any("conntrack statistics unavailable" in n for n in samples.notes)
    assert any("no DNS address to probe" in n for n in samples.notes)
