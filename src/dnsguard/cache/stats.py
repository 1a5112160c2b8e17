"""The node-local cache's own numbers: unbound's extended statistics, polled, never scraped.

``unbound-control stats_noreset`` is a round trip over the control socket: milliseconds when
unbound is idle, seconds when it is saturated, an error while it restarts. A scrape must not
wait on that, so `StatsPoller` runs it (with ``dump_infra`` and ``list_forwards``) every
`POLL_INTERVAL` on its own thread and publishes one frozen `CacheStats`; `CacheStatsCollector`
only reads the latest snapshot. Every series exists from the first scrape: the label sets
(query types, rcodes, histogram buckets, drop reasons) are fixed here, not taken from whatever
unbound happened to print (it omits query types it has not seen).

Counters stay monotonic for the agent's life. unbound's counters start over when the process
restarts (a new boot time: ``time.now - time.up`` moves) and when it reloads its config (same
process, statistics zeroed). `Monotonic` detects either (boot time moved, or a headline counter
went backwards) and adds the last values it saw to a per-key offset, so `rate()` over the
exported counters never sees a reset; ``dnsguard_cache_stats_resets_total`` counts them. What
happened between the last poll and the reset is lost: at most one interval's increments.

Per upstream, unbound keeps no query counters; its infrastructure cache (``dump_infra``) holds,
per server and zone, the smoothed round-trip time, the retransmit timeout (doubled on each
timeout, 120 s means "given up on") and the timeouts since the server's last answer. We export
those, and a counter of timeouts built from their increases between polls (an undercount when a
server times out and recovers within one interval, never an overcount).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "POLL_INTERVAL",
    "QUERY_TYPES",
    "RCODES",
    "CacheStats",
    "CacheStatsCollector",
    "Monotonic",
    "StatsError",
    "StatsPoller",
    "Upstream",
    "parse_forwards",
    "parse_infra",
    "parse_stats",
]

log = logging.getLogger("dnsguard.cache.stats")

#: seconds between polls: cheap for unbound, fine-grained enough for a 15-30 s scrape
POLL_INTERVAL = 5.0
#: seconds between polls while unbound does not answer (starting or restarting)
RETRY_INTERVAL = 1.0
#: unbound-control's own connect and answer budget per command
CONTROL_TIMEOUT = 5.0
#: query types exported by name; every other type is summed into "other" (bounded labels)
QUERY_TYPES = ("A", "AAAA", "ANY", "CNAME", "HTTPS", "MX", "NS", "PTR", "SOA", "SRV", "SVCB",
               "TXT")
#: the rcodes unbound always prints; any other is summed into "other"
RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMPL", "REFUSED")
#: upper bounds (seconds) of the exported recursion-time histogram: a subset of unbound's own
#: power-of-two bucket edges, so each cumulative count is exact
RECURSION_BUCKETS = (0.000256, 0.000512, 0.001024, 0.002048, 0.004096, 0.008192, 0.016384,
                     0.032768, 0.065536, 0.131072, 0.262144, 0.524288, 1.0, 2.0, 4.0, 8.0, 16.0,
                     32.0)
#: unbound's retransmit timeout ceiling: a server at this RTO is one unbound has given up on
RTO_GIVEN_UP_MS = 120000
#: a boot time that moved by more than this means a new unbound process
_BOOT_SLACK = 2.0
#: headline counters: any of them going backwards means unbound zeroed its statistics
_RESET_KEYS = ("total.num.queries", "total.num.cachehits", "total.num.cachemiss")
#: synthetic raw key: the recursion time sum, avg * replies (rounded, so only clamped, never a
#: reset signal)
_SUM_KEY = "recursion.time.sum"
_DROPS = {"exceeded": "total.requestlist.exceeded",
          "overwritten": "total.requestlist.overwritten"}
_TRANSPORTS = {"udp": "num.query.udpout", "tcp": "num.query.tcpout"}


class StatsError(RuntimeError):
    """unbound-control failed or printed something that is not what we parse."""


def _is_counter(key: str) -> bool:
    return (key.startswith(("total.num.", "num.query.type.", "num.answer.rcode.",
                            "histogram."))
            or key in _DROPS.values() or key in _TRANSPORTS.values())


def parse_stats(text: str) -> dict[str, float]:
    """``key=value`` lines of ``stats_noreset``; StatsError when it is not unbound's output."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep:
            continue
        try:
            out[key] = float(value)
        except ValueError:
            continue
    if "total.num.queries" not in out:
        first = text.strip().splitlines()[0] if text.strip() else "(empty)"
        raise StatsError(f"not unbound statistics: {first[:200]}")
    return out


@dataclass(frozen=True)
class InfraEntry:
    """One line of ``dump_infra``: what unbound knows of a server for a zone."""

    address: str
    zone: str
    ping_ms: int
    rto_ms: int
    timeouts: int


def parse_infra(text: str) -> list[InfraEntry]:
    """Live entries of ``dump_infra`` (expired ones carry no RTT and are skipped)."""
    out: list[InfraEntry] = []
    for line in text.splitlines():
        tok = line.split()
        if len(tok) < 3 or "expired" in tok:
            continue
        try:
            vals = {k: int(tok[tok.index(k) + 1]) for k in ("ping", "rto", "tA", "tAAAA",
                                                            "tother")}
        except (ValueError, IndexError):
            continue
        out.append(InfraEntry(tok[0], tok[1], vals["ping"], vals["rto"],
                              vals["tA"] + vals["tAAAA"] + vals["tother"]))
    return out


def parse_forwards(text: str) -> list[tuple[str, str]]:
    """(zone, server) pairs of ``list_forwards``, in unbound's order."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        tok = line.split()
        if len(tok) < 4 or tok[1:3] != ["IN", "forward"]:
            continue
        out += [(tok[0], a) for a in tok[3:] if not a.startswith("+")]
    return out


@dataclass(frozen=True)
class Upstream:
    zone: str
    address: str
    #: smoothed round-trip time; 0 until unbound has measured the server
    rtt: float
    #: retransmit timeout, doubled on every timeout
    rto: float
    #: timeouts since the server last answered (unbound forgets them on an answer)
    timeouts: int
    #: increases of ``timeouts`` seen between polls, monotonic
    timeouts_total: float

    @property
    def given_up(self) -> bool:
        return self.rto * 1000 >= RTO_GIVEN_UP_MS


def _frozen(d: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class CacheStats:
    """One poll's worth of numbers, counters already made monotonic."""

    counters: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    gauges: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    upstreams: tuple[Upstream, ...] = ()
    resets: int = 0
    #: the last poll reached unbound
    up: bool = False
    polled_at: float = 0.0
    error: str = ""

    def counter(self, key: str) -> float:
        return self.counters.get(key, 0.0)

    def summed(self, prefix: str, exclude: Sequence[str] = ()) -> float:
        return sum(v for k, v in self.counters.items()
                   if k.startswith(prefix) and k[len(prefix):] not in exclude)

    @property
    def hit_ratio(self) -> float | None:
        """Hits over queries since the agent started; None before the first query."""
        q = self.counter("total.num.queries")
        return self.counter("total.num.cachehits") / q if q else None

    def recursion_buckets(self) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) pairs at `RECURSION_BUCKETS`, then +Inf."""
        edges: list[tuple[float, float]] = []
        for key, value in self.counters.items():
            if key.startswith("histogram."):
                p = key.split(".")
                edges.append((int(p[4]) + int(p[5]) / 1e6, value))
        out = [(le, sum(v for upper, v in edges if upper <= le + 1e-9))
               for le in RECURSION_BUCKETS]
        out.append((float("inf"), sum(v for _, v in edges)))
        return out


class Monotonic:
    """Turns unbound's raw counters into ones that never go backwards (see the module doc)."""

    def __init__(self) -> None:
        self.offsets: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.boot: float | None = None
        self.resets = 0
        self._timeouts: dict[tuple[str, str], int] = {}
        self._timeouts_total: dict[tuple[str, str], float] = {}

    def update(self, raw: Mapping[str, float], boot: float) -> dict[str, float]:
        counters = {k: v for k, v in raw.items() if _is_counter(k)}
        moved = self.boot is not None and abs(boot - self.boot) > _BOOT_SLACK
        back = any(counters.get(k, 0.0) < self.last.get(k, 0.0) for k in _RESET_KEYS)
        if moved or back:
            self.resets += 1
            for k, v in self.last.items():
                self.offsets[k] = self.offsets.get(k, 0.0) + v
            self.last = {}
        self.boot = boot
        # the recursion time sum is a product of rounded numbers: clamp it, never reset on it
        counters[_SUM_KEY] = max(raw.get("total.recursion.time.avg", 0.0)
                                 * raw.get("total.num.recursivereplies", 0.0),
                                 self.last.get(_SUM_KEY, 0.0))
        # a key unbound stopped printing keeps its last value rather than dropping to zero
        for k, v in self.last.items():
            counters[k] = max(counters.get(k, 0.0), v)
        self.last = counters
        keys = set(counters) | set(self.offsets)
        return {k: counters.get(k, 0.0) + self.offsets.get(k, 0.0) for k in keys}

    def upstreams(self, forwards: Sequence[tuple[str, str]],
                  infra: Sequence[InfraEntry]) -> tuple[Upstream, ...]:
        """Every configured forwarder, with what the infrastructure cache knows of it."""
        known = {(e.address, e.zone.rstrip(".") + "."): e for e in infra}
        out: list[Upstream] = []
        for zone, addr in forwards:
            host = addr.split("@")[0]
            key = (host, zone.rstrip(".") + ".")
            e = known.get(key)
            now = e.timeouts if e is not None else 0
            before = self._timeouts.get(key, 0)
            total = self._timeouts_total.get(key, 0.0) + max(0, now - before)
            self._timeouts[key], self._timeouts_total[key] = now, total
            out.append(Upstream(zone=zone, address=addr,
                                rtt=e.ping_ms / 1000 if e else 0.0,
                                rto=e.rto_ms / 1000 if e else 0.0,
                                timeouts=now, timeouts_total=total))
        return tuple(out)


#: runs one unbound-control command (its arguments after ``-c conf``) and returns its stdout
Control = Callable[[Sequence[str]], str]


def control_command(binary: str, conf: Path) -> Control:
    """The real unbound-control, bounded in time; failures become StatsError."""

    def run(args: Sequence[str]) -> str:
        try:
            res = subprocess.run([binary, "-c", str(conf), *args], capture_output=True,
                                 text=True, timeout=CONTROL_TIMEOUT, check=False)
        except FileNotFoundError:
            raise StatsError(f"{binary} not found: install unbound") from None
        except subprocess.TimeoutExpired:
            raise StatsError(f"{binary} {args[0]} took over {CONTROL_TIMEOUT:g}s") from None
        if res.returncode != 0:
            raise StatsError(f"{binary} {args[0]}: {(res.stderr or res.stdout).strip()[:300]}")
        return res.stdout

    return run


class StatsPoller:
    """Polls unbound on its own thread; `snapshot` is always the latest complete poll."""

    def __init__(self, control: Control, *, interval: float = POLL_INTERVAL,
                 wall: Callable[[], float] = time.time,
                 on_new_process: Callable[[], None] | None = None) -> None:
        self.control = control
        self.interval = interval
        self.wall = wall
        #: called after the first poll of each unbound process or config reload (runtime
        #: options set with unbound-control, such as the query log, do not survive either)
        self.on_new_process = on_new_process
        self.tracker = Monotonic()
        self._snapshot = CacheStats()

    @property
    def snapshot(self) -> CacheStats:
        return self._snapshot  # a reference swap: readers never see half a poll

    def poll(self) -> CacheStats:
        """One round trip; on failure the counters keep their last values and ``up`` is 0."""
        prev = self._snapshot
        try:
            raw = parse_stats(self.control(["stats_noreset"]))
            infra = parse_infra(self.control(["dump_infra"]))
            forwards = parse_forwards(self.control(["list_forwards"]))
        except StatsError as exc:
            if prev.up or prev.error != str(exc):
                log.warning("cache statistics unavailable: %s", exc)
            snap = CacheStats(prev.counters, prev.gauges, prev.upstreams, prev.resets, False,
                              prev.polled_at, str(exc))
        else:
            boot = raw.get("time.now", 0.0) - raw.get("time.up", 0.0)
            first, resets = self.tracker.boot is None, self.tracker.resets
            counters = self.tracker.update(raw, boot)
            if (first or self.tracker.resets != resets) and self.on_new_process is not None:
                try:
                    self.on_new_process()
                except StatsError as exc:
                    log.warning("could not apply runtime options to the cache: %s", exc)
            gauges = {k: v for k, v in raw.items() if not _is_counter(k)}
            snap = CacheStats(_frozen(counters), _frozen(gauges),
                              self.tracker.upstreams(forwards, infra), self.tracker.resets,
                              True, self.wall())
        self._snapshot = snap
        return snap

    def start(self, stop: threading.Event) -> threading.Thread:
        """Poll now and every `interval` until ``stop`` is set."""
        def loop() -> None:
            while True:
                try:
                    self.poll()
                except Exception:  # a bug here must not end the statistics for good
                    log.exception("cache statistics poll failed")
                # while unbound is (re)starting, look again soon: the series and runtime
                # options such as the query log should follow it within a second
                if stop.wait(self.interval if self._snapshot.up else RETRY_INTERVAL):
                    return

        t = threading.Thread(target=loop, daemon=True, name="cache-stats")
        t.start()
        return t


class CacheStatsCollector(Collector):
    """Exports the poller's latest snapshot; never calls unbound itself."""

    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        c = s.counter
        for name, key, doc in (
                ("queries", "total.num.queries", "Queries the node-local cache received."),
                ("hits", "total.num.cachehits", "Queries answered from the cache."),
                ("misses", "total.num.cachemiss", "Queries that needed an upstream."),
                ("prefetches", "total.num.prefetch",
                 "Cache entries refreshed before expiry (prefetch)."),
                ("expired_answers", "total.num.expired",
                 "Answers served from expired entries (serve-expired: upstream slow or down)."),
                ("recursive_replies", "total.num.recursivereplies",
                 "Answers that came from an upstream (cache misses that got a reply).")):
            yield CounterMetricFamily(f"dnsguard_cache_{name}", doc, value=c(key))
        types = CounterMetricFamily("dnsguard_cache_queries_by_type",
                                    "Queries by type; other types summed as 'other'.",
                                    labels=["type"])
        for t in QUERY_TYPES:
            types.add_metric([t], c(f"num.query.type.{t}"))
        types.add_metric(["other"], s.summed("num.query.type.", QUERY_TYPES))
        yield types
        rcodes = CounterMetricFamily("dnsguard_cache_responses",
                                     "Answers by rcode; rare rcodes summed as 'other'.",
                                     labels=["rcode"])
        for r in RCODES:
            rcodes.add_metric([r], c(f"num.answer.rcode.{r}"))
        rcodes.add_metric(["other"], s.summed("num.answer.rcode.", (*RCODES, "nodata")))
        yield rcodes
        yield CounterMetricFamily("dnsguard_cache_nodata_responses",
                                  "NOERROR answers without data (among the NOERROR ones).",
                                  value=c("num.answer.rcode.nodata"))
        drops = CounterMetricFamily(
            "dnsguard_cache_requestlist_dropped",
            "Queries dropped because the request list was full: 'exceeded' were refused, "
            "'overwritten' replaced older pending ones.", labels=["reason"])
        for reason, key in _DROPS.items():
            drops.add_metric([reason], c(key))
        yield drops
        yield GaugeMetricFamily("dnsguard_cache_requestlist_current",
                                "Queries waiting for an upstream now.",
                                value=s.gauges.get("total.requestlist.current.all", 0.0))
        out = CounterMetricFamily("dnsguard_cache_outgoing_queries",
                                  "Queries the cache sent upstream, by transport.",
                                  labels=["transport"])
        for transport, key in _TRANSPORTS.items():
            out.add_metric([transport], c(key))
        yield out
        hist = HistogramMetricFamily(
            "dnsguard_cache_recursion_duration_seconds",
            "Time to answer a cache miss (unbound's histogram).")
        buckets = s.recursion_buckets()
        hist.add_metric([], [(_le(le), n) for le, n in buckets], c(_SUM_KEY))
        yield hist
        entries = GaugeMetricFamily("dnsguard_cache_entries", "Entries in unbound's caches.",
                                    labels=["cache"])
        for name in ("msg", "rrset", "infra"):
            entries.add_metric([name], s.gauges.get(f"{name}.cache.count", 0.0))
        yield entries
        yield from self._upstreams(s)
        yield CounterMetricFamily(
            "dnsguard_cache_stats_resets", "Times unbound's counters started over (restart or "
            "reload); the exported counters carry on from where they were.", value=s.resets)
        yield GaugeMetricFamily("dnsguard_cache_stats_up",
                                "1 when the last poll of unbound-control worked.",
                                value=1.0 if s.up else 0.0)
        yield GaugeMetricFamily("dnsguard_cache_stats_timestamp_seconds",
                                "Wall time of the last successful poll.", value=s.polled_at)

    @staticmethod
    def _upstreams(s: CacheStats) -> Iterator[Metric]:
        labels = ["zone", "upstream"]
        rtt = GaugeMetricFamily("dnsguard_cache_upstream_rtt_seconds",
                                "Smoothed round-trip time unbound measured (0: not yet).",
                                labels=labels)
        rto = GaugeMetricFamily("dnsguard_cache_upstream_rto_seconds",
                                "unbound's retransmit timeout; 120 means given up on.",
                                labels=labels)
        now = GaugeMetricFamily("dnsguard_cache_upstream_consecutive_timeouts",
                                "Timeouts since the upstream last answered.", labels=labels)
        total = CounterMetricFamily("dnsguard_cache_upstream_timeouts",
                                    "Timeouts of the upstream, counted between polls.",
                                    labels=labels)
        for u in s.upstreams:
            lv = [u.zone, u.address]
            rtt.add_metric(lv, u.rtt)
            rto.add_metric(lv, u.rto)
            now.add_metric(lv, u.timeouts)
            total.add_metric(lv, u.timeouts_total)
        yield from (rtt, rto, now, total)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"
