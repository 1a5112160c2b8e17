"""Pure aggregation: worker outputs -> per-run statistics, counter deltas, ratios, targets.

Nothing here touches the machine, so every number in the report can be unit-tested from
hand-made inputs. Conventions, shared with `dnsguard.probe` so both read the same:

* every lookup that did not get all its answers (timed out, or failed: refused, no route...)
  is *unanswered* and sorts as +inf. A percentile landing on one is None ("unanswered"),
  never a fast number;
* a timed-out lookup took at least the timeout (5 s, glibc's first retry), so it counts in
  ">= 1 s" and ">= 5 s"; a failed one did not wait and counts as an error only;
* rates are lookups per second of the launch window (``duration``): the load is a closed
  loop in which every lookup starts inside that window, so the few still in flight at its
  end do not stretch the denominator, while one 5 s timeout at the end would if the drain
  counted;
* a lookup is slow "because of the load generator" when, of its lifetime, less than a second
  remains once the time its own worker process sat runnable but unscheduled is taken out
  (`Stall`, measured by the worker). Those are counted apart: on a shared machine they say
  something about the machine, nothing about the DNS path;
* ratios are against a baseline measured in the same run, and None (not 0, not inf) when the
  baseline is missing or zero: a ratio nobody could measure must not read as a verdict.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.worker import decode_latencies
from dnsguard.stats import percentile

__all__ = [
    "CT_COUNTERS",
    "HIST_EDGES",
    "LoadStats",
    "SlowEvent",
    "Stall",
    "Target",
    "WorkerOutput",
    "counter_deltas",
    "extrapolate_between",
    "extrapolate_total",
    "log_histogram",
    "ratio",
    "starved_within",
    "summarize_load",
]

#: Conntrack counters reported per run (``conntrack -S`` names); absent ones are not maintained
#: by the running kernel and are reported as None, never as 0. ``chaintoolong``: a new entry
#: refused because its hash chain was too long (short chains since 5.15); it also counts in
#: ``insert_failed``.
CT_COUNTERS = ("drop", "early_drop", "insert_failed", "clash_resolve", "chaintoolong")

#: Histogram bin edges in seconds: 10 per decade from 10 us to 10 s. Lookups below the first
#: edge land in the first bin, answered ones above the last in the last; unanswered lookups are
#: counted apart.
HIST_EDGES: tuple[float, ...] = tuple(10 ** (e / 10) for e in range(-50, 11))


@dataclass(frozen=True)
class Stall:
    """A gap between two turns of a worker's loop, and how much of it the worker was starved."""

    offset: float  # from the worker's start
    gap: float
    waited: float  # run delay (runnable, not running) measured across the gap

    @property
    def starved_fraction(self) -> float:
        return min(max(self.waited / self.gap, 0.0), 1.0) if self.gap > 0 else 0.0


def starved_within(stalls: Sequence[Stall], start: float, end: float) -> float:
    """Seconds of ``[start, end]`` the worker spent runnable but not running."""
    total = 0.0
    for s in stalls:
        overlap = min(end, s.offset + s.gap) - max(start, s.offset)
        if overlap > 0:
            total += overlap * s.starved_fraction
    return total


@dataclass(frozen=True)
class SlowEvent:
    """A lookup that took >= 1 s or got no answer (the probe lists the first 200 per pod)."""

    offset: float  # seconds from the start of the run (the worker's own start in WorkerOutput)
    latency: float | None  # None: unanswered
    outcome: str  # ok, timeout, refused, ...
    name: str = ""
    pod: str = ""
    #: seconds of this lookup's lifetime its worker was starved (None: not measured)
    starved: float | None = None

    def to_json(self) -> list[object]:
        return [round(self.offset, 3), _r(self.latency), self.outcome, self.name, self.pod,
                None if self.starved is None else round(self.starved, 3)]

    def duration(self, timeout: float) -> float | None:
        """How long the lookup took, a timeout counting as ``timeout``; None for failures."""
        if self.latency is not None:
            return self.latency
        return timeout if self.outcome == "timeout" else None

    def generator_slowed(self, timeout: float, threshold: float = 1.0) -> bool:
        """At least ``threshold`` long, and below it once the generator's starvation is out."""
        d = self.duration(timeout)
        if d is None or d < threshold or self.starved is None:
            return False
        return d - self.starved < threshold


@dataclass(frozen=True)
class WorkerOutput:
    """What one pod's worker printed (`bench.worker`)."""

    label: str
    started: float
    late: float
    elapsed: float
    duration: float
    timeout: float
    lookups: int
    queries: int
    outcomes: Mapping[str, int]
    cpu_seconds: float
    latencies: Sequence[float]
    slow: tuple[SlowEvent, ...] = ()
    #: None when the worker could not measure them (no schedstat)
    stalls: tuple[Stall, ...] | None = None

    @classmethod
    def from_json(cls, line: str) -> WorkerOutput:
        d: dict[str, Any] = json.loads(line)
        lat = decode_latencies(str(d["latencies"]))
        raw = d.get("stalls")
        stalls = None if raw is None else tuple(Stall(float(o), float(g), float(w))
                                                for o, g, w in raw)
        if len(lat) != int(d["lookups"]):
            raise ValueError(f"worker {d.get('label')}: {len(lat)} latencies for "
                             f"{d['lookups']} lookups")
        return cls(
            label=str(d["label"]), started=float(d["started"]), late=float(d["late"]),
            elapsed=float(d["elapsed"]), duration=float(d["duration"]),
            timeout=float(d["timeout"]), lookups=int(d["lookups"]), queries=int(d["queries"]),
            outcomes={str(k): int(v) for k, v in d["outcomes"].items()},
            cpu_seconds=float(d["cpu_seconds"]), latencies=lat,
            slow=tuple(SlowEvent(float(s[0]), None if s[1] is None else float(s[1]), str(s[2]),
                                 str(s[3]) if len(s) > 3 else "", str(d["label"]))
                       for s in d["slow"]),
            stalls=stalls,
        )

    def classified(self) -> tuple[SlowEvent, ...]:
        """The slow events with their ``starved`` time filled in (when stalls were measured)."""
        if self.stalls is None:
            return self.slow
        out = []
        for e in self.slow:
            d = e.duration(self.timeout)
            starved = 0.0 if d is None else starved_within(self.stalls, e.offset, e.offset + d)
            out.append(dataclasses.replace(e, starved=starved))
        return tuple(out)


@dataclass(frozen=True)
class LoadStats:
    """One run of one scenario on one path, all pods merged. Latencies in seconds."""

    lookups: int
    answered: int
    timeouts: int
    errors: Mapping[str, int]
    duration: float
    rate: float
    p50: float | None
    p99: float | None
    p999: float | None
    max: float | None
    at_least_1s: int
    at_least_5s: int
    queries: int
    #: of ``at_least_1s``: lookups that were slow because their own load generator was starved
    #: (classified among the listed slow events, at most 200 per pod); None: not measured
    at_least_1s_generator: int | None
    #: the workers' CPU time per second of the run: cores the load generator itself used
    generator_cores: float
    histogram: tuple[int, ...]
    #: slow or unanswered lookups, offsets from the earliest worker's start
    slow: tuple[SlowEvent, ...] = ()
    pods: int = 0
    #: latest start of a worker after the agreed start time (interpreter start-up), seconds
    late: float = 0.0
    #: longest time any worker sat runnable but unscheduled, and the total over workers
    generator_stall_max: float | None = None
    generator_starved_seconds: float | None = None

    @property
    def at_least_1s_dns(self) -> int:
        """Lookups >= 1 s that the generator's own starvation does not explain."""
        return self.at_least_1s - (self.at_least_1s_generator or 0)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def failed(self) -> int:
        """Lookups without an answer: timeouts plus errors."""
        return self.timeouts + self.error_count

    def to_json(self) -> dict[str, object]:
        return {
            "lookups": self.lookups, "answered": self.answered, "timeouts": self.timeouts,
            "errors": dict(self.errors), "duration_seconds": self.duration,
            "lookups_per_second": round(self.rate, 1),
            "latency_seconds": {"p50": _r(self.p50), "p99": _r(self.p99),
                                "p99.9": _r(self.p999), "max": _r(self.max)},
            "at_least_1s": self.at_least_1s, "at_least_5s": self.at_least_5s,
            "at_least_1s_generator_starved": self.at_least_1s_generator,
            "generator_stall_max_seconds": _r(self.generator_stall_max),
            "generator_starved_seconds": _r(self.generator_starved_seconds),
            "queries": self.queries, "generator_cores": round(self.generator_cores, 3),
            "pods": self.pods, "late_start_seconds": round(self.late, 3),
            "histogram": {"edges_seconds": [_r(e) for e in HIST_EDGES],
                          "counts": list(self.histogram)},
            "slow": [s.to_json() for s in self.slow],
        }


def _r(v: float | None) -> float | None:
    return None if v is None or math.isinf(v) or math.isnan(v) else round(v, 6)


def log_histogram(values: Iterable[float], edges: Sequence[float] = HIST_EDGES) -> list[int]:
    """Counts of finite values per bin ``[edges[i], edges[i+1])``, clamped into the end bins."""
    counts = [0] * (len(edges) - 1)
    last = len(counts) - 1
    for v in values:
        if math.isinf(v) or math.isnan(v):
            continue
        i = bisect.bisect_right(edges, v) - 1
        counts[min(max(i, 0), last)] += 1
    return counts


def _finite_or_none(v: float) -> float | None:
    return None if math.isnan(v) or math.isinf(v) else v


def summarize_load(workers: Sequence[WorkerOutput], duration: float | None = None,
                   max_slow: int = 200) -> LoadStats:
    """Merge the workers of one run. ``duration`` defaults to the workers' launch window."""
    if duration is None:
        duration = max((w.duration for w in workers), default=0.0)
    ordered = sorted(x for w in workers for x in w.latencies)
    outcomes: Counter[str] = Counter()
    for w in workers:
        outcomes.update(w.outcomes)
    timeouts = outcomes.get("timeout", 0)
    errors = {k: v for k, v in sorted(outcomes.items()) if k not in ("ok", "timeout") and v}
    answered = [v for v in ordered if not math.isinf(v)]
    timeout = min((w.timeout for w in workers), default=math.inf)
    top = ordered[-1] if ordered else math.nan
    t0 = min((w.started for w in workers), default=0.0)
    classified = [(w, e) for w in workers for e in w.classified()]
    measured = bool(workers) and all(w.stalls is not None for w in workers)
    by_generator = sum(1 for w, e in classified if e.generator_slowed(w.timeout))
    slow = sorted((dataclasses.replace(e, offset=e.offset + w.started - t0)
                   for w, e in classified), key=lambda s: s.offset)[:max_slow]
    starved = [s.gap * s.starved_fraction for w in workers for s in (w.stalls or ())]
    # cores used by the workers running at the same time (one per pod), averaged over rounds
    cpu = sum(w.cpu_seconds for w in workers)
    busy = sum(w.elapsed for w in workers)
    pods = len({w.label for w in workers})
    return LoadStats(
        lookups=len(ordered),
        answered=len(answered),
        timeouts=timeouts,
        errors=errors,
        duration=duration,
        rate=len(ordered) / duration if duration > 0 else 0.0,
        p50=_finite_or_none(percentile(ordered, 50)),
        p99=_finite_or_none(percentile(ordered, 99)),
        p999=_finite_or_none(percentile(ordered, 99.9)),
        max=_finite_or_none(top),
        at_least_1s=sum(1 for v in answered if v >= 1.0) + (timeouts if timeout >= 1.0 else 0),
        at_least_5s=sum(1 for v in answered if v >= 5.0) + (timeouts if timeout >= 5.0 else 0),
        queries=sum(w.queries for w in workers),
        at_least_1s_generator=by_generator if measured else None,
        generator_stall_max=max(starved, default=0.0) if measured else None,
        generator_starved_seconds=sum(starved) if measured else None,
        generator_cores=cpu / busy * pods if busy > 0 else 0.0,
        histogram=tuple(log_histogram(answered)),
        slow=tuple(slow),
        pods=pods,
        late=max((w.late for w in workers), default=0.0),
    )


def counter_deltas(before: Mapping[str, int], after: Mapping[str, int],
                   names: Sequence[str] = CT_COUNTERS) -> dict[str, int | None]:
    """``after - before`` per counter; None where either reading lacks it (not maintained)."""
    return {n: (after[n] - before[n] if n in before and n in after else None) for n in names}


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None when either is missing or the base is zero."""
    if value is None or base is None or base == 0 or math.isnan(base) or math.isnan(value):
        return None
    return value / base


def extrapolate_total(per_item: Sequence[float], total: int) -> float:
    """Estimated time for ``total`` items when only the first ``len(per_item)`` were timed.

    One iptables exec per rule costs a constant (fork, exec, lock) plus a part that grows with
    the table the tool reads and rewrites each time, so per-item time is fitted as ``a + b*i``
    (least squares, ``b`` clamped at 0: a table never gets cheaper to rewrite as it grows) and
    summed over the items not measured. Measured items are taken as they were.
    """
    n = len(per_item)
    if total <= n:
        return float(sum(per_item[:total]))
    if n == 0:
        raise ValueError("nothing measured to extrapolate from")
    if n == 1:
        return per_item[0] * total
    mean_i = (n - 1) / 2
    mean_t = sum(per_item) / n
    var = sum((i - mean_i) ** 2 for i in range(n))
    b = max(sum((i - mean_i) * (t - mean_t) for i, t in enumerate(per_item)) / var, 0.0)
    a = mean_t - b * mean_i
    rest = sum(a + b * i for i in range(n, total))
    return float(sum(per_item)) + max(rest, 0.0)


def extrapolate_between(first: tuple[float, float], last: tuple[float, float],
                        total: int) -> float:
    """Estimated time for ``total`` items added one by one to an empty table, from two samples
    of per-item time, each ``(table size it was measured at, seconds per item)``.

    Per-item time is taken as linear in the size of the table it works on (``a + b*size``, ``b``
    clamped at 0 as in `extrapolate_total`: the line through both samples), so the items cost
    ``total`` times the per-item time at the mean size, ``(total - 1) / 2``. A sample of items
    added from size ``s`` on measures the mean of sizes ``s .. s+k-1``.
    """
    (x1, y1), (x2, y2) = sorted((first, last))
    if total < 0 or x1 < 0:
        raise ValueError("sizes and totals are counts")
    b = max((y2 - y1) / (x2 - x1), 0.0) if x2 > x1 else 0.0
    a = (y1 + y2) / 2 - b * (x1 + x2) / 2
    return total * max(a + b * (total - 1) / 2, 0.0)


@dataclass(frozen=True)
class Target:
    """One of the issue's targets and what this run measured against it.

    ``met`` is None when the run could not measure it (e.g. pressure without
    ``--allow-sysctl``): unknown is reported as unknown.
    """

    name: str
    goal: str
    measured: str
    met: bool | None
    details: Mapping[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "goal": self.goal, "measured": self.measured,
                "met": self.met, "details": dict(self.details)}
