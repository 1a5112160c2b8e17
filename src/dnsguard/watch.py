"""``dnsguard status --watch``: one node's DNS at a glance, refreshed every second.

Everything comes from the running agent's own /metrics (its --metrics-address), scraped once a
second: the same numbers Prometheus sees, so the view and the dashboards cannot disagree, and
no second reader of unbound or conntrack runs beside the agent. Rates and the self-probe's p99
are computed from the difference between two scrapes, so they describe the last second, not
the agent's lifetime.

The cache's counters move when the agent polls unbound (every 5 s), so rates are taken over a
sliding `WINDOW` of scrapes (the oldest kept one to the newest) rather than the last second:
otherwise four refreshes in five would show zero and the fifth five times the truth.

`render` is pure (two scrapes and the seconds between in, text out); `run` owns the loop, the
clock and the terminal: on a TTY the screen is redrawn in place, otherwise one block per
refresh is appended, which is what a log or a pipe wants.
"""

from __future__ import annotations

import math
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Scrape", "fetch", "render", "run"]

#: (sample name, sorted label pairs) -> value
Scrape = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]
REFRESH = 1.0
#: seconds of scrapes rates are computed over: two of the agent's cache statistics polls
WINDOW = 10.0
_CLEAR = "\x1b[H\x1b[2J"


def parse(text: str) -> Scrape:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def fetch(address: tuple[str, int], timeout: float = 2.0) -> Scrape:
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    with urllib.request.urlopen(f"http://{host}:{address[1]}/metrics", timeout=timeout) as r:
        return parse(r.read().decode())


def _get(s: Scrape, name: str, **labels: str) -> float | None:
    return s.get((name, tuple(sorted(labels.items()))))


def _rate(prev: Scrape, cur: Scrape, seconds: float, name: str, **labels: str) -> float | None:
    a, b = _get(prev, name, **labels), _get(cur, name, **labels)
    if a is None or b is None or seconds <= 0 or b < a:
        return None
    return (b - a) / seconds


def _p99(prev: Scrape, cur: Scrape, target: str) -> tuple[float | None, int]:
    """The 99th percentile's bucket bound of the probe lookups between the scrapes, and how
    many lookups that was (upper bound of the bucket: a histogram cannot say better)."""
    buckets: list[tuple[float, float]] = []
    for (name, labels), value in cur.items():
        lab = dict(labels)
        if name == "dnsguard_probe_duration_seconds_bucket" and lab.get("target") == target:
            before = prev.get((name, labels), 0.0)
            buckets.append((float(lab["le"]), value - before))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None, 0
    return next(le for le, n in buckets if n >= 0.99 * total), int(total)


def _fmt(value: float | None, fmt: str, none: str = "-") -> str:
    return none if value is None or math.isnan(value) else format(value, fmt)


def render(prev: Scrape, cur: Scrape, seconds: float, now: str = "") -> str:
    """The view of one refresh."""
    def flag(name: str, yes: str, no: str) -> str:
        v = _get(cur, name)
        return "?" if v is None else (yes if v == 1 else no)

    lines = [f"dnsguard status --watch {now} (rates over {seconds:.0f}s)".replace("  ", " "),
             f"rules       {flag('dnsguard_rules_in_sync', 'in sync', 'NOT IN SYNC')}"
             f"  ({_fmt(_get(cur, 'dnsguard_rules_planned'), '.0f')} planned)"]
    if _get(cur, "dnsguard_cache_intercepting") is not None:
        lines.append(f"intercept   {flag('dnsguard_cache_intercepting', 'yes', 'NO (failed open)')}"
                     f"  cache {flag('dnsguard_cache_healthy', 'healthy', 'UNHEALTHY')}")
        qps = _rate(prev, cur, seconds, "dnsguard_cache_queries_total")
        hits = _rate(prev, cur, seconds, "dnsguard_cache_hits_total")
        ratio = hits / qps if qps and hits is not None else None
        lines.append(f"cache       {_fmt(qps, '.1f')} queries/s, hit ratio "
                     f"{_fmt(ratio, '.0%')}")
        servfail = _rate(prev, cur, seconds, "dnsguard_cache_responses_total", rcode="SERVFAIL")
        nx = _rate(prev, cur, seconds, "dnsguard_cache_responses_total", rcode="NXDOMAIN")
        lines.append(f"answers     NXDOMAIN {_fmt(nx, '.1f')}/s, SERVFAIL "
                     f"{_fmt(servfail, '.1f')}/s")
    for target in ("local", "cluster"):
        p99, n = _p99(prev, cur, target)
        if n and p99 is not None:
            shown = "timeout" if p99 == math.inf else f"<= {p99 * 1000:g} ms"
            lines.append(f"probe p99   {target}: {shown} ({n} lookups)")
    entries, cap = _get(cur, "dnsguard_conntrack_entries"), _get(cur, "dnsguard_conntrack_max")
    if entries is not None and cap:
        lines.append(f"conntrack   {entries:.0f} / {cap:.0f} ({entries / cap:.0%} full)")
    drops = [(stat, _rate(prev, cur, seconds, "dnsguard_conntrack_stat_total", stat=stat))
             for stat in ("insert_failed", "early_drop")]
    lines.append("            " + ", ".join(f"{s} {_fmt(r, '.1f')}/s" for s, r in drops))
    return "\n".join(lines) + "\n"


def run(address: tuple[str, int], out: TextIO = sys.stdout, *,
        scrape: Callable[[], Scrape] | None = None, refresh: float = REFRESH,
        iterations: int | None = None, sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic) -> int:
    """Scrape and redraw until interrupted (or ``iterations`` refreshes, for tests)."""
    get = scrape or (lambda: fetch(address))
    tty = out.isatty()
    try:
        history: deque[tuple[float, Scrape]] = deque([(clock(), get())])
        n = 0
        while iterations is None or n < iterations:
            sleep(refresh)
            history.append((clock(), get()))
            while len(history) > 2 and history[-1][0] - history[1][0] >= WINDOW:
                history.popleft()
            (t0, prev), (t1, cur) = history[0], history[-1]
            text = render(prev, cur, t1 - t0, time.strftime("%H:%M:%S"))
            out.write((_CLEAR + text) if tty else (text + "\n"))
            out.flush()
            n += 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"dnsguard: error: cannot read the agent's metrics on {address[0]}:{address[1]}"
              f" ({exc}); is `dnsguard run --metrics-address` set?", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
