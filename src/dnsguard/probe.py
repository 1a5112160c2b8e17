"""DNS load and latency probe that sends lookups the way glibc does.

What a "lookup" is
------------------
glibc (and musl) resolve a name by sending the A and the AAAA query back to back from one UDP
socket, connected to the server, and waiting for both replies, which they pair with the queries
by ID. Each lookup uses a new socket, so a new source port, so a new conntrack entry. That
pattern is exactly what races in conntrack; the probe reproduces it, one socket per lookup (and
per search-list step with ``--search``, expanding names through resolv.conf's search list and
ndots like ``res_nsearch``). A lookup that has not got every reply within ``timeout`` of its
start is a *timeout*: the probe does not retry, because the retry is what hides the problem
(glibc's retry is the famous 5 s stall).

Why one thread with epoll
-------------------------
The generator must not be the bottleneck on a 2-core node, where the DNS server needs the other
core. Threads would spend the core on the GIL and context switches; a single epoll loop over
non-blocking sockets costs a handful of syscalls per lookup and no locks. Concurrency is the
number of lookups in flight (closed loop); an optional ``rate`` paces launches instead (the
doctor's low-rate probe). ``--via getaddrinfo`` has to block in libc, so it uses threads.

Measured ceiling (2-core VM, Linux 6.18, probe and server in two namespaces over a veth, 5 s
runs, concurrency 32): one process drives about 17-18k lookups/s (35k queries/s) against a
local unbound and 13k against dnsmasq when the machine is otherwise idle, 10-12k when another
process holds one core; ``--workers 2`` gets about 22k (idle). The probe is the busier side:
about 60 us of CPU per lookup, two thirds of it in the kernel (socket, connect, and the veth
delivery of the queries, which runs in the sender's context), against about 25 us for unbound.
So one probe process keeps a single-threaded cache ~40% busy; saturating one takes
``--workers`` and spare cores. That is plenty for what the probe is for: finding the slow tail
at realistic rates, not benchmarking the server.

Bounds
------
No lookup starts after ``duration`` or once ``count`` have started; lookups still in flight get
at most their own ``timeout`` to finish, so a run never lasts longer than
``duration + timeout``.

Results are aggregated as they arrive (latencies in a flat ``array``, rcodes in a Counter, the
first `MAX_SLOW_EVENTS` slow lookups with their offsets), so a long run at full speed costs
8 bytes per lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import math
import multiprocessing
import random
import resource
import select
import signal
import socket
import struct
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from typing import Any, Literal

from dnsguard.dnswire import (
    QType,
    build_query,
    encode_name,
    query_id,
    rcode_name,
)
from dnsguard.model import IPAddress
from dnsguard.node.procnet import ResolvConf
from dnsguard.stats import SLOW_SECONDS, percentile

__all__ = [
    "MAX_SLOW_EVENTS",
    "ProbeConfig",
    "ProbeError",
    "ProbeReport",
    "Progress",
    "SlowLookup",
    "run_probe",
]

Via = Literal["wire", "getaddrinfo"]
Clock = Callable[[], float]

#: How many slow lookups are listed individually (the counts cover all of them).
MAX_SLOW_EVENTS = 200
#: Latency from which a lookup is "slow" (reported with its offset): the lab's and the
#: benchmarks' threshold, so their numbers and the probe's compare.
SLOW = SLOW_SECONDS
#: Percentiles reported (nearest rank, `dnsguard.stats.percentile`).
QUANTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class ProbeConfig:
    """What to send, where, how much. Durations in seconds (float)."""

    server: IPAddress | None
    names: tuple[str, ...]
    port: int = 53
    concurrency: int = 10
    duration: float = 10.0
    count: int | None = None
    timeout: float = 5.0
    qtypes: tuple[QType, ...] = (QType.A, QType.AAAA)
    via: Via = "wire"
    resolv: ResolvConf | None = None  # set: expand names like res_nsearch
    rate: float | None = None  # lookups/s cap; None: as fast as concurrency allows

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("at least one name to look up")
        if self.via == "wire" and self.server is None:
            raise ValueError("a server address is needed unless via getaddrinfo")
        if self.concurrency < 1 or self.timeout <= 0 or self.duration < 0:
            raise ValueError("concurrency >= 1, timeout > 0 and duration >= 0")


class ProbeError(RuntimeError):
    """The probe itself failed (not the DNS server): a worker process died."""


@dataclass(frozen=True)
class SlowLookup:
    offset: float  # seconds from the start of the run
    latency: float | None  # None: timed out
    name: str
    outcome: str


@dataclass(frozen=True)
class Progress:
    elapsed: float
    duration: float
    started: int
    finished: int
    slow: int
    timeouts: int
    count: int | None


@dataclass
class _Tally:
    """Results folded in as lookups finish.

    Only answered lookups have a latency; a lookup that timed out or failed is stored as
    +inf, so it sorts above every answer and a percentile that lands on it is "no answer",
    never a fast number (a quick ECONNREFUSED must not make the server look fast).
    """

    latencies: array[float] = field(default_factory=lambda: array("d"))
    rcodes: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    slow_events: list[SlowLookup] = field(default_factory=list)
    slow: int = 0
    queries: int = 0

    def add(self, offset: float, latency: float | None, name: str, outcome: str, *,
            rcodes: Sequence[str], queries: int) -> None:
        answered = outcome == "ok" and latency is not None
        self.latencies.append(latency if answered and latency is not None else math.inf)
        self.outcomes[outcome] += 1
        self.rcodes.update(rcodes)
        self.queries += queries
        if not answered or (latency is not None and latency >= SLOW):
            self.slow += 1
            if len(self.slow_events) < MAX_SLOW_EVENTS:
                self.slow_events.append(SlowLookup(
                    round(offset, 3), latency if answered else None, name, outcome))


@dataclass(frozen=True)
class ProbeReport:
    """A finished run. Latency statistics count unanswered lookups (timed out or failed) as
    infinitely slow, so a percentile that lands on one reads None ("unanswered") instead of
    hiding it."""

    target: str
    via: str
    concurrency: int
    elapsed: float
    lookups: int
    queries: int
    timeout: float
    percentiles: dict[str, float | None]
    max: float | None
    at_least_1s: int
    at_least_5s: int
    timeouts: int
    errors: dict[str, int]
    rcodes: dict[str, int]
    slow: tuple[SlowLookup, ...]  # the first MAX_SLOW_EVENTS of them
    slow_count: int  # lookups that took >= 1 s, timed out or failed

    @property
    def rate(self) -> float:
        return self.lookups / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def answered(self) -> int:
        return self.lookups - self.timeouts - sum(self.errors.values())

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target, "via": self.via, "concurrency": self.concurrency,
            "elapsed_seconds": round(self.elapsed, 3), "lookups": self.lookups,
            "lookups_per_second": round(self.rate, 1), "queries": self.queries,
            "timeout_seconds": self.timeout,
            "latency_seconds": {**{k: _r(v) for k, v in self.percentiles.items()},
                                "max": _r(self.max)},
            "at_least_1s": self.at_least_1s, "at_least_5s": self.at_least_5s,
            "timeouts": self.timeouts, "slow_count": self.slow_count,
            "errors": dict(self.errors), "rcodes": dict(self.rcodes),
            "slow": [{"offset_seconds": s.offset, "latency_seconds": _r(s.latency),
                      "name": s.name, "outcome": s.outcome} for s in self.slow],
        }

    def render(self) -> str:
        def ms(v: float | None) -> str:
            if v is None:
                return "unanswered" if self.lookups else "-"
            return f"{v * 1000:.1f}ms" if v < 1 else f"{v:.2f}s"

        lines = [
            f"probe {self.target} via {self.via}: {self.lookups} lookups in {self.elapsed:.1f}s "
            f"({self.rate:.1f}/s), concurrency {self.concurrency}, {self.queries} queries",
            "latency  " + "  ".join(f"{k} {ms(v)}" for k, v in self.percentiles.items())
            + f"  max {ms(self.max)}",
            f"slow     >=1s {self.at_least_1s}  >=5s {self.at_least_5s}  "
            f"timeouts {self.timeouts} (after {self.timeout:g}s)  "
            f"errors {sum(self.errors.values())}"
            + ("".join(f"  {k} {v}" for k, v in sorted(self.errors.items()))),
            "rcodes   " + ("  ".join(f"{k} {v}" for k, v in sorted(self.rcodes.items()))
                           or "(no replies)"),
        ]
        if self.slow:
            shown = ", ".join(
                f"{s.offset:.2f}s ({'timeout' if s.latency is None else f'{s.latency:.2f}s'}"
                f"{'' if s.outcome in ('ok', 'timeout') else ' ' + s.outcome})"
                for s in self.slow[:20])
            more = len(self.slow) - 20
            lines.append(f"slow lookups at: {shown}" + (f" (+{more} more)" if more > 0 else ""))
        return "\n".join(lines)


def _r(v: float | None) -> float | None:
    return None if v is None or math.isinf(v) else round(v, 6)


def _summarize(cfg: ProbeConfig, target: str, tally: _Tally, elapsed: float) -> ProbeReport:
    ordered = sorted(tally.latencies)
    pcts = {f"p{q:g}": percentile(ordered, q) for q in QUANTILES}
    # NaN: no lookups at all; inf: the percentile lands on an unanswered lookup.
    finite = {k: (None if math.isnan(v) or math.isinf(v) else v) for k, v in pcts.items()}
    timeouts = tally.outcomes.get("timeout", 0)
    top = ordered[-1] if ordered else None
    answered_slow = [v for v in ordered if not math.isinf(v)]
    return ProbeReport(
        target=target, via=cfg.via, concurrency=cfg.concurrency, elapsed=elapsed,
        lookups=len(ordered), queries=tally.queries, timeout=cfg.timeout, percentiles=finite,
        max=None if top is None or math.isinf(top) else top,
        # A timed-out lookup took at least `timeout`: count it where that bound reaches.
        at_least_1s=sum(1 for v in answered_slow if v >= 1.0)
        + (timeouts if cfg.timeout >= 1.0 else 0),
        at_least_5s=sum(1 for v in answered_slow if v >= 5.0)
        + (timeouts if cfg.timeout >= 5.0 else 0),
        timeouts=timeouts,
        errors={k: v for k, v in sorted(tally.outcomes.items()) if k not in ("ok", "timeout")},
        rcodes=dict(sorted(tally.rcodes.items())),
        slow=tuple(tally.slow_events),
        slow_count=tally.slow,
    )


_ID_FLAGS_COUNTS = struct.Struct("!HHHH")
_RCODES = tuple(rcode_name(i) for i in range(16))


class _Flight:
    """One lookup in flight: its socket, the IDs it waits for, where it is in the search list.

    The state machine (`on_reply`) is separate from the socket loop so it can be reasoned
    about alone: a reply counts only if its ID is one we sent and still wait for (a stub
    resolver drops anything else), and the lookup is done when every query has its reply.
    """

    __slots__ = ("candidates", "deadline", "done", "name", "pending", "queries", "rcodes",
                 "sock", "start", "step", "success")

    def __init__(self, name: str, candidates: tuple[bytes, ...], start: float,
                 deadline: float) -> None:
        self.name = name
        self.candidates = candidates
        self.start = start
        self.deadline = deadline
        self.step = 0
        self.pending: dict[int, int] = {}  # query ID -> qtype
        self.rcodes: list[str] = []
        self.success = False
        self.queries = 0
        self.done = False
        self.sock: socket.socket | None = None

    def on_reply(self, data: bytes) -> bool:
        """Fold in one datagram; True when the current step has all its replies.

        Reads only ID, flags and answer count (the hot path of the probe: no `Header` object).
        """
        if len(data) < 12:
            return False
        qid, flags, _, ancount = _ID_FLAGS_COUNTS.unpack_from(data)
        if not flags & 0x8000 or qid not in self.pending:
            return False
        del self.pending[qid]
        rcode = flags & 0xF
        self.rcodes.append(_RCODES[rcode])
        if rcode == 0 and ancount > 0:
            self.success = True
        return not self.pending

    def next_step(self) -> bool:
        """After a step completed: move to the next search candidate if glibc would."""
        if self.success or self.step + 1 >= len(self.candidates):
            return False
        self.step += 1
        return True


class _WireProbe:
    """The epoll loop. Not thread-safe; one instance per run."""

    def __init__(self, cfg: ProbeConfig, clock: Clock,
                 progress: Callable[[Progress], None] | None, progress_every: float,
                 stop: threading.Event | None) -> None:
        assert cfg.server is not None
        self.cfg = cfg
        self.clock = clock
        self.progress = progress
        self.progress_every = progress_every
        self.stop = stop
        self.family = socket.AF_INET if cfg.server.version == 4 else socket.AF_INET6
        self.addr = (str(cfg.server), cfg.port)
        self.tally = _Tally()
        self.flights: dict[int, _Flight] = {}
        self.deadlines: deque[_Flight] = deque()  # same timeout for all: FIFO == deadline order
        self.ep = select.epoll()
        self.started = 0
        # Encode every candidate name once: the hot loop only packs headers.
        self.plans: list[tuple[str, tuple[bytes, ...]]] = []
        for name in cfg.names:
            cands = cfg.resolv.expand(name) if cfg.resolv else (name.rstrip("."),)
            self.plans.append((name, tuple(encode_name(c) for c in cands)))
        self.rng = random.Random()

    def _send_step(self, f: _Flight) -> str | None:
        """Open a new socket (new source port) and send all queries of the current step."""
        try:
            sock = socket.socket(self.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            return f"socket: {errno.errorcode.get(exc.errno or 0, exc)}"
        try:
            sock.connect(self.addr)
            wire = f.candidates[f.step]
            f.pending = {}
            for qtype in self.cfg.qtypes:
                qid = query_id(self.rng)
                while qid in f.pending:
                    qid = query_id(self.rng)
                f.pending[qid] = qtype
                sock.send(build_query(wire, qtype, qid))
                f.queries += 1
        except OSError as exc:
            sock.close()
            return _oserror_outcome(exc)
        f.sock = sock
        fd = sock.fileno()
        self.flights[fd] = f
        self.ep.register(fd, select.EPOLLIN)
        return None

    def _close(self, f: _Flight) -> None:
        # Closing the only descriptor of a socket also drops it from the epoll set: no
        # EPOLL_CTL_DEL syscall needed.
        if f.sock is not None:
            self.flights.pop(f.sock.fileno(), None)
            f.sock.close()
            f.sock = None

    def _finish(self, f: _Flight, now: float, outcome: str, t0: float) -> None:
        self._close(f)
        f.done = True
        latency = None if outcome == "timeout" else now - f.start
        self.tally.add(f.start - t0, latency, f.name, outcome, rcodes=f.rcodes,
                       queries=f.queries)

    def _launch(self, now: float, t0: float) -> None:
        name, cands = self.plans[self.started % len(self.plans)]
        self.started += 1
        f = _Flight(name, cands, now, now + self.cfg.timeout)
        err = self._send_step(f)
        if err is not None:
            self._finish(f, self.clock(), err, t0)
            return
        self.deadlines.append(f)

    def _on_readable(self, f: _Flight, t0: float) -> None:
        sock = f.sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP port unreachable surfaces here as ECONNREFUSED
                self._finish(f, self.clock(), _oserror_outcome(exc), t0)
                return
            if f.on_reply(data):
                now = self.clock()
                self._close(f)
                if f.next_step():
                    err = self._send_step(f)
                    if err is not None:
                        self._finish(f, now, err, t0)
                    return
                self._finish(f, now, "ok", t0)
                return

    def run(self) -> ProbeReport:
        t0 = self.clock()
        self.loop(t0)
        # Wall time of the whole run, drain included (one round trip when healthy).
        elapsed = max(self.clock() - t0, 1e-9)
        return _summarize(self.cfg, self.target, self.tally, elapsed)

    @property
    def target(self) -> str:
        return _fmt_addr(self.addr)

    def loop(self, t0: float) -> None:
        """Run to completion; lookup offsets are measured from ``t0``."""
        cfg = self.cfg
        _raise_fd_limit(cfg.concurrency + 64)
        end = t0 + cfg.duration
        interval = 1.0 / cfg.rate if cfg.rate else 0.0
        next_launch = t0
        next_progress = t0 + self.progress_every
        try:
            while True:
                now = self.clock()
                launching = (now < end and (cfg.count is None or self.started < cfg.count)
                             and not (self.stop is not None and self.stop.is_set()))
                # At most `concurrency` launches per turn, so lookups that fail at once
                # (no sockets left, no route) cannot spin here without time moving.
                budget = cfg.concurrency - len(self.flights)
                while launching and budget > 0 and now >= next_launch:
                    self._launch(now, t0)
                    budget -= 1
                    if interval:
                        # Paced: no catching up in a burst after the window was full.
                        next_launch = max(next_launch + interval, now - interval)
                    launching = cfg.count is None or self.started < cfg.count
                if not launching and not self.flights:
                    break
                # Expire lookups past their deadline (oldest first).
                while self.deadlines and (self.deadlines[0].done
                                          or self.deadlines[0].deadline <= now):
                    expired = self.deadlines.popleft()
                    if not expired.done:
                        self._finish(expired, now, "timeout", t0)
                wait = min(next_progress, self.deadlines[0].deadline if self.deadlines else end,
                           end if launching else math.inf,
                           next_launch if launching and interval else math.inf) - now
                if launching and not interval and len(self.flights) < cfg.concurrency:
                    wait = 0.0
                for fd, _ in self.ep.poll(max(0.0, wait), 1024):
                    ready = self.flights.get(fd)
                    if ready is not None:
                        self._on_readable(ready, t0)
                now = self.clock()
                if now >= next_progress:
                    next_progress = now + self.progress_every
                    if self.progress is not None:
                        self.progress(self._snapshot(now - t0))
        finally:
            for f in list(self.flights.values()):
                self._close(f)
            self.ep.close()

    def _snapshot(self, elapsed: float) -> Progress:
        return Progress(elapsed, self.cfg.duration, self.started, len(self.tally.latencies),
                        self.tally.slow, self.tally.outcomes.get("timeout", 0), self.cfg.count)


def _fmt_addr(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _oserror_outcome(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return "refused"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__).lower()


def _raise_fd_limit(need: int) -> None:
    """One socket per lookup in flight: lift our own soft limit (never the hard one) if short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


_GAI_OUTCOME = {
    socket.EAI_NONAME: "NXDOMAIN",
    socket.EAI_AGAIN: "EAI_AGAIN",
    socket.EAI_FAIL: "EAI_FAIL",
}
if hasattr(socket, "EAI_NODATA"):
    _GAI_OUTCOME[socket.EAI_NODATA] = "NODATA"


def _run_getaddrinfo(cfg: ProbeConfig, clock: Clock,
                     progress: Callable[[Progress], None] | None, progress_every: float,
                     stop: threading.Event | None) -> ProbeReport:
    """Lookups through libc: one blocking thread per unit of concurrency.

    libc cannot be interrupted, so the threads are daemons: at ``duration + timeout`` whatever
    has not returned is counted as a timeout and left behind.
    """
    tally = _Tally()
    lock = threading.Lock()
    t0 = clock()
    end = t0 + cfg.duration
    started = 0
    in_flight: dict[int, tuple[float, str]] = {}
    halt = threading.Event()

    def take() -> tuple[int, str] | None:
        nonlocal started
        with lock:
            if (halt.is_set() or clock() >= end or (cfg.count is not None
                                                    and started >= cfg.count)
                    or (stop is not None and stop.is_set())):
                return None
            i = started
            started += 1
            return i, cfg.names[i % len(cfg.names)]

    def worker() -> None:
        while (job := take()) is not None:
            i, name = job
            t = clock()
            with lock:
                in_flight[i] = (t, name)
            try:
                socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_DGRAM)
                outcome, rcodes = "ok", ["NOERROR"]
            except socket.gaierror as exc:
                code = exc.errno if exc.errno is not None else 0
                rcodes = [_GAI_OUTCOME.get(code, f"EAI{code}")]
                # NXDOMAIN is an answer; anything else is the resolver failing.
                outcome = "ok" if code == socket.EAI_NONAME else rcodes[0]
            done = clock()
            with lock:
                if in_flight.pop(i, None) is None:
                    return  # already written off as a timeout
                late = done - t >= cfg.timeout
                tally.add(t - t0, None if late else done - t, name,
                          "timeout" if late else outcome, rcodes=rcodes, queries=0)

    threads = [threading.Thread(target=worker, daemon=True, name=f"probe-gai-{n}")
               for n in range(cfg.concurrency)]
    for th in threads:
        th.start()
    next_progress = t0 + progress_every
    hard_end = end + cfg.timeout
    while any(th.is_alive() for th in threads) and clock() < hard_end:
        time.sleep(min(0.05, progress_every))
        if clock() >= next_progress:
            next_progress = clock() + progress_every
            if progress is not None:
                with lock:
                    progress(Progress(clock() - t0, cfg.duration, started,
                                      len(tally.latencies), tally.slow,
                                      tally.outcomes.get("timeout", 0), cfg.count))
    halt.set()
    with lock:
        for t, name in in_flight.values():
            tally.add(t - t0, None, name, "timeout", rcodes=[], queries=0)
        in_flight.clear()
        elapsed = max(clock() - t0, 1e-9)
        return _summarize(cfg, "system resolver (getaddrinfo)", tally, elapsed)


def _split(cfg: ProbeConfig, workers: int) -> list[ProbeConfig]:
    """Share concurrency, count and rate between workers (the first ones take remainders)."""
    def share(total: int, i: int) -> int:
        return total // workers + (1 if i < total % workers else 0)

    parts = []
    for i in range(workers):
        parts.append(dataclasses.replace(
            cfg, concurrency=max(1, share(cfg.concurrency, i)),
            count=None if cfg.count is None else share(cfg.count, i),
            rate=None if cfg.rate is None else cfg.rate / workers))
    return [p for p in parts if p.count is None or p.count > 0]


@dataclass(frozen=True)
class _Job:
    cfg: ProbeConfig
    t0: float  # the parent's start: every worker measures offsets from the same instant
    slot: int
    progress_every: float


def _worker_main(job: _Job, shared: Any, conn: Connection) -> None:
    """One forked worker: its share of the lookups, progress in ``shared[slot]``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    slot = job.slot

    def report(p: Progress) -> None:
        shared[slot * 4:slot * 4 + 4] = [p.started, p.finished, p.slow, p.timeouts]

    probe = _WireProbe(job.cfg, time.monotonic, report, job.progress_every, None)
    probe.loop(job.t0)
    conn.send(probe.tally)
    conn.close()


def _merge(tallies: Sequence[_Tally]) -> _Tally:
    out = _Tally()
    for t in tallies:
        out.latencies.extend(t.latencies)
        out.rcodes.update(t.rcodes)
        out.outcomes.update(t.outcomes)
        out.slow += t.slow
        out.queries += t.queries
        out.slow_events.extend(t.slow_events)
    out.slow_events = sorted(out.slow_events, key=lambda e: e.offset)[:MAX_SLOW_EVENTS]
    return out


def _run_workers(cfg: ProbeConfig, workers: int,
                 progress: Callable[[Progress], None] | None,
                 progress_every: float) -> ProbeReport:
    """The wire probe in ``workers`` forked processes, for machines with cores to spare.

    Each worker is the same single-threaded loop over its share; results come back once, at
    the end, through a pipe. The parent only waits and prints progress. Workers are our own
    children, ended by their PID if they overstay ``duration + timeout``.
    """
    ctx = multiprocessing.get_context("fork")
    parts = _split(cfg, workers)
    shared = ctx.RawArray("d", 4 * len(parts))
    t0 = time.monotonic()
    procs = []
    conns: dict[Connection, int] = {}
    for i, part in enumerate(parts):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_main,
                           args=(_Job(part, t0, i, progress_every), shared, send),
                           name=f"dnsguard-probe-{i}", daemon=True)
        proc.start()
        send.close()
        procs.append(proc)
        conns[recv] = i
    tallies: list[_Tally] = []
    lost = 0
    hard_end = t0 + cfg.duration + cfg.timeout + 10.0
    try:
        while conns and time.monotonic() < hard_end:
            for ready in mp_wait(list(conns), timeout=progress_every):
                assert isinstance(ready, Connection)
                try:
                    tallies.append(ready.recv())
                except EOFError:  # a worker that died sends nothing
                    lost += 1
                del conns[ready]
            if progress is not None:
                v = list(shared)
                progress(Progress(time.monotonic() - t0, cfg.duration, int(sum(v[0::4])),
                                  int(sum(v[1::4])), int(sum(v[2::4])), int(sum(v[3::4])),
                                  cfg.count))
    finally:
        for proc in procs:
            proc.join(timeout=0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if conns or lost:
        raise ProbeError(f"{len(conns) + lost} of {len(parts)} probe workers returned no "
                         "result (killed, or out of memory?)")
    elapsed = max(time.monotonic() - t0, 1e-9)
    assert cfg.server is not None
    return _summarize(cfg, _fmt_addr((str(cfg.server), cfg.port)), _merge(tallies), elapsed)


def run_probe(cfg: ProbeConfig, *, clock: Clock = time.monotonic,
              progress: Callable[[Progress], None] | None = None,
              progress_every: float = 1.0, stop: threading.Event | None = None,
              workers: int = 1) -> ProbeReport:
    """Run one probe to completion (bounded by ``duration + timeout``) and summarize it.

    ``workers`` > 1 forks that many processes for the wire probe (``clock`` and ``stop`` then
    do not apply: each worker uses the monotonic clock and runs its share to the end).
    """
    if cfg.via == "getaddrinfo":
        return _run_getaddrinfo(cfg, clock, progress, progress_every, stop)
    if workers > 1:
        return _run_workers(cfg, workers, progress, progress_every)
    return _WireProbe(cfg, clock, progress, progress_every, stop).run()


def parse_server(raw: str) -> IPAddress:
    """``198.18.1.10`` or ``fd00::a`` (the probe talks to one address)."""
    return ipaddress.ip_address(raw)
