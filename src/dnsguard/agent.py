"""The reconcile loop: keep the kernel holding exactly the plan, and notice when it stops.

Each sync reads what dnsguard owns (one save per table family), diffs it against the plan and
writes only when they differ. A difference after a sync that ended in sync means someone else
changed our rules (``iptables -t raw -F``, a restarted kube-proxy flushing tables): it is logged
and counted, then repaired by the same sync, so repair takes at most one interval. A failed sync
is retried with exponential backoff (1 s, 2 s, ... capped at the interval) on an injected clock,
never with ad-hoc sleeps; the previous rules stay as they were because every write is one
atomic transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dnsguard.cache.runtime import HEALTH_INTERVAL, CacheRuntime
from dnsguard.netfilter import Netfilter, NetfilterError, RestoreFailed
from dnsguard.plan import Plan

__all__ = ["Agent", "AgentState", "Clock", "SystemClock"]

log = logging.getLogger("dnsguard.agent")

#: First retry delay after a failed sync; doubles up to the sync interval.
MIN_BACKOFF_SECONDS = 1.0


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        """Block until ``stop`` is set or ``timeout`` passes; True when stopped."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        return stop.wait(timeout)


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


class Agent:
    def __init__(self, netfilter: Netfilter, plan: Plan, *, interval: float,
                 clock: Clock | None = None, cache: CacheRuntime | None = None) -> None:
        self.netfilter = netfilter
        self.plan = plan
        self.interval = interval
        self.clock: Clock = clock or SystemClock()
        self.cache = cache
        self.state = AgentState()

    def sync(self) -> bool:
        """Reconcile once; True when the kernel holds exactly the plan afterwards."""
        st = self.state
        start = self.clock.monotonic()
        st.syncs += 1
        try:
            drift = self.netfilter.drift(self.plan)
            if drift:
                if st.in_sync:
                    st.outside_changes += 1
                    log.warning("rules changed outside dnsguard, restoring: %s", "; ".join(drift))
                else:
                    log.info("kernel differs from plan: %s", "; ".join(drift))
                written = self.netfilter.apply(self.plan)
                st.writes += 1
                log.info("applied %s", ", ".join(written) or "nothing")
                drift = self.netfilter.drift(self.plan)
                if drift:
                    raise NetfilterError("kernel does not hold the plan after apply: "
                                         + "; ".join(drift))
        except NetfilterError as exc:
            st.in_sync = False
            st.failures[exc.reason] += 1
            st.consecutive_failures += 1
            st.last_error = str(exc)
            log.error("sync failed: %s", exc)
            if isinstance(exc, RestoreFailed) and exc.context:
                log.error("input around the failing line:\n%s", exc.context)
            return False
        finally:
            st.last_sync_seconds = self.clock.monotonic() - start
        st.in_sync = True
        st.consecutive_failures = 0
        st.last_error = ""
        st.last_drift = tuple(drift)
        st.last_sync_at = self.clock.monotonic()
        return True

    def next_delay(self) -> float:
        """Seconds until the next sync: the interval, or a capped backoff after failures."""
        n = self.state.consecutive_failures
        if n == 0:
            return self.interval
        return min(self.interval, MIN_BACKOFF_SECONDS * float(2 ** (n - 1)))

    def run(self, stop: threading.Event) -> None:
        """Sync now, then every interval (sooner after failures) until ``stop`` is set.

        With a node-local cache the loop also ticks the cache every `HEALTH_INTERVAL`; rule
        syncs keep their own cadence.
        """
        try:
            removed = self.netfilter.cleanup_other_backends()
            if removed:
                log.info("removed leftovers of another backend: %s", ", ".join(removed))
        except NetfilterError as exc:
            log.warning("could not check other backends for leftovers: %s", exc)
        next_sync = self.clock.monotonic()
        while not stop.is_set():
            now = self.clock.monotonic()
            if now >= next_sync:
                self.sync()
                next_sync = self.clock.monotonic() + self.next_delay()
            if self.cache is not None:
                self.cache.tick()
                delay = min(HEALTH_INTERVAL, max(0.0, next_sync - self.clock.monotonic()))
            else:
                delay = max(0.0, next_sync - self.clock.monotonic())
            if self.clock.wait(stop, delay):
                break

    def shutdown(self, drain: float, skip_teardown: bool, remove_rules: Callable[[], list[str]],
                 ) -> None:
        """Graceful hand-over: withdraw interception, drain, stop the cache, then clean up.

        In this order no lookup is lost: once the switch is withdrawn new queries take
        kube-proxy's path, and the cache still answers the ones already sent to it.
        """
        if self.cache is not None:
            self.cache.withdraw()
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
