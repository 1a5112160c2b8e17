"""Conntrack statistics of the network namespace we run in: counters, entries, table size.

Sources, in order:

1. ``/proc/net/stat/nf_conntrack`` (needs ``CONFIG_NF_CONNTRACK_PROCFS``): a header line of
   column names, then one row of hex numbers per possible CPU. Counters are per CPU and are
   summed; ``entries`` is the namespace-wide count printed again on every row, so it is taken
   once, never summed. Columns are found by header name, never by position, because the set
   changed over the years (``searched`` became ``clashres`` in 5.10, ``delete_list`` became
   ``chainlength`` later, ``search_restart`` appeared in 4.x).
2. ctnetlink, through ``conntrack -S`` (conntrack-tools), where the proc file is absent (common on
   Ubuntu kernels): one ``cpu=N key=value ...`` line per CPU, summed the same way.

Counters this kernel does not maintain are *absent* from `ConntrackStats.counters`, not zero:
a finding must never be drawn from a counter that cannot move. Since 5.10 the proc file still
prints ``new``, ``ignore``, ``delete`` and ``delete_list`` but the kernel writes a constant 0
there (the ``clashres`` column in the same header tells us which kernel generation this is), so
those are dropped too.

Entries and limits come from ``/proc/sys/net/netfilter``: ``nf_conntrack_count`` (per
namespace), ``nf_conntrack_max`` and ``nf_conntrack_buckets`` (global; read-only inside a
namespace). ``conntrack -C`` stands in for the count when the sysctl is missing.

Counter names are those of ``conntrack -S`` (``error``, ``clash_resolve``, ``chaintoolong``), so
both sources produce the same keys and metrics can label by them.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dnsguard.netfilter.errors import NetfilterError
from dnsguard.netfilter.runner import Runner

__all__ = [
    "CachedConntrack",
    "ConntrackStats",
    "kernel_release",
    "parse_conntrack_count",
    "parse_conntrack_s",
    "parse_proc_stat",
    "read_conntrack",
]

PROC_STAT = "net/stat/nf_conntrack"

#: Header names of the proc file that differ from ``conntrack -S`` names.
_PROC_ALIASES = {"clashres": "clash_resolve", "chainlength": "chaintoolong",
                 "icmp_error": "error"}

#: Printed, but a constant zero, on kernels that print ``clashres`` (5.10 on, and backports).
_PLACEHOLDERS_SINCE_CLASHRES = frozenset({"new", "ignore", "delete", "delete_list", "searched"})


@dataclass(frozen=True)
class ConntrackStats:
    """One reading. ``counters`` holds only what this kernel maintains (absent, not zero)."""

    source: str
    counters: Mapping[str, int] = field(default_factory=dict)
    entries: int | None = None
    max: int | None = None
    buckets: int | None = None

    def get(self, name: str) -> int | None:
        return self.counters.get(name)


def parse_proc_stat(text: str) -> tuple[dict[str, int], int | None]:
    """``/proc/net/stat/nf_conntrack`` -> (summed counters, entries).

    Raises ValueError on a header without ``entries`` or a row that does not match it.
    """
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines or "entries" not in lines[0]:
        raise ValueError("not an nf_conntrack stat file: no header with 'entries'")
    names = [_PROC_ALIASES.get(n, n) for n in lines[0]]
    dead = _PLACEHOLDERS_SINCE_CLASHRES if "clash_resolve" in names else frozenset()
    sums: dict[str, int] = {}
    entries: int | None = None
    for row in lines[1:]:
        if len(row) != len(names):
            raise ValueError(f"row has {len(row)} columns, header has {len(names)}")
        for name, raw in zip(names, row, strict=True):
            value = int(raw, 16)
            if name == "entries":
                entries = value  # namespace-wide, repeated on every CPU row
            elif name not in dead:
                sums[name] = sums.get(name, 0) + value
    return sums, entries


_KV = re.compile(r"(\w+)=(\d+)")


def parse_conntrack_s(text: str) -> dict[str, int]:
    """``conntrack -S`` (one ``cpu=N k=v ...`` line per CPU) -> summed counters."""
    sums: dict[str, int] = {}
    rows = 0
    for line in text.splitlines():
        pairs = _KV.findall(line)
        if not pairs or pairs[0][0] != "cpu":
            continue
        rows += 1
        for key, raw in pairs[1:]:
            sums[key] = sums.get(key, 0) + int(raw)
    if not rows:
        raise ValueError("no 'cpu=N ...' lines in conntrack -S output")
    if "clash_resolve" in sums:
        for name in _PLACEHOLDERS_SINCE_CLASHRES:
            sums.pop(name, None)
    return sums


def parse_conntrack_count(text: str) -> int:
    """``conntrack -C`` prints the number of entries alone on a line."""
    return int(text.strip().splitlines()[-1])


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def kernel_release(proc_root: Path = Path("/proc")) -> str | None:
    """``uname -r`` of the running kernel, read from procfs."""
    try:
        return (proc_root / "sys/kernel/osrelease").read_text().strip() or None
    except OSError:
        return None


def read_conntrack(runner: Runner, proc_root: Path = Path("/proc")) -> ConntrackStats | None:
    """Read the statistics from the best source available; None when conntrack is not there.

    Commands go through ``runner`` so a test (or ``ip netns exec``) decides where they run.
    """
    sysdir = proc_root / "sys/net/netfilter"
    count = _read_int(sysdir / "nf_conntrack_count")
    limit = _read_int(sysdir / "nf_conntrack_max")
    buckets = _read_int(sysdir / "nf_conntrack_buckets")
    try:
        counters, entries = parse_proc_stat((proc_root / PROC_STAT).read_text())
        source = f"{proc_root}/{PROC_STAT}"
    except (OSError, ValueError):
        counters, entries, source = {}, None, ""
    if not source:
        try:
            res = runner.run(["conntrack", "-S"], timeout=10.0)
            if res.ok:
                counters, source = parse_conntrack_s(res.stdout), "ctnetlink (conntrack -S)"
        except (NetfilterError, ValueError):
            pass
    if count is None:
        count = entries
    if count is None and source:
        try:
            res = runner.run(["conntrack", "-C"], timeout=10.0)
            if res.ok:
                count = parse_conntrack_count(res.stdout)
        except (NetfilterError, ValueError, IndexError):
            pass
    if not source and count is None and limit is None:
        return None
    return ConntrackStats(source=source or "none", counters=counters, entries=count,
                          max=limit, buckets=buckets)


class CachedConntrack:
    """`read_conntrack` at most once per ``max_age`` seconds, for metrics scrapes.

    Where the proc file is missing a reading forks ``conntrack -S`` (and maybe ``-C``), and
    /metrics is reachable by anyone who can reach the node: without a cache, every request
    would fork. Concurrent callers wait for the one reading in progress instead of forking
    their own. A reading of "no conntrack here" (None) is cached like any other. The counters
    are at most ``max_age`` old, well inside any scrape interval a rate() is computed over.
    """

    def __init__(self, runner: Runner, proc_root: Path = Path("/proc"), max_age: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner, self.proc_root, self.max_age, self.clock = runner, proc_root, max_age, clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._value: ConntrackStats | None = None

    def read(self) -> ConntrackStats | None:
        with self._lock:
            now = self.clock()
            if self._at is None or now - self._at >= self.max_age:
                self._value = read_conntrack(self.runner, self.proc_root)
                self._at = self.clock()
            return self._value
