"""The node-local cache at run time: link, unbound, health, and the dead man's switch.

`tick` runs every `HEALTH_INTERVAL`. While the cache answers its health query (and its last
upstream probe succeeded) the switch is refreshed, so interception stays on. When the agent
sees the cache fail (the exit watcher fires, or a health check fails) it withdraws the switch at
once; if the agent itself dies, the switch expires within `ALIVE_SECONDS`. Either way pods fall
back to kube-proxy's path. A cache that exits is restarted with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dnsguard.cache import health
from dnsguard.cache.unbound import CacheError, Unbound
from dnsguard.model import ALIVE_SECONDS, Backend
from dnsguard.netfilter.alive import AliveSwitch
from dnsguard.netfilter.errors import NetfilterError
from dnsguard.netfilter.runner import Runner
from dnsguard.node.links import ensure_link, remove_link
from dnsguard.plan.cache import CacheSpec, render_unbound

__all__ = ["HEALTH_INTERVAL", "STATE_FILES", "CacheRuntime", "CacheState"]

log = logging.getLogger("dnsguard.cache")

HEALTH_INTERVAL = 0.5
UPSTREAM_PROBE_EVERY = 5.0
UPSTREAM_PROBE_TIMEOUT = 1.0
UPSTREAM_FAILURES_TO_FAIL_OPEN = 2
MAX_RESTART_BACKOFF = 30.0
#: Everything dnsguard writes in its state directory; cleanup removes exactly these.
STATE_FILES = ("unbound.conf", "unbound.log", "unbound.log.1", "unbound.ctl", "status.json")


@dataclass
class CacheState:
    healthy: bool = False
    intercepting: bool = False
    reason: str = "starting"
    pid: int | None = None
    restarts: int = 0
    fail_opens: int = 0
    link_kind: str = ""


class CacheRuntime:
    def __init__(self, spec: CacheSpec, state_dir: Path, runner: Runner, backend: Backend, *,
                 monotonic: Callable[[], float] = time.monotonic,
                 unbound: Unbound | None = None, alive: AliveSwitch | None = None) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.runner = runner
        self.monotonic = monotonic
        self.unbound = unbound or Unbound(state_dir)
        self.alive = alive or AliveSwitch(runner, backend)
        self.state = CacheState()
        # serialises refresh and withdraw between the loop and the unbound exit watcher
        self._switch = threading.Lock()
        self.unbound.on_exit = self._on_exit
        self._next_restart = 0.0
        self._backoff = 1.0
        self._next_upstream_probe = 0.0
        self._upstream_failures = 0
        self._upstream_reason = ""
        self._withdrawn = False

    # -- lifecycle ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Link, addresses and config; raises on what the operator must fix (no cache started)."""
        self.state.link_kind = ensure_link(self.runner, self.spec.listen)
        self.unbound.write_config(render_unbound(self.spec, self.state_dir))

    def update(self, spec: CacheSpec) -> None:
        """New upstreams or addresses: rewrite the config and reload unbound in place."""
        if spec.listen != self.spec.listen:
            self.state.link_kind = ensure_link(self.runner, spec.listen)
        self.spec = spec
        if self.unbound.write_config(render_unbound(spec, self.state_dir)) and \
                self.unbound.running():
            self.unbound.reload()

    def tick(self) -> None:
        now = self.monotonic()
        st = self.state
        if not self.unbound.running():
            if st.pid is not None:
                self._set_unhealthy(self.unbound.exit_reason())
                st.pid = None
                self._next_restart = now + self._backoff
                self._backoff = min(self._backoff * 2, MAX_RESTART_BACKOFF)
            if now >= self._next_restart and not self._withdrawn:
                try:
                    self.unbound.start()
                    st.pid = self.unbound.pid
                    if st.restarts or st.reason != "starting":
                        st.restarts += 1
                except CacheError as exc:
                    self._set_unhealthy(str(exc))
                    self._next_restart = now + self._backoff
                    self._backoff = min(self._backoff * 2, MAX_RESTART_BACKOFF)
            return
        reason = health.check(self.spec.health_port)
        if reason is None and self._upstream_failures >= UPSTREAM_FAILURES_TO_FAIL_OPEN:
            reason = self._upstream_reason
        if reason is None:
            self._set_healthy()
        else:
            self._set_unhealthy(reason)
        # after the refresh, so a slow probe cannot leave a gap in the switch
        if now >= self._next_upstream_probe and self.unbound.running():
            self._next_upstream_probe = now + UPSTREAM_PROBE_EVERY
            up = health.check_upstream(self.spec.health_port, self.spec.cluster_domain,
                                       timeout=UPSTREAM_PROBE_TIMEOUT)
            self._upstream_failures = self._upstream_failures + 1 if up else 0
            self._upstream_reason = up or ""

    def _on_exit(self) -> None:
        """The cache died: stop steering queries to it now, not when the switch expires."""
        with self._switch:
            self._withdraw_switch()
        log.warning("unbound exited: interception withdrawn at once")

    def _withdraw_switch(self) -> None:
        try:
            self.alive.withdraw()
        except NetfilterError as exc:
            log.warning("could not withdraw interception at once (%s); it expires in %ss",
                        exc, ALIVE_SECONDS)

    def _set_healthy(self) -> None:
        st = self.state
        self._backoff = 1.0
        if self._withdrawn:
            return
        with self._switch:
            if not self.unbound.running():  # died since the health check answered
                return
            try:
                self.alive.refresh(self.spec.listen)
            except NetfilterError as exc:  # rules not installed yet: the next sync does it
                st.healthy, st.intercepting, st.reason = True, False, f"cannot intercept: {exc}"
                return
        if not st.intercepting:
            log.info("cache healthy: intercepting DNS to %s",
                     ", ".join(str(a) for a in self.spec.listen))
        st.healthy, st.intercepting, st.reason = True, True, "healthy"

    def _set_unhealthy(self, reason: str) -> None:
        st = self.state
        if st.intercepting or st.healthy or st.reason != reason:
            log.warning("cache unhealthy (%s): interception expires within %ss, DNS falls back "
                        "to kube-proxy's path", reason, ALIVE_SECONDS)
        if st.intercepting:
            st.fail_opens += 1
            with self._switch:  # the agent knows: no need to wait for the switch to expire
                self._withdraw_switch()
        st.healthy, st.intercepting, st.reason = False, False, reason

    def withdraw(self) -> None:
        """Graceful hand-over: stop intercepting now; the cache keeps answering what it has."""
        self._withdrawn = True
        with self._switch:
            self._withdraw_switch()
        self.state.intercepting = False
        self.state.reason = "withdrawn for shutdown"

    def stop(self) -> None:
        self.unbound.stop()
        self.state.pid = None

    def teardown(self) -> None:
        """Remove the link and the files dnsguard wrote; the state directory itself stays."""
        remove_link(self.runner)
        for name in STATE_FILES:
            (self.state_dir / name).unlink(missing_ok=True)

    def report(self) -> dict[str, Any]:
        return asdict(self.state)
