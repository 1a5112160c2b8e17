"""The node-local cache at run time: link, unbound, health, and the dead man's switch.

The fail-open state machine lives here, behind five small seams so unit tests drive it without
root and without sleeping: a monotonic clock (`Monotonic`), the `HealthChecker` (real DNS
queries), the `CacheProcess` (unbound), the `Switch` (the dead man's switch) and the `Link`
(``dnsguard0``).

`beat` runs every `HEALTH_INTERVAL` on its own thread (the heartbeat), never behind a sync. It
refreshes the switch only for the listen addresses whose real query on port 53 (the door pods
use) got the cache's own answer, while the link is up; anything else withdraws the affected
addresses at once, so pods fall back to kube-proxy's path within one beat instead of after
`ALIVE_SECONDS`. A broken link is repaired when it can be. If the agent itself dies, the switch
expires within `ALIVE_SECONDS`. A cache that exits is restarted with backoff (1, 2, 4 s).

`probe_upstream` runs every `UPSTREAM_PROBE_EVERY` on a second thread, so a slow upstream never
delays a refresh. When the cache cannot reach the cluster DNS, the same question is asked
through kube-proxy's path: if that fails too, nothing would be gained by failing open (pods
would reach the same dead cluster DNS), so interception stays and the cache serves stale
answers; only when kube-proxy's path answers while the cache's does not is interception
withdrawn (failed open).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dnsguard.cache import health
from dnsguard.cache.unbound import CacheError, Unbound
from dnsguard.model import ALIVE_SECONDS, Backend, IPAddress
from dnsguard.netfilter.alive import AliveSwitch
from dnsguard.netfilter.errors import NetfilterError
from dnsguard.netfilter.runner import Runner
from dnsguard.node.links import LINK, ensure_link, remove_link
from dnsguard.plan.cache import CacheSpec, render_unbound

__all__ = [
    "HEALTH_INTERVAL",
    "STATE_FILES",
    "CacheProcess",
    "CacheRuntime",
    "CacheState",
    "HealthChecker",
    "Link",
    "Monotonic",
    "NodeLink",
    "QueryChecker",
    "Switch",
    "Upstream",
]

log = logging.getLogger("dnsguard.cache")

HEALTH_INTERVAL = 0.5
UPSTREAM_PROBE_EVERY = 5.0
UPSTREAM_PROBE_TIMEOUT = 1.0
UPSTREAM_FAILURES_TO_FAIL_OPEN = 2
#: restarts wait 1, 2, 4, 4, ... s: a crash loop costs little, a one-off crash little time
MAX_RESTART_BACKOFF = 4.0
#: Everything dnsguard writes in its state directory; cleanup removes exactly these.
STATE_FILES = ("unbound.conf", "unbound.log", "unbound.log.1", "unbound.ctl", "status.json")

#: seconds from an arbitrary origin that never go back (time.monotonic, or a test's fake)
Monotonic = Callable[[], float]


class HealthChecker(Protocol):
    """Real DNS questions the agent asks from the node."""

    def doors(self, addrs: Sequence[IPAddress]) -> dict[IPAddress, str | None]:
        """Per address: None when a query to ADDR:53 got the cache's own health answer."""
        ...

    def upstream(self, port: int, domain: str) -> str | None:
        """None when the cache reached the cluster DNS for a name it cannot have cached."""
        ...

    def bypass(self, cluster_ip: IPAddress, domain: str) -> str | None:
        """None when the cluster DNS answered through kube-proxy's path (not the cache)."""
        ...


class CacheProcess(Protocol):
    """The cache daemon (`dnsguard.cache.unbound.Unbound`)."""

    #: called from another thread the moment the process exits
    on_exit: Callable[[], None] | None

    @property
    def pid(self) -> int | None: ...

    def running(self) -> bool: ...

    def start(self) -> None: ...

    def exit_reason(self) -> str: ...

    def stop(self) -> None: ...

    def reload(self) -> str:
        """Apply the written config; returns how (kept the cache, full reload, restart)."""
        ...

    def write_config(self, text: str) -> bool: ...

    def forget_down_upstreams(self) -> None:
        """Drop what the daemon learnt about unreachable upstreams (unbound: ``flush_infra``)."""
        ...


class Switch(Protocol):
    """The dead man's switch (`dnsguard.netfilter.alive.AliveSwitch`)."""

    def refresh(self, addrs: Iterable[IPAddress]) -> None: ...

    def withdraw(self, addrs: Iterable[IPAddress] | None = None) -> None: ...


class Link(Protocol):
    """``dnsguard0`` and the listen addresses on it."""

    def check(self, addrs: Sequence[IPAddress], *, deep: bool = False) -> str | None:
        """None when the link is there and up (``deep``: and holds every address)."""
        ...

    def repair(self, addrs: Sequence[IPAddress]) -> str:
        """Re-create what is missing; the link's kind. Raises NetfilterError when it cannot."""
        ...


class Upstream(enum.Enum):
    """How the cache reaches the cluster DNS (``cache.upstream`` in status, and a metric)."""

    UNKNOWN = "unknown"
    OK = "ok"
    #: unreachable from the cache and through kube-proxy's path: keep intercepting, serve stale
    SERVING_STALE = "serving-stale"
    #: the cache's own path is broken while kube-proxy's works: interception withdrawn
    FAILED_OPEN = "failed-open"


@dataclass
class CacheState:
    healthy: bool = False
    intercepting: bool = False
    reason: str = "starting"
    pid: int | None = None
    restarts: int = 0
    fail_opens: int = 0
    link_kind: str = ""
    #: `Upstream` value
    upstream: str = Upstream.UNKNOWN.value
    #: "ok", or what is wrong with dnsguard0
    link: str = "ok"
    link_repairs: int = 0
    #: listen addresses whose door query failed on the last beat, with why
    failing: dict[str, str] = field(default_factory=dict)


class CacheRuntime:
    def __init__(self, spec: CacheSpec, state_dir: Path, runner: Runner, backend: Backend, *,
                 monotonic: Monotonic = time.monotonic,
                 unbound: CacheProcess | None = None, alive: Switch | None = None,
                 checker: HealthChecker | None = None, link: Link | None = None) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.runner = runner
        self.monotonic = monotonic
        self.unbound: CacheProcess = unbound or Unbound(state_dir)
        self.alive: Switch = alive or AliveSwitch(runner, backend)
        self.checker: HealthChecker = checker or QueryChecker()
        self.link: Link = link or NodeLink(runner)
        self.state = CacheState()
        # serialises refresh and withdraw between the heartbeat, the unbound exit watcher and
        # shutdown; `_withdrawn` is read under it, so no refresh can follow shutdown's withdraw
        self._switch = threading.Lock()
        # serialises link changes between the heartbeat's repair and `update`
        self._link_lock = threading.Lock()
        self.unbound.on_exit = self._on_exit
        self._next_restart = 0.0
        self._backoff = 1.0
        self._started = False
        self._reloading = False
        self._upstream_failures = 0
        self._upstream_reason = ""
        self._withdrawn = False
        #: addresses the switch holds (as far as we know): withdrawn at once when they fail
        self._live: set[IPAddress] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Link, addresses and config; raises on what the operator must fix (no cache started)."""
        with self._link_lock:
            self.state.link_kind = ensure_link(self.runner, self.spec.listen)
        self.unbound.write_config(render_unbound(self.spec, self.state_dir))

    def update(self, spec: CacheSpec) -> None:
        """New upstreams or addresses: rewrite the config and reload unbound in place."""
        if spec.listen != self.spec.listen:
            with self._link_lock:
                self.state.link_kind = self.link.repair(spec.listen)
        self.spec = spec
        if self.unbound.write_config(render_unbound(spec, self.state_dir)) and \
                self.unbound.running():
            # while unbound reloads it does not answer: the heartbeat neither refreshes nor
            # withdraws meanwhile, so a reload shorter than ALIVE_SECONDS costs no lookup
            self._reloading = True
            try:
                self.unbound.reload()
            finally:
                self._reloading = False

    def start(self, stop: threading.Event,
              on_step: Callable[[], None] | None = None) -> list[threading.Thread]:
        """The heartbeat and upstream-probe threads, running until `stop` ends the cache.

        ``on_step`` runs after every beat and probe (the agent writes its status file there:
        its own loop may be stuck in a slow sync, and status must not look stale meanwhile).

        The heartbeat thread starts (and restarts) unbound, and unbound's parent-death signal
        fires when the *thread* that forked it ends (PR_SET_PDEATHSIG): so the heartbeat lives
        until the cache is stopped, never just until ``stop`` is set, or unbound would be killed
        before the drain that lets it answer the queries already sent to it. After ``stop`` or
        `withdraw` it only idles.
        """
        def every(seconds: float, step: Callable[[], None]) -> Callable[[], None]:
            def loop() -> None:
                while not self._closed.is_set():
                    began = time.monotonic()
                    if not stop.is_set() and not self._withdrawn:
                        try:
                            step()
                            if on_step is not None:
                                on_step()
                        except Exception:  # the heartbeat must outlive any one bad beat
                            log.exception("cache health step failed")
                    self._closed.wait(max(0.0, seconds - (time.monotonic() - began)))
            return loop

        threads = [
            threading.Thread(target=every(HEALTH_INTERVAL, self.beat), daemon=True,
                             name="heartbeat"),
            threading.Thread(target=every(UPSTREAM_PROBE_EVERY, self.probe_upstream),
                             daemon=True, name="upstream-probe"),
        ]
        for t in threads:
            t.start()
        self._threads = threads
        return threads

    # -- the heartbeat ------------------------------------------------------------------------
    def beat(self) -> None:
        """One health tick: process, link, doors, then refresh or withdraw (never blocks long)."""
        if self._withdrawn or self._reloading:
            return
        now = self.monotonic()
        if not self.unbound.running():
            self._process_down(now)
            return
        if self.state.pid is None:
            self.state.pid = self.unbound.pid
        spec = self.spec
        listen = spec.listen
        # every beat, before the doors: a missing address is found in microseconds, whereas
        # its door query would only tell after its timeout
        broken = self.link.check(listen, deep=True)
        if broken is not None and not self._repair(listen, broken):
            return
        self.state.link = "ok"
        # after a repair too: interception resumes in the beat that repaired the link
        doors = self.checker.doors(listen)
        failing = {a: why for a in listen if (why := doors.get(a, "not asked")) is not None}
        answering = [a for a in listen if a not in failing]
        self._withdraw_now([a for a in failing if a in self._live], "its door query failed")
        self.state.failing = {str(a): why for a, why in failing.items()}
        if not answering:
            self._set_unhealthy(_door_reason(failing))
            return
        if self.state.upstream == Upstream.FAILED_OPEN.value:
            self._set_unhealthy(self._upstream_reason, healthy=True)
            return
        self._refresh(answering, failing)

    def _process_down(self, now: float) -> None:
        st = self.state
        if st.pid is not None:  # it died since the last beat (the watcher withdrew already)
            self._withdraw_now(None, "unbound is not running")
            self._set_unhealthy(self.unbound.exit_reason())
            st.pid = None
            self._schedule_restart(now)
        if now < self._next_restart or self._withdrawn:
            return
        try:
            self.unbound.start()
        except CacheError as exc:
            self._set_unhealthy(str(exc))
            self._schedule_restart(now)
            return
        st.pid = self.unbound.pid
        if self._started:
            st.restarts += 1
        self._started = True

    def _schedule_restart(self, now: float) -> None:
        self._next_restart = now + self._backoff
        self._backoff = min(self._backoff * 2, MAX_RESTART_BACKOFF)

    def _repair(self, listen: Sequence[IPAddress], broken: str) -> bool:
        """Withdraw (pods' packets may go nowhere), then re-create the link; True when done."""
        st = self.state
        self._withdraw_now(listen, broken)
        if st.link != broken:
            log.warning("%s: interception withdrawn, repairing", broken)
        st.link = broken
        try:
            with self._link_lock:
                st.link_kind = self.link.repair(listen)
            still = self.link.check(listen, deep=True)
        except NetfilterError as exc:
            still = f"{broken}; repair failed: {exc}"
        if still is not None:
            st.link = still
            self._set_unhealthy(still)
            return False
        st.link = "ok"
        st.link_repairs += 1
        log.warning("repaired %s (%s)", LINK, broken)
        return True

    def _refresh(self, answering: list[IPAddress], failing: dict[IPAddress, str]) -> None:
        st = self.state
        self._backoff = 1.0
        with self._switch:
            if self._withdrawn or not self.unbound.running():  # shutdown, or died meanwhile
                return
            try:
                self.alive.refresh(answering)
            except NetfilterError as exc:  # rules not installed yet: the next sync does it
                st.healthy, st.intercepting, st.reason = True, False, f"cannot intercept: {exc}"
                return
            self._live.update(answering)
        if not st.intercepting and not failing:
            log.info("cache healthy: intercepting DNS to %s",
                     ", ".join(str(a) for a in answering))
        if st.intercepting and failing:  # withdrawn for some addresses: a fail-open too
            st.fail_opens += 1
        st.healthy, st.intercepting = True, not failing
        if failing:
            st.reason = _door_reason(failing)
        elif st.upstream == Upstream.SERVING_STALE.value:
            st.reason = f"serving stale answers: {self._upstream_reason}"
        else:
            st.reason = "healthy"

    def _on_exit(self) -> None:
        """The cache died: stop steering queries to it now, not when the switch expires."""
        self._withdraw_now(None, "unbound exited")

    def _withdraw_now(self, addrs: Sequence[IPAddress] | None, why: str) -> None:
        """Take ``addrs`` (None: all) out of the switch at once; it expires anyway if this fails."""
        if addrs is not None and not addrs:
            return
        with self._switch:
            try:
                self.alive.withdraw(addrs)
            except NetfilterError as exc:
                log.warning("could not withdraw interception at once (%s); it expires in %ss",
                            exc, ALIVE_SECONDS)
            if addrs is None:
                self._live.clear()
            else:
                self._live.difference_update(addrs)
        if self.state.intercepting:
            log.warning("%s: interception withdrawn at once", why)

    def _set_unhealthy(self, reason: str, healthy: bool = False) -> None:
        st = self.state
        if st.intercepting or st.healthy != healthy or st.reason != reason:
            log.warning("cache unhealthy (%s): DNS falls back to kube-proxy's path", reason)
        if self._live:
            self._withdraw_now(None, reason)
        if st.intercepting:
            st.fail_opens += 1
        st.healthy, st.intercepting, st.reason = healthy, False, reason

    # -- the upstream probe -------------------------------------------------------------------
    def probe_upstream(self) -> None:
        """Compare the cache's path to the cluster DNS with kube-proxy's; set `state.upstream`."""
        if self._withdrawn or not self.unbound.running():
            return
        spec = self.spec
        why = self.checker.upstream(spec.health_port, spec.cluster_domain)
        if why is None:
            self._upstream_failures = 0
            self._set_upstream(Upstream.OK, "")
            return
        self._upstream_failures += 1
        if not spec.cluster_ips:
            self._set_upstream(Upstream.SERVING_STALE,
                               f"{why}; no DNS ClusterIP to compare with kube-proxy's path")
            return
        others = []
        for ip in spec.cluster_ips:
            other = self.checker.bypass(ip, spec.cluster_domain)
            if other is None:
                break
            others.append(f"{ip}: {other}")
        else:
            self._set_upstream(Upstream.SERVING_STALE,
                               f"{why}; kube-proxy's path fails too ({'; '.join(others)})")
            return
        # The cluster DNS answers, the cache does not reach it: most often unbound still holds
        # the upstreams as down from an outage that has ended (its infra cache keeps that for
        # minutes). Forget that and ask again before failing open; failing open is for a cache
        # path that stays broken.
        self.unbound.forget_down_upstreams()
        if self.checker.upstream(spec.health_port, spec.cluster_domain) is None:
            log.info("the cache reaches the cluster DNS again after forgetting the upstreams it "
                     "had marked down")
            self._upstream_failures = 0
            self._set_upstream(Upstream.OK, "")
            return
        if self._upstream_failures >= UPSTREAM_FAILURES_TO_FAIL_OPEN:
            self._set_upstream(Upstream.FAILED_OPEN, f"{why} while kube-proxy's path answers")

    def _set_upstream(self, state: Upstream, reason: str) -> None:
        if self.state.upstream != state.value:
            log.log(logging.INFO if state is Upstream.OK else logging.WARNING,
                    "cluster DNS upstreams: %s%s", state.value, f" ({reason})" if reason else "")
        self._upstream_reason = reason
        self.state.upstream = state.value

    # -- shutdown -----------------------------------------------------------------------------
    def withdraw(self) -> None:
        """Graceful hand-over: stop intercepting now; the cache keeps answering what it has."""
        with self._switch:  # after this, no refresh: `_refresh` checks the flag under the lock
            self._withdrawn = True
        self._withdraw_now(None, "shutdown")
        self.state.intercepting = False
        self.state.reason = "withdrawn for shutdown"

    def stop(self, join_timeout: float = 5.0) -> None:
        """Stop the cache after `withdraw` (the heartbeat idles since), then end the threads."""
        self.unbound.stop()
        self.state.pid = None
        self._closed.set()
        for t in self._threads:
            t.join(join_timeout)

    def teardown(self) -> None:
        """Remove the link and the files dnsguard wrote; the state directory itself stays."""
        remove_link(self.runner)
        for name in STATE_FILES:
            (self.state_dir / name).unlink(missing_ok=True)

    def report(self) -> dict[str, Any]:
        return asdict(self.state)


def _door_reason(failing: dict[IPAddress, str]) -> str:
    return "; ".join(f"no health answer on {a}:53: {why}" for a, why in failing.items())


class QueryChecker:
    """`HealthChecker` with real queries (`dnsguard.cache.health`)."""

    def doors(self, addrs: Sequence[IPAddress]) -> dict[IPAddress, str | None]:
        return health.check_doors(addrs)

    def upstream(self, port: int, domain: str) -> str | None:
        return health.check_upstream(port, domain, timeout=UPSTREAM_PROBE_TIMEOUT)

    def bypass(self, cluster_ip: IPAddress, domain: str) -> str | None:
        return health.check_bypass(cluster_ip, domain, timeout=UPSTREAM_PROBE_TIMEOUT)


#: <linux/sockios.h>, <linux/if.h>
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1


class NodeLink:
    """`Link` for ``dnsguard0`` in the agent's network namespace.

    The every-beat check costs no exec: one SIOCGIFFLAGS ioctl (exists, administratively up).
    It asks the kernel of the agent's own namespace, which /sys/class/net would not when sysfs
    was mounted by another namespace. Carrier is deliberately not checked: a port-less bridge
    (kernels without dummy links) has none and still holds local addresses. The deep check
    binds a socket to each address without IP_FREEBIND, which the kernel allows only for local
    addresses: a few syscalls, no exec.
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def check(self, addrs: Sequence[IPAddress], *, deep: bool = False) -> str | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                raw = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS,
                                  struct.pack("16sH14x", LINK.encode(), 0))
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    return f"link {LINK} missing"
                return f"cannot read link {LINK}: {exc.strerror or exc}"
        (flags,) = struct.unpack_from("H", raw, 16)
        if not flags & _IFF_UP:
            return f"link {LINK} down"
        if deep:
            missing = [str(a) for a in addrs if not _is_local(a)]
            if missing:
                return f"address {', '.join(missing)} missing on {LINK}"
        return None

    def repair(self, addrs: Sequence[IPAddress]) -> str:
        return ensure_link(self.runner, addrs)


def _is_local(addr: IPAddress) -> bool:
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    with socket.socket(fam, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((str(addr), 0))
        except OSError:
            return False
    return True
