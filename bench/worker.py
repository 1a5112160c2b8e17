"""The load worker: one per client pod, started inside the pod's network namespace.

It drives `dnsguard.probe`'s epoll loop (the glibc pattern: A and AAAA back to back from a new
UDP socket per lookup and per search-list step, names expanded through the pod's own
resolv.conf like ``res_nsearch``) and prints one JSON line with *every* lookup's latency, so
the host can merge pods exactly: a p99.9 over four pods is not a function of four per-pod
p99.9s, and the plots need the whole distribution.

Why not ``dnsguard probe --json``: its report keeps percentiles, not the samples. The loop and
its tally are private to `dnsguard.probe`; this module is the one place that reaches into them
(see `_probe_latencies`), so a public hook there would remove exactly one function here.

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
from collections.abc import Sequence
from pathlib import Path

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


def _probe_latencies(cfg: ProbeConfig, t0: float) -> tuple[array[float], dict[str, int],
                                                          int, list[SlowLookup]]:
    """Run the probe's loop and return its raw tally: latencies, outcomes, queries, slow events.

    Uses `dnsguard.probe`'s private loop (`_WireProbe`) because the public `run_probe` keeps
    only percentiles. If the probe grows a public way to keep samples, replace this function.
    """
    probe = _WireProbe(cfg, time.monotonic, None, 1.0, None)
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
    t0 = time.monotonic()
    latencies, outcomes, queries, slow = _probe_latencies(cfg, t0)
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
        "latencies": encode_latencies(latencies),
    }
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
