"""Every metric dnsguard exports, in one place, and the HTTP endpoint that serves them.

Event metrics (sync latency, errors, outside changes, probe latency) are observed as they
happen; state metrics (rules in sync, cache health, conntrack counters) are read at scrape
time from the objects that own them, so a scrape never sees a stale copy. Labelled series are
created at zero up front: a rate() over a counter that appears only after its first event would
miss that event. The registry is passed in, so tests use their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dnsguard.cache.stats import CacheStats, CacheStatsCollector
from dnsguard.httpd import BoundedHTTPServer, Limits, Response
from dnsguard.netfilter.runner import Runner
from dnsguard.node.conntrack import CachedConntrack
from dnsguard.plan.external import SKIP_REASONS, Skipped

if TYPE_CHECKING:
    from dnsguard.agent import Agent

__all__ = ["SYNC_ERROR_REASONS", "Endpoint", "Metrics", "SkipReport", "serve"]

log = logging.getLogger("dnsguard.metrics")

#: every value `NetfilterError.reason` can take, so each series exists from the start
SYNC_ERROR_REASONS = ("restore_failed", "lock_held", "command_not_found", "error", "cache", "link")
PROBE_TARGETS = ("cluster", "local")
#: every value of `dnsguard.cache.runtime.Upstream`
UPSTREAM_STATES = ("ok", "serving-stale", "failed-open", "unknown")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.sync_duration = Histogram(
            "dnsguard_sync_duration_seconds", "Time of one reconcile: read, diff and write.",
            ["kind"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry)
        self.sync_errors = Counter(
            "dnsguard_sync_errors_total", "Failed reconciles, by reason.", ["reason"],
            registry=registry)
        self.outside_changes = Counter(
            "dnsguard_outside_changes_total",
            "Times dnsguard's rules were found changed by someone else and restored.",
            registry=registry)
        self.probe_duration = Histogram(
            "dnsguard_probe_duration_seconds",
            "Self-probe lookups (A and AAAA, like glibc) by target; timeouts land in +Inf.",
            ["target"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                 2.5, 5), registry=registry)
        self.probe_failures = Counter(
            "dnsguard_probe_failures_total", "Self-probe lookups that got no answer.",
            ["target"], registry=registry)
        self.services_skipped = Counter(
            "dnsguard_services_skipped", "Services, or external IPs of them, left out of the "
            "plan, by reason; counted once each time one starts being left out.", ["reason"],
            registry=registry)
        for reason in SKIP_REASONS:
            self.services_skipped.labels(reason)
        for kind in ("noop", "write"):
            self.sync_duration.labels(kind)
        for reason in SYNC_ERROR_REASONS:
            self.sync_errors.labels(reason)
        for target in PROBE_TARGETS:
            self.probe_duration.labels(target)
            self.probe_failures.labels(target)

    def watch(self, agent: Agent, runner: Runner, proc_root: Path = Path("/proc")) -> None:
        """Export the agent's state and the node's conntrack counters at every scrape."""
        self.registry.register(_StateCollector(agent, runner, proc_root))

    def watch_cache_stats(self, stats: Callable[[], CacheStats]) -> None:
        """Export the node-local cache's own numbers (dnsguard.cache.stats polls them; a
        scrape only reads the latest snapshot)."""
        self.registry.register(CacheStatsCollector(stats))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class SkipReport:
    """Logs and counts each Service the plan leaves out once, not on every replan.

    A skip is new when its (Service, reason, detail) was not in the previous plan's list; one
    that goes away and comes back is reported again.
    """

    def __init__(self, counter: Counter | None = None) -> None:
        self.counter = counter
        self.current: frozenset[Skipped] = frozenset()

    def __call__(self, skipped: Iterable[Skipped]) -> None:
        now = frozenset(skipped)
        for s in sorted(now - self.current, key=lambda s: (s.key, s.reason, s.detail)):
            log.warning("leaving Service %s out of the plan (%s): %s", s.key, s.reason, s.detail)
            if self.counter is not None:
                self.counter.labels(s.reason).inc()
        self.current = now


class _StateCollector(Collector):
    def __init__(self, agent: Agent, runner: Runner, proc_root: Path) -> None:
        self.agent = agent
        #: where the proc file is missing a reading forks ``conntrack -S``: once per max_age,
        #: however often (or however many at once) /metrics is asked for
        self.conntrack = CachedConntrack(runner, proc_root)

    def collect(self) -> Iterator[Metric]:
        st = self.agent.state
        yield _gauge("dnsguard_rules_in_sync", "1 when the kernel holds exactly the plan.",
                     1.0 if st.in_sync else 0.0)
        yield _gauge("dnsguard_rules_planned", "Rules in the current plan.",
                     float(self.agent.plan.rule_count))
        yield _gauge("dnsguard_last_sync_timestamp_seconds",
                     "Wall time of the last successful sync.", st.last_sync_wall)
        yield _gauge("dnsguard_last_loop_timestamp_seconds",
                     "Wall time the agent loop last turned (a hang detector).", st.last_loop_wall)
        cache = self.agent.cache
        if cache is not None:
            cs = cache.state
            yield _gauge("dnsguard_cache_healthy", "1 when the node-local cache answers.",
                         1.0 if cs.healthy else 0.0)
            yield _gauge("dnsguard_cache_intercepting",
                         "1 while pods' DNS is steered to the cache; 0 means failed open "
                         "(kube-proxy's path).", 1.0 if cs.intercepting else 0.0)
            yield _counter("dnsguard_cache_restarts_total", "Restarts of the cache process.",
                           cs.restarts)
            yield _counter("dnsguard_cache_fail_open_total",
                           "Times interception was withdrawn because the cache was unhealthy.",
                           cs.fail_opens)
            upstream = GaugeMetricFamily(
                "dnsguard_cache_upstream_state",
                "1 for how the cache reaches the cluster DNS now: ok, serving-stale (unreachable "
                "from the cache and through kube-proxy's path: interception kept), failed-open "
                "(only the cache's path is broken: interception withdrawn), unknown.",
                labels=["state"])
            for state in UPSTREAM_STATES:  # every series, zero unless current
                upstream.add_metric([state], 1.0 if cs.upstream == state else 0.0)
            yield upstream
        kube = self.agent.kube_status()
        if kube is not None:
            yield _gauge("dnsguard_kube_connected", "1 while the Kubernetes watches are healthy.",
                         1.0 if kube.get("connected") else 0.0)
        yield from self._conntrack()

    def _conntrack(self) -> Iterator[Metric]:
        try:
            ct = self.conntrack.read()
        except Exception as exc:  # never fail a scrape over a counter we could not read
            log.debug("conntrack statistics unavailable: %s", exc)
            return
        if ct is None:
            return
        stats = CounterMetricFamily(
            "dnsguard_conntrack_stat", "Kernel conntrack statistics (only those this kernel "
            "maintains), summed over CPUs.", labels=["stat"])
        for key, value in sorted(ct.counters.items()):
            stats.add_metric([key], float(value))
        yield stats
        if ct.entries is not None:
            yield _gauge("dnsguard_conntrack_entries", "Conntrack entries now.", ct.entries)
        if ct.max is not None:
            yield _gauge("dnsguard_conntrack_max", "nf_conntrack_max.", ct.max)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


@dataclass(frozen=True)
class Probe:
    """A health answer: ok, and a line saying why."""

    ok: bool
    detail: str


def serve(address: tuple[str, int], metrics: Metrics, healthy: Callable[[], Probe],
          ready: Callable[[], Probe], *, limits: Limits | None = None,
          retry_every: float = 1.0) -> Endpoint:
    """Serve /metrics, /healthz and /readyz on daemon threads; `Endpoint.shutdown` stops.

    The server bounds threads, memory and time per client (see `dnsguard.httpd`): the port is
    on the node's network, reachable by anything that can reach the node. An address in use
    (the previous agent on this node still draining during a rollout, or another program) is
    logged and retried every ``retry_every`` seconds while the agent runs on: the DNS
    mitigation must not depend on a metrics port, and the probes answer as soon as it is free.
    """

    def handle(path: str) -> Response:
        if path == "/metrics":
            return 200, metrics.exposition(), "text/plain; version=0.0.4"
        if path in ("/healthz", "/readyz"):
            p = healthy() if path == "/healthz" else ready()
            return 200 if p.ok else 503, (p.detail + "\n").encode(), "text/plain"
        return 404, b"not found\n", "text/plain"

    endpoint = Endpoint(address, handle, limits, retry_every)
    endpoint.start()
    return endpoint


class Endpoint:
    """The server once its address could be bound (`server`, None until then)."""

    def __init__(self, address: tuple[str, int], handle: Callable[[str], Response],
                 limits: Limits | None, retry_every: float) -> None:
        self.address, self.handle, self.limits = address, handle, limits
        self.retry_every = retry_every
        self.server: BoundedHTTPServer | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        try:
            self._bind()
        except OSError as exc:
            log.error("not serving /metrics, /healthz, /readyz yet: --metrics-address %s:%d: "
                      "%s; retrying every %gs", self.address[0], self.address[1], exc,
                      self.retry_every)
            threading.Thread(target=self._retry, daemon=True, name="metrics-bind").start()

    def _bind(self) -> None:
        server = BoundedHTTPServer(self.address, self.handle, self.limits)
        with self._lock:
            if self._stop.is_set():
                server.shutdown()
                return
            self.server = server
        server.start()
        log.info("serving /metrics, /healthz, /readyz on %s:%d", *server.server_address[:2])

    def _retry(self) -> None:
        while not self._stop.wait(self.retry_every):
            try:
                self._bind()
                return
            except OSError:
                continue

    def shutdown(self) -> None:
        with self._lock:
            self._stop.set()
            server = self.server
        if server is not None:
            server.shutdown()
