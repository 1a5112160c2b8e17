"""doctor's node-local cache findings, from unbound statistics recorded in the lab
(tests/unit/data/unbound, see test_cache_stats_parsing.py) and query-log lines in unbound's format.

The upstream and drop findings use a recorded window (the "." forwarder frozen). The hit-ratio
and NXDOMAIN windows are the recorded traffic statistics with the counters a storm moves
raised by hand: the lab test (tests/integration/test_cache_stats.py) shows the real storm.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dnsguard.cache.stats import Monotonic, Upstream, parse_forwards, parse_infra, parse_stats
from dnsguard.diagnose import Samples, Severity, classify
from dnsguard.diagnose.cache import classify_cache, parse_reply_line
from dnsguard.diagnose.samples import CacheWindow

DATA = Path(__file__).parent / "data" / "unbound"


def stats(name: str, **raise_by: float) -> dict[str, float]:
    raw = parse_stats((DATA / f"{name}.txt").read_text())
    for key, n in raise_by.items():
        k = key.replace("__", ".")
        raw[k] = raw.get(k, 0.0) + n
    return raw


def upstreams(infra: str) -> tuple[Upstream, ...]:
    return Monotonic().upstreams(parse_forwards((DATA / "list_forwards.txt").read_text()),
                                 parse_infra((DATA / f"{infra}.txt").read_text()))


def ids(window: CacheWindow) -> dict[str, Severity]:
    return {f.id: f.severity for f in classify_cache(window)}


def reply(client: str, name: str, rcode: str, qtype: str = "A") -> str:
    return f"[1796198705] unbound[1:0] info: {client} {name} {qtype} IN {rcode} 0.000123 0 95"


def test_healthy_traffic_gives_no_finding() -> None:
    w = CacheWindow(stats("stats-start"), stats("stats-traffic"), 5.0,
                    upstreams("dump_infra-healthy"))
    assert classify_cache(w) == []
    assert classify(Samples(window=5.0, cache=w)) == []
    assert classify_cache(None) == []


def test_a_frozen_upstream_is_failing_and_the_full_request_list_drops() -> None:
    w = CacheWindow(stats("stats-before-upstream-stopped"), stats("stats-upstream-stopped"),
                    20.0, upstreams("dump_infra-upstream-stopped"))
    found = ids(w)
    # "." has a single forwarder, and it stopped answering: nothing resolves outside names
    assert found == {"cache-upstream-failing": Severity.CRITICAL,
                     "cache-requestlist-drops": Severity.CRITICAL}
    (up,) = [f for f in classify_cache(w) if f.id == "cache-upstream-failing"]
    assert up.summary == "no upstream answers the cache for ."
    assert any("198.18.0.101 for .: 3 timeouts" in e for e in up.evidence)


def test_servfail_share_alone_is_a_warning() -> None:
    before = stats("stats-start")
    after = stats("stats-traffic", num__answer__rcode__SERVFAIL=30, total__num__queries=30)
    w = CacheWindow(before, after, 5.0, upstreams("dump_infra-healthy"))
    assert ids(w) == {"cache-upstream-failing": Severity.WARNING}


def test_a_reset_inside_the_window_yields_nothing() -> None:
    """Reload zeroed the statistics: deltas would be negative, so nothing is concluded."""
    w = CacheWindow(stats("seq-c-resumed"), stats("seq-d-reloaded", total__requestlist__exceeded=5),
                    5.0)
    assert w.delta("total.num.queries") is None
    assert classify_cache(w) == []


def storm(lines: Sequence[str]) -> CacheWindow:
    """The traffic window plus 900 misses answered NXDOMAIN."""
    after = stats("stats-traffic", total__num__queries=900, total__num__cachemiss=900,
                  num__answer__rcode__NXDOMAIN=900, num__query__type__A=900)
    return CacheWindow(stats("stats-start"), after, 5.0, upstreams("dump_infra-healthy"),
                       tuple(lines))


def test_nxdomain_storm_names_the_pods_from_the_query_log() -> None:
    lines = [reply("198.18.0.12", f"n{i}.example.org.default.svc.cluster.local.", "NXDOMAIN")
             for i in range(60)]
    lines += [reply("198.18.0.11", "x.example.org.svc.cluster.local.", "NXDOMAIN")] * 5
    lines += [reply("198.18.0.11", "svc0.default.svc.cluster.local.", "NOERROR")] * 50
    lines += ["[1796198705] unbound[1:0] notice: something else"]
    found = classify_cache(storm(lines))
    assert {f.id: f.severity for f in found} == {
        "cache-low-hit-ratio": Severity.WARNING, "cache-nxdomain-sources": Severity.WARNING}
    (nx,) = [f for f in found if f.id == "cache-nxdomain-sources"]
    assert nx.evidence[1].startswith("198.18.0.12: 60 NXDOMAIN answers, e.g. n")
    assert nx.evidence[2].startswith("198.18.0.11: 5 NXDOMAIN answers")
    assert "kubectl get pods" in nx.fix


def test_nxdomain_storm_without_the_log_says_how_to_find_the_pods() -> None:
    (nx,) = [f for f in classify_cache(storm([])) if f.id == "cache-nxdomain-sources"]
    assert "query log off" in nx.evidence[-1]
    assert "dnsguard cache-log on" in nx.fix


def test_reply_lines_parse() -> None:
    assert parse_reply_line(reply("fd00:198:18::11", "a.b.", "SERVFAIL", "AAAA")) == (
        "fd00:198:18::11", "a.b.", "AAAA", "SERVFAIL")
    assert parse_reply_line("[1] unbound[1:0] info: start of service (unbound 1.17.1).") is None
