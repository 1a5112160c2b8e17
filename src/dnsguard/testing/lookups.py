"""DNS lookup load, generated the way real pods generate it, and the merge of its results.

The worker runs *inside* a pod network namespace::

    ip netns exec <pod> python -m dnsguard.testing.lookups \\
        --names svc-0,svc-1 --count 500 --concurrency 8 --duration 10

and resolves with ``getaddrinfo(name, None, AF_UNSPEC, SOCK_DGRAM)``. That call is the
point: glibc sends the A and the AAAA query at the same time from the same UDP socket, so
both packets race to create the same conntrack entry on the node. That race (the loser is
dropped as INVALID by kube-proxy's forward filter) is what costs pods 5 s DNS timeouts and
what dnsguard exists to remove. A resolver library or `dig` would not reproduce it.

With ``--interval`` the worker runs open loop instead: a new lookup starts every interval
whatever the others are doing (at most ``--concurrency`` in flight), so lookups stuck in a
resolver retry cannot hide what lookups started meanwhile see; with ``--samples`` each lookup
is reported as (start, end, ok, name) on the monotonic clock, which every namespace on the
host shares, so a test can line lookups up with the moment it injected a fault.

The worker is bounded twice: it starts at most `count` lookups and none after `duration`
seconds; lookups still stuck in the resolver `grace` seconds after that are abandoned (and
counted as `unfinished`) and the process exits on its own. Results go to stdout as one JSON
line so the host side can run many workers at once and merge them (`merge`).

Only the standard library is used here: the worker must start in any pod namespace with
nothing but the interpreter that runs the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from dnsguard.stats import SLOW_SECONDS, Summary, summarize

__all__ = ["Failure", "LoadResult", "Sample", "WorkerResult", "main", "merge", "run_paced",
           "run_worker"]

#: Seconds the worker waits for in-flight lookups after `duration` before abandoning them:
#: long enough for one full glibc retry (timeout 5 s) so that races show up as slow
#: lookups rather than as abandoned ones.
DEFAULT_GRACE = 6.0


@dataclass(frozen=True)
class Failure:
    """One failed lookup: which name, how long it took to fail, and glibc's message."""

    name: str
    latency: float
    error: str


@dataclass(frozen=True)
class Sample:
    """One lookup on the host's monotonic clock (shared by every network namespace)."""

    start: float
    end: float
    ok: bool
    name: str

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class WorkerResult:
    """What one worker (one pod) reports. Times are wall-clock epoch seconds."""

    latencies: tuple[float, ...]
    failures: tuple[Failure, ...]
    started: float
    ended: float
    unfinished: int = 0
    label: str = ""
    #: per lookup, when asked for (``--samples``); lookups left unfinished are not included
    samples: tuple[Sample, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "label": self.label,
                "started": self.started,
                "ended": self.ended,
                "unfinished": self.unfinished,
                "latencies": self.latencies,
                "failures": [[f.name, f.latency, f.error] for f in self.failures],
                "samples": [[x.start, x.end, x.ok, x.name] for x in self.samples],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str, label: str = "") -> WorkerResult:
        data: dict[str, Any] = json.loads(text)
        return cls(
            latencies=tuple(float(x) for x in data["latencies"]),
            failures=tuple(Failure(str(n), float(t), str(e)) for n, t, e in data["failures"]),
            started=float(data["started"]),
            ended=float(data["ended"]),
            unfinished=int(data["unfinished"]),
            label=label or str(data.get("label", "")),
            samples=tuple(Sample(float(a), float(b), bool(ok), str(n))
                          for a, b, ok, n in data.get("samples", ())),
        )


@dataclass(frozen=True)
class LoadResult:
    """Merged results of several workers, with the summary the tests and benchmarks use."""

    latencies: tuple[float, ...]
    failures: tuple[Failure, ...]
    started: float
    ended: float
    unfinished: int = 0
    workers: tuple[WorkerResult, ...] = field(default=(), repr=False)
    samples: tuple[Sample, ...] = field(default=(), repr=False)

    @property
    def wall(self) -> float:
        return max(self.ended - self.started, 0.0)

    @property
    def rate(self) -> float:
        """Finished lookups per second of wall time."""
        n = len(self.latencies) + len(self.failures)
        return n / self.wall if self.wall > 0 else 0.0

    def summary(self, slow_seconds: float = SLOW_SECONDS) -> Summary:
        return summarize(self.latencies, len(self.failures), slow_seconds)


def merge(results: Sequence[WorkerResult]) -> LoadResult:
    """Fold worker results into one; the run spans the earliest start to the latest end."""
    if not results:
        now = time.time()
        return LoadResult((), (), now, now)
    return LoadResult(
        latencies=tuple(x for r in results for x in r.latencies),
        failures=tuple(f for r in results for f in r.failures),
        started=min(r.started for r in results),
        ended=max(r.ended for r in results),
        unfinished=sum(r.unfinished for r in results),
        workers=tuple(results),
        samples=tuple(sorted((x for r in results for x in r.samples), key=lambda x: x.start)),
    )


def _resolve(name: str) -> tuple[float, str | None]:
    t0 = time.monotonic()
    try:
        socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except OSError as exc:  # socket.gaierror and friends
        return time.monotonic() - t0, str(exc) or type(exc).__name__
    return time.monotonic() - t0, None


def run_worker(
    names: Sequence[str],
    count: int,
    *,
    concurrency: int,
    duration: float,
    grace: float = DEFAULT_GRACE,
    label: str = "",
) -> WorkerResult:
    """Resolve `names` round-robin: at most `count` lookups, none started after `duration`.

    Returns after every started lookup finished, or `grace` seconds after `duration`,
    whichever is first; lookups still running then are reported as `unfinished` (their
    threads are left behind, which is why `main` exits with `os._exit`).
    """
    if not names or count < 0 or concurrency < 1 or duration <= 0:
        raise ValueError("need names, count >= 0, concurrency >= 1 and duration > 0")
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[Failure] = []
    started = time.time()
    t0 = time.monotonic()
    stop_at = t0 + duration

    def one(i: int) -> None:
        name = names[i % len(names)]
        latency, error = _resolve(name)
        with lock:
            if error is None:
                latencies.append(latency)
            else:
                failures.append(Failure(name, latency, error))

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lookup")
    pending: set[Future[None]] = set()
    issued = 0
    try:
        # Keep exactly `concurrency` lookups in flight so the pool never queues work that
        # would start after the deadline.
        while issued < count and time.monotonic() < stop_at:
            while len(pending) < concurrency and issued < count:
                pending.add(pool.submit(one, issued))
                issued += 1
            _, pending = wait(pending, timeout=max(stop_at - time.monotonic(), 0),
                              return_when=FIRST_COMPLETED)
        _, pending = wait(pending, timeout=max(stop_at + grace - time.monotonic(), 0))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    with lock:
        return WorkerResult(tuple(latencies), tuple(failures), started, time.time(),
                            unfinished=len(pending), label=label)


def run_paced(
    names: Sequence[str],
    *,
    interval: float,
    duration: float,
    max_in_flight: int,
    grace: float = DEFAULT_GRACE,
    label: str = "",
    samples: bool = True,
) -> WorkerResult:
    """Open loop: start a lookup of the next name every `interval` seconds for `duration`.

    A lookup slot that finds `max_in_flight` lookups already running is skipped, not queued
    (the gap then shows in the samples). Returns after every started lookup finished, or
    `grace` seconds after `duration`; stuck lookups are counted as `unfinished`, and appear
    in the samples as failed at the moment they were abandoned (a lookup that never returns
    is the worst failure there is, not a missing data point).
    """
    if not names or interval <= 0 or duration <= 0 or max_in_flight < 1:
        raise ValueError("need names, interval > 0, duration > 0 and max_in_flight >= 1")
    lock = threading.Lock()
    done: list[Sample] = []
    failures: list[Failure] = []
    in_flight = threading.BoundedSemaphore(max_in_flight)
    threads: list[threading.Thread] = []
    running: dict[int, tuple[float, str]] = {}
    started = time.time()
    t0 = time.monotonic()

    def one(i: int, name: str) -> None:
        try:
            t = time.monotonic()
            with lock:
                running[i] = (t, name)
            latency, error = _resolve(name)
            with lock:
                del running[i]
                done.append(Sample(t, t + latency, error is None, name))
                if error is not None:
                    failures.append(Failure(name, latency, error))
        finally:
            in_flight.release()

    i = 0
    next_at = t0
    while next_at < t0 + duration:
        if in_flight.acquire(blocking=False):
            th = threading.Thread(target=one, args=(i, names[i % len(names)]), daemon=True)
            th.start()
            threads.append(th)
        i += 1
        next_at += interval
        time.sleep(max(next_at - time.monotonic(), 0))
    end_by = t0 + duration + grace
    for th in threads:
        th.join(timeout=max(end_by - time.monotonic(), 0))
    with lock:
        now = time.monotonic()
        stuck = [Sample(t, now, False, name) for t, name in running.values()]
        ok = tuple(x.latency for x in done if x.ok)
        return WorkerResult(ok, tuple(failures), started, time.time(),
                            unfinished=len(stuck), label=label,
                            samples=tuple(sorted(done + stuck, key=lambda x: x.start))
                            if samples else ())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--names", required=True, help="comma-separated names to resolve")
    p.add_argument("--count", type=int, required=True, help="most lookups to start")
    p.add_argument("--concurrency", type=int, default=1, help="lookups in flight")
    p.add_argument("--duration", type=float, required=True, help="seconds to start lookups")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                   help="seconds to wait for in-flight lookups after --duration")
    p.add_argument("--label", default="", help="echoed in the result (e.g. the pod)")
    p.add_argument("--interval", type=float, default=None,
                   help="open loop: start a lookup every INTERVAL seconds "
                        "(--concurrency caps those in flight; --count is ignored)")
    p.add_argument("--samples", action="store_true",
                   help="report each lookup's start, end, outcome and name")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n for n in args.names.split(",") if n]
    if args.interval is not None:
        result = run_paced(names, interval=args.interval, duration=args.duration,
                           max_in_flight=args.concurrency, grace=args.grace, label=args.label,
                           samples=args.samples)
    else:
        result = run_worker(names, args.count, concurrency=args.concurrency,
                            duration=args.duration, grace=args.grace, label=args.label)
    sys.stdout.write(result.to_json() + "\n")
    sys.stdout.flush()
    # Abandoned lookups live in non-daemon pool threads; do not wait for them.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
