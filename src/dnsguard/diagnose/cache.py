"""Classifier: what the node-local cache's own numbers say about slow or failing DNS.

Input is a `CacheWindow`: unbound's statistics read at both ends of doctor's window, its
infrastructure cache (per upstream RTT, retransmit timeout, timeouts since the last answer) at
the end, and the query log lines written during the window when the log is on (`dnsguard
cache-log on`). Deltas only: a lifetime hit ratio says nothing about now. A statistics reset
inside the window (unbound restarted or reloaded) makes a delta negative; those counters are
treated as unknown and yield no finding.

Findings:

* ``cache-low-hit-ratio``: under half of the window's queries were answered from the cache
  (with enough queries to mean something): every miss waits for an upstream.
* ``cache-upstream-failing``: an upstream unbound has stopped hearing from (three or more
  timeouts since its last answer, or a retransmit timeout at unbound's ceiling), or a share of
  SERVFAIL answers in the window.
* ``cache-requestlist-drops``: queries dropped because too many were waiting for upstreams;
  each is a client timeout.
* ``cache-nxdomain-sources``: many answers are NXDOMAIN; with the query log on, which clients
  (pod addresses) ask for them, usually search-path expansion of external names.
"""

from __future__ import annotations

import re
from collections import Counter

from dnsguard.cache.stats import RTO_GIVEN_UP_MS
from dnsguard.diagnose.findings import Finding, Severity
from dnsguard.diagnose.samples import CacheWindow

__all__ = ["classify_cache", "parse_reply_line"]

#: below this many queries in the window, a ratio is noise
MIN_QUERIES = 200
LOW_HIT_RATIO = 0.5
SERVFAIL_SHARE = 0.05
MIN_ANSWERS = 20
NXDOMAIN_SHARE = 0.3
MIN_NXDOMAIN = 50
TOP_SOURCES = 5

# unbound's log-replies line: client, name, type, class, rcode, seconds, cached, size
_REPLY = re.compile(r"info: (\S+) (\S+) (\S+) (\S+) ([A-Z]+) ([\d.]+) (\d) (\d+)\s*$")


def parse_reply_line(line: str) -> tuple[str, str, str, str] | None:
    """(client, name, type, rcode) of one query-log line, None for any other line."""
    m = _REPLY.search(line)
    return (m[1], m[2], m[3], m[5]) if m else None


def classify_cache(window: CacheWindow | None) -> list[Finding]:
    if window is None:
        return []
    return [*_hit_ratio(window), *_upstreams(window), *_drops(window), *_nxdomain(window)]


def _hit_ratio(w: CacheWindow) -> list[Finding]:
    queries, hits = w.delta("total.num.queries"), w.delta("total.num.cachehits")
    if queries is None or hits is None or queries < MIN_QUERIES:
        return []
    ratio = hits / queries
    if ratio >= LOW_HIT_RATIO:
        return []
    evidence = [f"{queries:.0f} queries in {w.seconds:.1f}s, {hits:.0f} answered from the "
                f"cache ({ratio:.0%})"]
    nx = w.delta("num.answer.rcode.NXDOMAIN")
    if nx:
        evidence.append(f"{nx:.0f} of the answers were NXDOMAIN ({nx / queries:.0%})")
    types = sorted(((w.delta(k) or 0, k.rsplit(".", 1)[1]) for k in w.after
                    if k.startswith("num.query.type.")), reverse=True)[:3]
    evidence.append("by type: " + ", ".join(f"{t} {n:.0f}" for n, t in types if n))
    return [Finding(
        "cache-low-hit-ratio", Severity.WARNING,
        f"only {ratio:.0%} of the node-local cache's queries were cache hits", tuple(evidence),
        "misses are usually unique or non-existent names: see cache-nxdomain-sources, or turn "
        "on the query log (dnsguard cache-log on) to see who asks for what")]


def _upstreams(w: CacheWindow) -> list[Finding]:
    evidence: list[str] = []
    down = 0
    for u in w.upstreams:
        if u.timeouts >= 3 or u.rto * 1000 >= RTO_GIVEN_UP_MS:
            down += 1
            evidence.append(f"upstream {u.address} for {u.zone}: {u.timeouts} timeouts since "
                            f"its last answer, retransmit timeout {u.rto:g}s")
    answers = sum(w.delta(f"num.answer.rcode.{r}") or 0 for r in
                  ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMPL", "REFUSED"))
    servfail = w.delta("num.answer.rcode.SERVFAIL") or 0
    if answers >= MIN_ANSWERS and servfail / answers >= SERVFAIL_SHARE:
        evidence.append(f"{servfail:.0f} of {answers:.0f} answers in the window were SERVFAIL "
                        f"({servfail / answers:.0%})")
    if not evidence:
        return []
    zones = {u.zone for u in w.upstreams}
    dead_zones = [z for z in sorted(zones) if all(
        u.timeouts >= 3 or u.rto * 1000 >= RTO_GIVEN_UP_MS for u in w.upstreams if u.zone == z)]
    severity = Severity.CRITICAL if dead_zones else Severity.WARNING
    summary = (f"no upstream answers the cache for {', '.join(dead_zones)}" if dead_zones else
               f"{down} upstream(s) of the node-local cache are failing" if down else
               "the node-local cache answers SERVFAIL: its upstreams fail")
    return [Finding(
        "cache-upstream-failing", severity, summary, tuple(evidence),
        "check the upstream: a CoreDNS pod (is it running, is its EndpointSlice current, does a "
        "network policy block the node?) or the node's resolv.conf nameserver for '.'")]


def _drops(w: CacheWindow) -> list[Finding]:
    exceeded = w.delta("total.requestlist.exceeded") or 0
    overwritten = w.delta("total.requestlist.overwritten") or 0
    if exceeded + overwritten <= 0:
        return []
    return [Finding(
        "cache-requestlist-drops", Severity.CRITICAL,
        "the node-local cache dropped queries: too many were waiting for upstreams",
        (f"request list: {exceeded:.0f} queries refused (exceeded), {overwritten:.0f} replaced "
         f"(overwritten) in {w.seconds:.1f}s",
         f"{w.after.get('total.requestlist.current.all', 0):.0f} waiting at the end"),
        "a slow or dead upstream under load fills the list: fix the upstream first "
        "(cache-upstream-failing); each drop is a client timeout and retry")]


def _nxdomain(w: CacheWindow) -> list[Finding]:
    nx = w.delta("num.answer.rcode.NXDOMAIN")
    queries = w.delta("total.num.queries")
    if nx is None or not queries or nx < MIN_NXDOMAIN or nx / queries < NXDOMAIN_SHARE:
        return []
    evidence = [f"{nx:.0f} of {queries:.0f} answers in {w.seconds:.1f}s were NXDOMAIN "
                f"({nx / queries:.0%})"]
    parsed = [p for p in map(parse_reply_line, w.replies) if p is not None]
    by_client = Counter(client for client, _, _, rcode in parsed if rcode == "NXDOMAIN")
    if by_client:
        for client, n in by_client.most_common(TOP_SOURCES):
            names = Counter(name for c, name, _, rcode in parsed
                            if c == client and rcode == "NXDOMAIN")
            example = ", ".join(name for name, _ in names.most_common(3))
            evidence.append(f"{client}: {n} NXDOMAIN answers, e.g. {example}")
        fix = ("find the pods by address (kubectl get pods -A -o wide | grep IP); names that "
               "end in the cluster search domains are search-path expansion: lower ndots in "
               "the pod's dnsConfig or use fully qualified names (trailing dot)")
    elif w.replies:
        evidence.append("the query log shows no NXDOMAIN lines in the window")
        fix = "run doctor again with a longer --window"
    else:
        evidence.append("query log off: which pods ask is unknown")
        fix = ("turn on the query log (dnsguard cache-log on), run doctor again to see the "
               "pods asking, then dnsguard cache-log off")
    return [Finding("cache-nxdomain-sources", Severity.WARNING,
                    "many of the node-local cache's answers are NXDOMAIN", tuple(evidence), fix)]
