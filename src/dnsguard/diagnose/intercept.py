"""Classifier: DNS is intercepted on this node, but nothing answers where it is sent.

A node-local cache (NodeLocal DNSCache, dnsguard's cache mode) takes pods' DNS by holding the
addresses they query on a local link (the DNS ClusterIP and/or 169.254.20.10) and usually by
NOTRACK rules for them, so the packets are delivered to the local cache instead of being
DNATed. If the cache dies and the addresses stay, queries are delivered to a local address
with no socket behind it: every lookup on the node fails, or waits for a fallback.

Evidence: the address is on a local link, no UDP socket in the node's namespace is bound to it
(or to the wildcard) on port 53, and the NOTRACK rules that steer DNS to it. The doctor's probe
of that address decides the severity: no answer is critical; an answer means a fallback (a
dead man's switch that stopped the NOTRACK, kube-proxy's DNAT taking over) still serves DNS,
which is a warning: the cache is down and the node runs without it.
"""

from __future__ import annotations

from dnsguard.diagnose.findings import Finding, Severity
from dnsguard.diagnose.rules import all_notrack_rules
from dnsguard.diagnose.samples import ProbeSample, RulesSample
from dnsguard.model import IPAddress

__all__ = ["classify_interception"]


def _listens(ip: IPAddress, listeners: frozenset[tuple[str, int]]) -> bool:
    wildcard = "0.0.0.0" if ip.version == 4 else "::"
    return (str(ip), 53) in listeners or (wildcard, 53) in listeners


def classify_interception(rules: RulesSample | None,
                          listeners: frozenset[tuple[str, int]] | None,
                          probes: tuple[ProbeSample, ...]) -> list[Finding]:
    if rules is None or listeners is None:
        return []
    evidence: list[str] = []
    severity: Severity | None = None
    notrack = all_notrack_rules(rules)
    for ip in dict.fromkeys((*rules.dns_ips, *rules.cache_ips)):
        link = rules.local_link(ip)
        if link is None or _listens(ip, listeners):
            continue
        probe = next((p for p in probes if p.server == ip), None)
        answered = probe is not None and probe.report is not None and probe.report.answered > 0
        evidence.append(f"{ip} is held by link {link}, but no UDP socket listens on {ip}:53")
        evidence += [f"steered there by {r.source}, {r.chain}: {r.text}" for r in notrack
                     if r.catches(ip, "udp")]
        if probe is not None and probe.report is not None:
            r = probe.report
            evidence.append(f"probe of {ip}: {r.answered} of {r.lookups} lookups answered")
        worst = Severity.WARNING if answered else Severity.CRITICAL
        severity = worst if severity is None or worst.rank > severity.rank else severity
    if severity is None:
        return []
    summary = ("DNS to this node's local cache address is intercepted, but no cache answers"
               if severity is Severity.CRITICAL else
               "the node-local cache is down; DNS is answered by a fallback, without the cache")
    return [Finding(
        "interception-without-cache", severity, summary, tuple(evidence),
        "start the cache again (dnsguard run --mitigation nodelocal, or the node-local-dns "
        "DaemonSet); if it is gone for good, remove its rules and addresses (dnsguard cleanup, "
        "or delete the link and its NOTRACK rules)",
    )]
