"""The reconcile loop: keep the kernel holding exactly the plan, and notice when it stops.

Each sync reads what dnsguard owns (one save per table family), diffs it against the plan and
writes only when they differ. A difference after a sync that ended in sync means someone else
changed our rules (``iptables -t raw -F``, a restarted kube-proxy flushing tables): it is logged
and counted, then repaired by the same sync, so repair takes at most one interval. A failed sync
is retried with exponential backoff (1 s, 2 s, ... capped at the interval) on an injected clock,
never with ad-hoc sleeps; the previous rules stay as they were because every write is one
atomic transaction.

The loop wakes for two reasons: the sync interval and new facts (a `replan` callable, fed by
the Kubernetes watch, returns a new plan; the loop then syncs at once and hands the cache its
new upstreams). The node-local cache's health and its dead man's switch are not in this loop:
they have their own heartbeat thread (`CacheRuntime.start`), because a sync can take seconds
(table reads beside kube-proxy's rules) and the switch expires in `ALIVE_SECONDS`. Everything
the agent knows is written to the state directory at every turn of either, for
``dnsguard status``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dnsguard.cache.runtime import HEALTH_INTERVAL, CacheRuntime
from dnsguard.netfilter import Netfilter, NetfilterError, RestoreFailed
from dnsguard.plan import Plan
from dnsguard.report import write_status

if TYPE_CHECKING:
    from dnsguard.metrics import Metrics

__all__ = ["Agent", "AgentState", "Clock", "SystemClock"]

log = logging.getLogger("dnsguard.agent")

#: First retry delay after a failed sync; doubles up to the sync interval.
MIN_BACKOFF_SECONDS = 1.0


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Block until ``event`` is set or ``timeout`` passes; True when set."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(timeout)


@dataclass
class AgentState:
    """What the agent knows about its own health; read by status, metrics and tests."""

    syncs: int = 0
    writes: int = 0
    in_sync: bool = False
    outside_changes: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    consecutive_failures: int = 0
    last_error: str = ""
    last_drift: tuple[str, ...] = ()
    last_sync_at: float | None = None
    last_sync_seconds: float = 0.0
    last_sync_wall: float = 0.0
    last_loop_wall: float = 0.0
    replans: int = 0


class Agent:
    def __init__(self, netfilter: Netfilter, plan: Plan, *, interval: float,
                 clock: Clock | None = None, cache: CacheRuntime | None = None,
                 metrics: Metrics | None = None, state_dir: Path | None = None,
                 replan: Callable[[], Plan | None] | None = None,
                 kube_status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.netfilter = netfilter
        self.plan = plan
        self.interval = interval
        self.clock: Clock = clock or SystemClock()
        self.cache = cache
        self.metrics = metrics
        self.state_dir = state_dir
        self.replan = replan
        self._kube_status = kube_status
        self.state = AgentState()
        self._wakeup = threading.Event()
        # the loop and the cache's heartbeat both write the status file
        self._status_lock = threading.Lock()

    def wake(self) -> None:
        """Make the loop turn now (new facts, or a stop request)."""
        self._wakeup.set()

    def kube_status(self) -> dict[str, Any] | None:
        return self._kube_status() if self._kube_status is not None else None

    def sync(self) -> bool:
        """Reconcile once; True when the kernel holds exactly the plan afterwards."""
        st = self.state
        start = self.clock.monotonic()
        st.syncs += 1
        wrote = False
        try:
            have = self.netfilter.observe()
            drift = self.netfilter.drift(self.plan, have)
            if drift:
                if st.in_sync:
                    st.outside_changes += 1
                    if self.metrics is not None:
                        self.metrics.outside_changes.inc()
                    log.warning("rules changed outside dnsguard, restoring: %s", _brief(drift))
                else:
                    log.info("kernel differs from plan: %s", _brief(drift))
                written = self.netfilter.apply(self.plan, have)
                st.writes += 1
                wrote = True
                log.info("applied %s", ", ".join(written) or "nothing")
                drift = self.netfilter.drift(self.plan)
                if drift:
                    raise NetfilterError("kernel does not hold the plan after apply: "
                                         + _brief(drift))
        except NetfilterError as exc:
            st.in_sync = False
            st.failures[exc.reason] += 1
            st.consecutive_failures += 1
            st.last_error = str(exc)
            if self.metrics is not None:
                self.metrics.sync_errors.labels(exc.reason).inc()
            log.error("sync failed: %s", exc)
            if isinstance(exc, RestoreFailed) and exc.context:
                log.error("input around the failing line:\n%s", exc.context)
            return False
        finally:
            st.last_sync_seconds = self.clock.monotonic() - start
            if self.metrics is not None:
                self.metrics.sync_duration.labels("write" if wrote else "noop").observe(
                    st.last_sync_seconds)
        st.in_sync = True
        st.consecutive_failures = 0
        st.last_error = ""
        st.last_drift = tuple(drift)
        st.last_sync_at = self.clock.monotonic()
        st.last_sync_wall = time.time()
        return True

    def next_delay(self) -> float:
        """Seconds until the next sync: the interval, or a capped backoff after failures."""
        n = self.state.consecutive_failures
        if n == 0:
            return self.interval
        return min(self.interval, MIN_BACKOFF_SECONDS * float(2 ** (n - 1)))

    def _take_new_plan(self) -> bool:
        """Adopt a new plan from `replan`; True when it differs from the current one."""
        if self.replan is None:
            return False
        new = self.replan()
        if new is None or new == self.plan:
            return False
        self.state.replans += 1
        log.info("facts changed: new plan with %d rules", new.rule_count)
        self.plan = new
        self.state.in_sync = False  # the kernel now differs by our own choice, not someone's
        if self.cache is not None and new.cache is not None:
            try:
                self.cache.update(new.cache)
            except NetfilterError as exc:
                log.error("could not update the cache: %s", exc)
        return True

    def run(self, stop: threading.Event) -> None:
        """Sync now, then every interval (sooner after failures or new facts) until ``stop``.

        With a node-local cache its heartbeat and upstream probe run on their own threads from
        here on; this loop still turns every `HEALTH_INTERVAL` for the status file. Whoever sets
        ``stop`` calls `wake` too.
        """
        if self.cache is not None:
            self.cache.start(stop, on_step=self.write_status)
        try:
            removed = self.netfilter.cleanup_other_backends()
            if removed:
                log.info("removed leftovers of another backend: %s", ", ".join(removed))
        except NetfilterError as exc:
            log.warning("could not check other backends for leftovers: %s", exc)
        next_sync = self.clock.monotonic()
        while not stop.is_set():
            self.state.last_loop_wall = time.time()
            if self._take_new_plan():
                next_sync = self.clock.monotonic()
            if self.clock.monotonic() >= next_sync:
                self.sync()
                next_sync = self.clock.monotonic() + self.next_delay()
            self.write_status()
            delay = max(0.0, next_sync - self.clock.monotonic())
            if self.cache is not None:
                delay = min(HEALTH_INTERVAL, delay)
            self.clock.wait(self._wakeup, delay)
            self._wakeup.clear()

    def report(self) -> dict[str, Any]:
        st = self.state
        doc: dict[str, Any] = {
            "in_sync": st.in_sync, "syncs": st.syncs, "writes": st.writes,
            "outside_changes": st.outside_changes, "replans": st.replans,
            "failures": dict(st.failures), "last_error": st.last_error,
            "rules": self.plan.rule_count,
        }
        if self.cache is not None:
            doc["cache"] = self.cache.report()
        kube = self.kube_status()
        if kube is not None:
            doc["kube"] = kube
        return doc

    def write_status(self) -> None:
        if self.state_dir is None:
            return
        try:
            with self._status_lock:
                write_status(self.state_dir, self.report())
        except OSError as exc:
            log.debug("cannot write status: %s", exc)

    def shutdown(self, drain: float, skip_teardown: bool, remove_rules: Callable[[], list[str]],
                 ) -> None:
        """Graceful hand-over: withdraw interception, drain, stop the cache, then clean up.

        In this order no lookup is lost: once the switch is withdrawn new queries take
        kube-proxy's path, and the cache still answers the ones already sent to it.
        """
        if self.cache is not None:
            self.cache.withdraw()
            self.write_status()
            if drain > 0:
                log.info("draining for %gs before stopping the cache", drain)
                self.clock.wait(threading.Event(), drain)
            self.cache.stop()
        if skip_teardown:
            log.info("--skip-teardown: leaving rules in place")
            return
        removed = remove_rules()
        if self.cache is not None:
            self.cache.teardown()
        log.info("teardown removed %s", ", ".join(removed) or "nothing")


def _brief(reasons: list[str], limit: int = 5) -> str:
    """The first few reasons: a first sync at 10k Services would otherwise log 10k chains."""
    more = len(reasons) - limit
    return "; ".join(reasons[:limit]) + (f"; and {more} more" if more > 0 else "")
