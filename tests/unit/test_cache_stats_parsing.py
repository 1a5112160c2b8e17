"""unbound's statistics, parsed from output recorded from a real unbound 1.17 in the lab, made
monotonic across reloads and restarts, and exported with every series present from the start.

The files in data/unbound were recorded from the agent's own unbound in a lab node
(`dnsguard run --mitigation nodelocal`, lookups from two pods): ``stats-start`` right after
start, ``stats-traffic`` after a lookup load, and the ``seq-*`` files one process's life: load,
more load, ``unbound-control reload`` (statistics zeroed, same boot time), then a kill -9 and
the agent's restart (new boot time). What these cannot prove: that a scrape never waits on
unbound (the poller thread is exercised by the root test).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dnsguard.cache.querylog import query_log_enabled, set_query_log
from dnsguard.cache.stats import (
    QUERY_TYPES,
    RCODES,
    RECURSION_BUCKETS,
    CacheStats,
    CacheStatsCollector,
    StatsError,
    StatsPoller,
    parse_forwards,
    parse_infra,
    parse_stats,
)
from dnsguard.cli import build_parser
from dnsguard.config import ConfigError, settings_from

DATA = Path(__file__).parent / "data" / "unbound"
SEQUENCE = ["seq-a-healthy", "seq-c-resumed", "seq-d-reloaded", "seq-e-restarted"]


def text(name: str) -> str:
    return (DATA / f"{name}.txt").read_text()


class Scripted:
    """unbound-control answering from recorded files; `stats` is consumed one per poll."""

    def __init__(self, stats: Sequence[str], infra: str = "dump_infra-healthy") -> None:
        self.stats = list(stats)
        self.infra = text(infra)
        self.fail = False
        self.calls: list[str] = []

    def __call__(self, args: Sequence[str]) -> str:
        self.calls.append(args[0])
        if self.fail:
            raise StatsError("error: connect: No such file or directory for /run/x/unbound.ctl")
        if args[0] == "stats_noreset":
            return text(self.stats.pop(0))
        if args[0] == "dump_infra":
            return self.infra
        assert args[0] == "list_forwards"
        return text("list_forwards")


def samples(stats: CacheStats) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()
    reg.register(CacheStatsCollector(lambda: stats))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(stats: CacheStats, name: str, **labels: str) -> float:
    return samples(stats)[(name, tuple(sorted(labels.items())))]


# -- parsing ------------------------------------------------------------------------------------
def test_parse_recorded_stats_after_traffic() -> None:
    raw = parse_stats(text("stats-traffic"))
    assert raw["total.num.queries"] == 207
    assert raw["total.num.cachehits"] + raw["total.num.cachemiss"] == 207
    assert raw["num.query.type.A"] == 104 and raw["num.query.type.AAAA"] == 101
    # extended statistics are on: the histogram counts every recursive reply
    hist = sum(v for k, v in raw.items() if k.startswith("histogram."))
    assert hist == raw["total.num.recursivereplies"] == 50


@pytest.mark.parametrize("bad", ["", "error: connect: Connection refused", "ok\n"])
def test_parse_refuses_what_is_not_statistics(bad: str) -> None:
    with pytest.raises(StatsError, match="not unbound statistics"):
        parse_stats(bad)


def test_parse_infra_and_forwards() -> None:
    infra = parse_infra(text("dump_infra-healthy"))
    assert [(e.address, e.zone, e.ping_ms, e.rto_ms, e.timeouts) for e in infra] == [
        ("198.18.0.101", "cluster.local.", 5, 53, 0), ("198.18.0.102", "cluster.local.", 5, 50, 0)]
    fwd = parse_forwards(text("list_forwards"))
    assert ("cluster.local.", "198.18.0.102") in fwd and (".", "198.18.0.101") in fwd
    assert len(fwd) == 7
    # an expired infra entry has no RTT to report
    assert parse_infra("198.18.0.9 cluster.local. expired rto 120000\n") == []


# -- the snapshot and the collector ---------------------------------------------------------------
def test_every_series_exists_at_zero_before_the_first_poll() -> None:
    s = samples(CacheStats())
    for t in (*QUERY_TYPES, "other"):
        assert s[("dnsguard_cache_queries_by_type_total", (("type", t),))] == 0
    for r in (*RCODES, "other"):
        assert s[("dnsguard_cache_responses_total", (("rcode", r),))] == 0
    for reason in ("exceeded", "overwritten"):
        assert s[("dnsguard_cache_requestlist_dropped_total", (("reason", reason),))] == 0
    for le in (*RECURSION_BUCKETS, float("inf")):
        key = "+Inf" if le == float("inf") else f"{le:g}"
        assert s[("dnsguard_cache_recursion_duration_seconds_bucket", (("le", key),))] == 0
    for name in ("queries", "hits", "misses", "prefetches", "expired_answers",
                 "recursive_replies", "stats_resets"):
        assert s[(f"dnsguard_cache_{name}_total", ())] == 0
    assert s[("dnsguard_cache_stats_up", ())] == 0


def test_a_poll_exports_unbounds_numbers() -> None:
    poller = StatsPoller(Scripted(["stats-start", "stats-traffic"]), wall=lambda: 1234.0)
    first = poller.poll()
    assert first.up and one(first, "dnsguard_cache_queries_total") == 2  # health queries
    # the upstreams are known from the first poll, before any query reached them
    assert one(first, "dnsguard_cache_upstream_timeouts_total", zone="cluster.local.",
               upstream="198.18.0.101") == 0
    s = poller.poll()
    assert one(s, "dnsguard_cache_queries_total") == 207
    assert one(s, "dnsguard_cache_hits_total") == 157
    assert one(s, "dnsguard_cache_misses_total") == 50
    assert s.hit_ratio == pytest.approx(157 / 207)
    assert one(s, "dnsguard_cache_queries_by_type_total", type="AAAA") == 101
    assert one(s, "dnsguard_cache_queries_by_type_total", type="other") == 0
    assert one(s, "dnsguard_cache_responses_total", rcode="NXDOMAIN") == 6
    assert one(s, "dnsguard_cache_recursion_duration_seconds_count") == 50
    # 2+3+6+16 replies took at most 256 us; 2 took 32-65 ms
    assert one(s, "dnsguard_cache_recursion_duration_seconds_bucket", le="0.000256") == 27
    assert one(s, "dnsguard_cache_recursion_duration_seconds_bucket", le="0.032768") == 48
    assert one(s, "dnsguard_cache_recursion_duration_seconds_sum") == pytest.approx(
        0.002124 * 50)
    assert one(s, "dnsguard_cache_upstream_rtt_seconds", zone="cluster.local.",
               upstream="198.18.0.101") == pytest.approx(0.005)
    assert one(s, "dnsguard_cache_upstream_rto_seconds", zone="cluster.local.",
               upstream="198.18.0.101") == pytest.approx(0.053)
    # unbound has not talked to the "." forwarder: present, at zero
    assert one(s, "dnsguard_cache_upstream_rtt_seconds", zone=".",
               upstream="198.18.0.101") == 0
    assert one(s, "dnsguard_cache_stats_timestamp_seconds") == 1234.0


def test_counters_stay_monotonic_across_reload_and_restart() -> None:
    raw = [parse_stats(text(n)) for n in SEQUENCE]
    assert raw[2]["total.num.queries"] == 0, "the recording: reload zeroes the statistics"
    poller = StatsPoller(Scripted(SEQUENCE))
    seen = [poller.poll() for _ in SEQUENCE]
    queries = [s.counter("total.num.queries") for s in seen]
    # reload: nothing lost, nothing new; restart: the new process's 3 queries on top
    assert queries == [122, 168, 168, 171]
    assert [s.resets for s in seen] == [0, 0, 1, 2]
    for before, after in itertools.pairwise(seen):
        for key, value in before.counters.items():
            assert after.counter(key) >= value, key
    assert one(seen[-1], "dnsguard_cache_stats_resets_total") == 2


def test_a_restart_is_seen_by_its_boot_time_even_when_counters_grew_past_the_old_ones() -> None:
    poller = StatsPoller(Scripted(["stats-start", "stats-traffic"]))
    poller.poll()
    # same numbers as before, but printed by a process that booted a minute later
    later = text("stats-traffic").replace("time.now=1796197926.453789",
                                          "time.now=1796197986.453789")
    poller.control = lambda args: later if args[0] == "stats_noreset" else ""
    s = poller.poll()
    assert s.resets == 1
    assert s.counter("total.num.queries") == 2 + 207  # carried + the new process's


def test_a_failed_poll_keeps_the_counters_and_reports_down() -> None:
    control = Scripted(["stats-traffic"])
    poller = StatsPoller(control)
    poller.poll()
    control.fail = True
    s = poller.poll()
    assert not s.up and "unbound.ctl" in s.error
    assert one(s, "dnsguard_cache_queries_total") == 207
    assert one(s, "dnsguard_cache_stats_up") == 0


def test_a_stopped_upstream_shows_as_timeouts_servfail_expired_answers_and_drops() -> None:
    """Recorded: the "." forwarder (dnsmasq in the lab) SIGSTOPped, six uncached lookups."""
    control = Scripted(["stats-before-upstream-stopped", "stats-upstream-stopped"],
                       infra="dump_infra-before-upstream-stopped")
    poller = StatsPoller(control)
    before = poller.poll()
    control.infra = text("dump_infra-upstream-stopped")
    after = poller.poll()
    labels = {"zone": ".", "upstream": "198.18.0.101"}
    assert one(before, "dnsguard_cache_upstream_timeouts_total", **labels) == 0
    assert one(after, "dnsguard_cache_upstream_timeouts_total", **labels) == 3
    assert one(after, "dnsguard_cache_upstream_consecutive_timeouts", **labels) == 3
    assert one(after, "dnsguard_cache_upstream_rto_seconds", **labels) == pytest.approx(12.032)
    assert one(after, "dnsguard_cache_responses_total", rcode="SERVFAIL") == 2
    assert one(after, "dnsguard_cache_expired_answers_total") == 2
    assert one(after, "dnsguard_cache_requestlist_dropped_total", reason="exceeded") == 2
    assert one(after, "dnsguard_cache_requestlist_current") == 2
    # the cluster zone's upstreams kept answering
    assert one(after, "dnsguard_cache_upstream_timeouts_total", zone="cluster.local.",
               upstream="198.18.0.102") == 0


def test_upstream_timeouts_count_increases_between_polls() -> None:
    """unbound forgets a server's timeouts when it answers: the counter keeps them."""
    stopped = text("dump_infra-upstream-stopped")
    recovered = stopped.replace("tA 3 tAAAA 0", "tA 0 tAAAA 0")
    control = Scripted(["stats-traffic"] * 4)
    poller = StatsPoller(control)
    totals = []
    for infra in (recovered, stopped, recovered, stopped):
        control.infra = infra
        (u,) = [u for u in poller.poll().upstreams if u.zone == "."]
        totals.append((u.timeouts, u.timeouts_total))
    assert totals == [(0, 0), (3, 3), (0, 3), (3, 6)]


# -- runtime options survive restarts and reloads ------------------------------------------------
def test_runtime_options_are_reapplied_after_each_restart_and_reload() -> None:
    applied: list[int] = []
    poller = StatsPoller(Scripted(SEQUENCE), on_new_process=lambda: applied.append(1))
    for _ in SEQUENCE:
        poller.poll()
    # first poll, then after the reload (seq-d) and the restart (seq-e); not on the second poll
    assert len(applied) == 3


def test_query_log_switch_speaks_unbound_control() -> None:
    calls: list[list[str]] = []
    answers = {"set_option": "ok\n", "get_option": "yes\n"}

    def control(args: Sequence[str]) -> str:
        calls.append(list(args))
        return answers[args[0]]

    set_query_log(control, True)
    assert query_log_enabled(control)
    set_query_log(control, False)
    assert calls == [["set_option", "log-replies:", "yes"], ["get_option", "log-replies"],
                     ["set_option", "log-replies:", "no"]]
    answers["set_option"] = "error setting option\n"
    with pytest.raises(StatsError, match="refused"):
        set_query_log(control, True)


def test_log_queries_flag_and_variable() -> None:
    parse = build_parser().parse_args
    assert settings_from(parse(["run", "--log-queries"]), env={}).log_queries is True
    assert settings_from(parse(["run"]), env={"DNSGUARD_LOG_QUERIES": "yes"}).log_queries
    assert settings_from(parse(["run"]), env={}).log_queries is False
    with pytest.raises(ConfigError, match="DNSGUARD_LOG_QUERIES"):
        settings_from(parse(["run"]), env={"DNSGUARD_LOG_QUERIES": "maybe"})
