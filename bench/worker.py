"""The load worker: one per client pod, started inside the pod's network namespace.

It drives `dnsguard.probe`'s epoll loop (the glibc pattern: A and AAAA back to back from a new
UDP socket per lookup and per search-list step, names expanded through the pod's own
resolv.conf like ``res_nsearch``) and prints one JSON line with *every* lookup's latency, so
the host can merge pods exactly: a p99.9 over four pods is not a function of four per-pod
p99.9s, and the plots need the whole distribution.

Why not ``dnsguard probe --json``: its report keeps percentiles, not the samples. The loop and
its tally are private to `dnsguard.probe`; this module is the one place that reaches into them
(see `_probe_latencies`), so a public hook there would remove exactly one function here.

A shared 2-core machine sometimes does not run a worker for a second or more although it is
runnable (measured: up to 3.5 s while another session's qemu ran). Every in-flight lookup of
that pod then *looks* slow, though its answer sat in the socket. `StallClock` -- the clock the
probe loop reads on every turn -- notices each gap of more than `STALL_GAP` seconds between
turns and reads this thread's run delay (``/proc/thread-self/schedstat``: time spent runnable
but not running) across it. A gap the process spent waiting in ``epoll_wait`` (no answer came)
has no run delay; a gap it spent starved does. The stalls go out with the results so the host
can tell the DNS path's slow lookups from the generator's (`bench.results`).

Workers of one run start together: the host passes a wall-clock ``--start-at`` (pods share the
host's clock) so interpreter start-up, which differs between pods, never staggers the load.
Bounds: no lookup starts after ``--duration`` or beyond ``--count``; each lookup gets at most
``--timeout``; the process then exits on its own.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import resource
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from dnsguard.node.procnet import parse_resolv_conf
from dnsguard.probe import (
    ProbeConfig,
    SlowLookup,
    _WireProbe,  # the one private name used; see _probe_latencies
)

__all__ = ["decode_latencies", "encode_latencies", "main"]

#: Longest a worker waits for ``--start-at`` (a host clock far in the future is a bug).
MAX_START_WAIT = 60.0


def encode_latencies(values: Sequence[float]) -> str:
    """Latencies (seconds; +inf for unanswered) as base64 of little-endian float64s."""
    arr = array("d", values)
    if sys.byteorder != "little":  # pragma: no cover - x86 and arm64 are little-endian
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_latencies(text: str) -> array[float]:
    arr = array("d")
    arr.frombytes(base64.b64decode(text))
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr


#: A turn of the probe loop later than this after the previous one is examined as a stall.
STALL_GAP = 0.2
#: How often the run delay is read while turns come quickly (a cheap read, 20 times a second).
RUN_DELAY_EVERY = 0.05
SCHEDSTAT = "/proc/thread-self/schedstat"


class StallClock:
    """``time.monotonic`` for the probe loop that also records when this thread was starved.

    ``stalls`` holds ``(offset from t0, gap seconds, run delay seconds during the gap)``. The run
    delay is read at most every `RUN_DELAY_EVERY` while the loop turns, and again after a gap,
    so its growth across the gap is this thread's waiting for a CPU within a few tens of ms.
    """

    def __init__(self, schedstat: str = SCHEDSTAT,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self.t0 = monotonic()
        self.stalls: list[tuple[float, float, float]] = []
        try:
            self._file: IO[str] | None = open(schedstat)  # noqa: SIM115 - read for the run
        except OSError:
            self._file = None  # no schedstat in this kernel: no stall accounting
        self._last = self.t0
        self._delay = self._run_delay()
        self._delay_at = self.t0

    def _run_delay(self) -> float:
        if self._file is None:
            return 0.0
        self._file.seek(0)
        return int(self._file.read().split()[1]) / 1e9

    def start(self, t0: float) -> None:
        self.t0 = self._last = self._delay_at = t0
        self._delay = self._run_delay()

    def __call__(self) -> float:
        now = self.monotonic()
        if now - self._last > STALL_GAP:
            delay = self._run_delay()
            self.stalls.append((self._last - self.t0, now - self._last, delay - self._delay))
            self._delay, self._delay_at = delay, now
        elif now - self._delay_at > RUN_DELAY_EVERY:
            self._delay, self._delay_at = self._run_delay(), now
        self._last = now
        return now

    @property
    def available(self) -> bool:
        return self._file is not None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _probe_latencies(cfg: ProbeConfig, t0: float,
                     clock: Callable[[], float] = time.monotonic,
                     ) -> tuple[array[float], dict[str, int], int, list[SlowLookup]]:
    """Run the probe's loop and return its raw tally: latencies, outcomes, queries, slow events.

    Uses `dnsguard.probe`'s private loop (`_WireProbe`) because the public `run_probe` keeps
    only percentiles. If the probe grows a public way to keep samples, replace this function.
    """
    probe = _WireProbe(cfg, clock, None, 1.0, None)
    probe.loop(t0)
    tally = probe.tally
    return tally.latencies, dict(tally.outcomes), tally.queries, list(tally.slow_events)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="address the pod queries (the ClusterIP)")
    p.add_argument("--names", required=True, help="comma-separated names, round robin")
    p.add_argument("--concurrency", type=int, required=True, help="lookups in flight")
    p.add_argument("--duration", type=float, required=True, help="seconds of launching")
    p.add_argument("--count", type=int, default=None, help="most lookups to start")
    p.add_argument("--timeout", type=float, default=5.0, help="per lookup, like glibc's retry")
    p.add_argument("--start-at", type=float, default=0.0, help="wall-clock start (epoch)")
    p.add_argument("--resolv-conf", default="/etc/resolv.conf")
    p.add_argument("--label", default="")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    resolv = parse_resolv_conf(Path(args.resolv_conf).read_text())
    cfg = ProbeConfig(
        server=ipaddress.ip_address(args.server),
        names=tuple(n for n in args.names.split(",") if n),
        concurrency=args.concurrency, duration=args.duration, count=args.count,
        timeout=args.timeout, resolv=resolv,
    )
    wait = args.start_at - time.time()
    late = -wait if wait < 0 else 0.0
    time.sleep(min(max(wait, 0.0), MAX_START_WAIT))
    started = time.time()
    clock = StallClock()
    t0 = time.monotonic()
    clock.start(t0)
    try:
        latencies, outcomes, queries, slow = _probe_latencies(cfg, t0, clock)
    finally:
        clock.close()
    elapsed = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    doc = {
        "label": args.label,
        "started": started,
        "late": round(late, 3),
        "elapsed": elapsed,
        "duration": args.duration,
        "timeout": args.timeout,
        "lookups": len(latencies),
        "queries": queries,
        "outcomes": outcomes,
        "cpu_seconds": ru.ru_utime + ru.ru_stime,
        "slow": [[s.offset, s.latency, s.outcome, s.name] for s in slow],
        "stalls": [[round(o, 4), round(g, 4), round(d, 4)] for o, g, d in clock.stalls]
        if clock.available else None,
        "latencies": encode_latencies(latencies),
    }
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
