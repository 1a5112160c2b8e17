"""Latency statistics shared by the lab's load generator, the DNS probe and the benchmarks.

Pure functions over plain floats (seconds), so every caller summarises latencies the same
way and the numbers in a benchmark, a probe report and a test failure are comparable.

Percentiles use the nearest-rank method: the reported value is always one that was
actually observed. DNS latency has a few huge outliers (the 5 s resolver retry that the
conntrack race causes); interpolating between a 2 ms and a 5 s sample would invent a
latency nobody saw and hide how bimodal the distribution is.

`SLOW_SECONDS` is the line between "answered" and "answered after a resolver retry":
glibc's first retry happens after `options timeout` (5 s by default, 1 s at the least), so
any lookup at or above one second has almost certainly lost a packet somewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["SLOW_SECONDS", "Summary", "percentile", "summarize"]

#: A lookup at least this slow (seconds) counts as slow: it needed a resolver retry.
SLOW_SECONDS = 1.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-th percentile (0 < q <= 100) of already sorted values.

    Sorting is the caller's job so that summarising one sample at several percentiles
    sorts once. An empty sample has no percentile: NaN, which every comparison rejects,
    is safer than a zero that would look like a very fast lookup.
    """
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    if not sorted_values:
        return math.nan
    # exact arithmetic: in floats ceil(99.9 / 100 * 1000) is 1000, not 999
    rank = math.ceil(Fraction(str(q)) * len(sorted_values) / 100)
    return sorted_values[max(rank, 1) - 1]


@dataclass(frozen=True)
class Summary:
    """What a load run or a probe reports about a batch of lookups.

    `count` is every lookup attempted and finished; `ok + failed == count`. Latency fields
    describe successful lookups only (failures have their own, often fast, latency: a fast
    NXDOMAIN must not make the service look quick). `slow` counts successes at or above
    the slow threshold.
    """

    count: int
    ok: int
    failed: int
    p50: float
    p99: float
    max: float
    slow: int

    @property
    def failure_ratio(self) -> float:
        return self.failed / self.count if self.count else 0.0

    @property
    def slow_ratio(self) -> float:
        return self.slow / self.ok if self.ok else 0.0

    def line(self) -> str:
        """One human line for logs and benchmark output."""
        return (
            f"count={self.count} ok={self.ok} failed={self.failed} "
            f"p50={self.p50 * 1000:.2f}ms p99={self.p99 * 1000:.2f}ms "
            f"max={self.max * 1000:.2f}ms slow(>={SLOW_SECONDS:g}s)={self.slow}"
        )


def summarize(
    latencies: Iterable[float], failed: int = 0, slow_seconds: float = SLOW_SECONDS
) -> Summary:
    """Summarise successful lookup latencies (seconds) plus a count of failures."""
    values = sorted(latencies)
    return Summary(
        count=len(values) + failed,
        ok=len(values),
        failed=failed,
        p50=percentile(values, 50),
        p99=percentile(values, 99),
        max=values[-1] if values else math.nan,
        slow=sum(1 for v in values if v >= slow_seconds),
    )
