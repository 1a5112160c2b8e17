"""Classifiers over a conntrack counter window: table full, early drop, insert failed, clash.

Pure functions of a `ConntrackWindow`. A counter this kernel does not maintain has no delta
(`ConntrackWindow.delta` is None) and never yields a finding; a counter that did not move yields
none either: a lifetime total says nothing about *now*.

Severity: any movement of a counter that costs a lookup (insert_failed, early_drop, drop) is a
warning, because each one is a client waiting for its resolver's retry (5 s by default); from
`CRITICAL_RATE` per second on, it is critical (a lookup stalls every second or more).
``clash_resolve`` is info: the race happened and the kernel rescued the packet.
"""

from __future__ import annotations

from dnsguard.diagnose.findings import Finding, Severity
from dnsguard.diagnose.samples import ConntrackWindow

__all__ = ["CRITICAL_RATE", "FULL_CRITICAL", "FULL_WARNING", "classify_conntrack"]

#: Lost packets per second from which a counter finding is critical.
CRITICAL_RATE = 1.0
#: Fill ratios of the table (entries / nf_conntrack_max).
FULL_WARNING, FULL_CRITICAL = 0.75, 0.90


def _moved(w: ConntrackWindow, name: str) -> str:
    d = w.delta(name) or 0
    return f"{name} +{d} in {w.seconds:.1f}s ({d / w.seconds if w.seconds > 0 else 0:.2f}/s)"


def _severity(w: ConntrackWindow, name: str) -> Severity:
    rate = w.rate(name) or 0.0
    return Severity.CRITICAL if rate >= CRITICAL_RATE else Severity.WARNING


def table_full(w: ConntrackWindow) -> list[Finding]:
    after = w.after
    evidence: list[str] = []
    severity: Severity | None = None
    if after.entries is not None and after.max:
        ratio = after.entries / after.max
        if ratio >= FULL_WARNING:
            severity = Severity.CRITICAL if ratio >= FULL_CRITICAL else Severity.WARNING
            evidence.append(f"entries {after.entries} of nf_conntrack_max {after.max} "
                            f"({ratio:.0%}; {w.before.entries} at the start of the window)")
    if (w.delta("drop") or 0) > 0:
        severity = Severity.CRITICAL
        evidence.append(_moved(w, "drop") + ": new connections found no room, even after "
                        "early drop, and their packets were dropped")
    if severity is None:
        return []
    if after.buckets:
        evidence.append(f"nf_conntrack_buckets {after.buckets}")
    evidence.append(f"source: {after.source}")
    return [Finding(
        "conntrack-table-full", severity,
        "the conntrack table is (nearly) full: new DNS lookups lose their packets",
        tuple(evidence),
        "raise net.netfilter.nf_conntrack_max (and nf_conntrack_buckets to max/4); cut the "
        "entries DNS makes: a node-local DNS cache (one entry per upstream connection instead "
        "of one per lookup), NOTRACK in IPVS mode, or a shorter nf_conntrack_udp_timeout",
    )]


def early_drop(w: ConntrackWindow) -> list[Finding]:
    if (w.delta("early_drop") or 0) <= 0:
        return []
    return [Finding(
        "conntrack-early-drop", _severity(w, "early_drop"),
        "conntrack evicts entries to make room: in-flight DNS lookups lose their reverse NAT",
        (_moved(w, "early_drop"),
         "an evicted UDP entry of a lookup still waiting for its reply: the reply is not "
         "un-DNATed, the pod gets port-unreachable or nothing, and waits for its retry (5 s)",
         f"entries {w.after.entries} of nf_conntrack_max {w.after.max}",
         f"source: {w.after.source}"),
        "raise net.netfilter.nf_conntrack_max; keep DNS out of the table (node-local cache, "
        "or NOTRACK in IPVS mode); find what else fills it (conntrack -L | sort | uniq -c)",
    )]


def insert_failed(w: ConntrackWindow) -> list[Finding]:
    if (w.delta("insert_failed") or 0) <= 0:
        return []
    return [Finding(
        "conntrack-insert-failed", _severity(w, "insert_failed"),
        "conntrack drops packets that lose the insert race (the classic 5-second DNS stall)",
        (_moved(w, "insert_failed"),
         "the A and AAAA queries of one lookup leave one socket back to back; when both "
         "reach conntrack's confirm step at once and the clash cannot be resolved, one is "
         "dropped and the resolver waits for its retry",
         f"source: {w.after.source}"),
        "upgrade to a kernel with the clash fixes (see kernel-clash-fixes); meanwhile: a "
        "node-local DNS cache, 'options single-request-reopen' (glibc) in pods' dnsConfig, "
        "or NOTRACK for DNS in IPVS mode",
    )]


def clash(w: ConntrackWindow) -> list[Finding]:
    if (w.delta("clash_resolve") or 0) <= 0:
        return []
    return [Finding(
        "conntrack-clash", Severity.INFO,
        "the DNS insert race happens here, and this kernel resolves it (no packet lost)",
        (_moved(w, "clash_resolve"), f"source: {w.after.source}"),
        "nothing to do; it shows the race dnsguard guards against is real on this node",
    )]


def classify_conntrack(w: ConntrackWindow | None) -> list[Finding]:
    if w is None:
        return []
    return [*table_full(w), *early_drop(w), *insert_failed(w), *clash(w)]
