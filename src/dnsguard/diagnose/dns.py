"""Classifiers about DNS itself: server buffers, the built-in probe, resolv.conf expansion.

* ``dns-server-rcvbuf-overflow``: ``RcvbufErrors`` rose in the namespace of a DNS server
  process. The kernel dropped queries the server never saw; each is a client waiting for its
  retry. Same severity rule as the conntrack counters: warning on any, critical from
  `CRITICAL_RATE` per second.
* ``dns-unreachable`` / ``dns-slow-lookups``: from the doctor's short probe. Unreachable is
  "not one lookup answered" (critical). Slow is "some lookups took 1 s or more, got no answer
  within the probe's timeout, or failed (a refused send, port unreachable)": each of those is a
  client waiting for a retry. Critical from `SLOW_CRITICAL_SHARE` of them, else a warning.
* ``resolv-search-amplification``: with ``ndots`` above the dots of an ordinary external name
  (``example.com`` has one) every such lookup walks the whole search list first: the factor is
  the number of names tried, each one an A and an AAAA query and one conntrack entry.
  Kubernetes' default (ndots:5, three cluster domains) gives 4, which is a warning.
"""

from __future__ import annotations

from dnsguard.diagnose.conntrack import CRITICAL_RATE
from dnsguard.diagnose.findings import Finding, Severity
from dnsguard.diagnose.samples import DnsServerWindow, ProbeSample, ResolvSample

__all__ = [
    "AMPLIFICATION_WARNING",
    "EXTERNAL_NAME",
    "SLOW_CRITICAL_SHARE",
    "classify_probes",
    "classify_rcvbuf",
    "classify_resolv",
]

SLOW_CRITICAL_SHARE = 0.05
AMPLIFICATION_WARNING = 4
#: The shape of name used to show the expansion (one dot, like most external names).
EXTERNAL_NAME = "example.com"


def classify_rcvbuf(servers: tuple[DnsServerWindow, ...]) -> list[Finding]:
    overflowing = [w for w in servers if w.rcvbuf_errors > 0]
    if not overflowing:
        return []
    evidence = []
    worst = 0.0
    for w in overflowing:
        rate = w.rcvbuf_errors / w.seconds if w.seconds > 0 else 0.0
        worst = max(worst, rate)
        drops = w.socket_drops
        evidence.append(
            f"{w.server.label}: UDP RcvbufErrors +{w.rcvbuf_errors} in {w.seconds:.1f}s "
            f"({rate:.1f}/s), InDatagrams +{w.in_datagrams}"
            + ("" if drops is None else f", port-53 socket drops +{drops}"))
    return [Finding(
        "dns-server-rcvbuf-overflow",
        Severity.CRITICAL if worst >= CRITICAL_RATE else Severity.WARNING,
        "a DNS server's receive buffer overflows: the kernel drops queries it never sees",
        tuple(evidence),
        "give the DNS server more CPU (check throttling) or more replicas, or put a node-local "
        "cache in front; raise its socket buffer (net.core.rmem_default/rmem_max in its "
        "namespace's view, or the server's own buffer setting)",
    )]


def classify_probes(probes: tuple[ProbeSample, ...]) -> list[Finding]:
    out: list[Finding] = []
    dead: list[str] = []
    slow: list[str] = []
    critical_slow = False
    for p in probes:
        r = p.report
        if r is None:
            dead.append(f"{p.target}: probe could not run: {p.error}")
            continue
        if r.lookups == 0:
            continue
        if r.answered == 0:
            errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "none"
            dead.append(f"{p.target}: 0 of {r.lookups} lookups answered "
                        f"(timeouts {r.timeouts} after {r.timeout:g}s, errors: {errors})")
            continue
        failed = sum(r.errors.values())
        # slow_count covers timeouts and failures too (they are listed with their offsets).
        n_slow = r.slow_count
        if n_slow:
            share = n_slow / r.lookups
            critical_slow = critical_slow or share >= SLOW_CRITICAL_SHARE
            when = ", ".join(f"{s.offset:.1f}s" for s in r.slow[:10])
            pcts = "  ".join(f"{k} {'unanswered' if v is None else f'{v * 1000:.1f}ms'}"
                             for k, v in r.percentiles.items())
            errors = ", ".join(f"{k} {v}" for k, v in r.errors.items())
            slow.append(f"{p.target}: {n_slow} of {r.lookups} lookups slow or failed "
                        f"({share:.1%}): >=1s {r.at_least_1s}, timeouts {r.timeouts} after "
                        f"{r.timeout:g}s, failed {failed}{f' ({errors})' if errors else ''}; "
                        f"{pcts}; at {when}")
    if dead:
        out.append(Finding(
            "dns-unreachable", Severity.CRITICAL,
            "cluster DNS does not answer from this node",
            tuple(dead),
            "check the DNS Service and its endpoints (kubectl -n kube-system get endpoints "
            "kube-dns), kube-proxy's rules for the ClusterIP, NOTRACK rules "
            "(notrack-breaks-dnat) and network policies on port 53",
        ))
    if slow:
        out.append(Finding(
            "dns-slow-lookups", Severity.CRITICAL if critical_slow else Severity.WARNING,
            "some DNS lookups from this node take a second or more, time out or fail",
            tuple(slow),
            "the other findings say why (conntrack, buffers, rules); a node-local DNS cache "
            "takes conntrack out of the lookup path",
        ))
    return out


def classify_resolv(sample: ResolvSample | None) -> list[Finding]:
    if sample is None:
        return []
    conf = sample.conf
    names = conf.expand(EXTERNAL_NAME)
    # The lookup succeeds when the name itself is tried: everything before it is waste.
    factor = names.index(EXTERNAL_NAME) + 1
    if factor < 2:
        return []
    return [Finding(
        "resolv-search-amplification",
        Severity.WARNING if factor >= AMPLIFICATION_WARNING else Severity.INFO,
        f"every external lookup is tried {factor} times (ndots:{conf.ndots}, "
        f"{len(conf.search)} search domains): x{factor} queries and conntrack entries",
        (f"{sample.path}: options ndots:{conf.ndots}; search {' '.join(conf.search)}",
         f"{EXTERNAL_NAME} is tried as {', '.join(names[:factor])}",
         f"{factor * 2} queries (A and AAAA) and {factor} conntrack entries per lookup "
         "instead of 2 and 1"),
        "lower ndots (pod dnsConfig options ndots:2), use fully qualified names with a "
        "trailing dot for external hosts, or trim the search list; a node-local cache answers "
        "the NXDOMAINs without conntrack",
    )]
