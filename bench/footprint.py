"""The agent's footprint: memory and CPU of ``dnsguard run`` (node-local), idle and under churn.

Read from ``/proc/PID/stat`` and ``/proc/PID/status`` of the agent process (the PID that
`Lab.popen_in` started: ``ip netns exec`` execs into Python). CPU counts the agent *and the
tools it ran and reaped* (``cutime``/``cstime``: iptables-save, iptables-restore, the switch
refresh every 0.5 s), because that is what the node pays for it. unbound is reported apart.

Three states: idle with facts from flags; netfilter churn, where someone outside flushes
dnsguard's chain every second and the agent (``--sync-interval 1``) notices and restores it;
Kubernetes facts churn, where the agent takes its facts from a fake API server whose DNS
endpoints change every second (`bench.fakeapi`), so it re-plans and reloads unbound each time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcSample", "Usage", "measure_usage", "sample", "usage_between"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    at: float  # monotonic seconds
    cpu: float  # seconds: self + reaped children
    rss: int  # bytes
    hwm: int  # bytes: peak RSS so far


def sample(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields after ")": state(3) ... utime(14) stime(15) cutime(16) cstime(17) -> index-3
    cpu = sum(int(stat[i]) for i in (11, 12, 13, 14)) / _TICK
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    rss = int(fields["VmRSS"].split()[0]) * 1024
    hwm = int(fields["VmHWM"].split()[0]) * 1024
    return ProcSample(time.monotonic(), cpu, rss, hwm)


@dataclass(frozen=True)
class Usage:
    seconds: float
    cpu_percent: float  # of one core
    rss_mib: float  # at the end
    max_rss_mib: float  # highest sampled
    hwm_mib: float  # the kernel's peak

    def to_json(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 1), "cpu_percent_of_one_core":
                round(self.cpu_percent, 2), "rss_mib": round(self.rss_mib, 1),
                "max_rss_mib": round(self.max_rss_mib, 1), "peak_rss_mib": round(self.hwm_mib, 1)}


def usage_between(samples: list[ProcSample]) -> Usage:
    """CPU over the span of ``samples`` and the RSS they saw (at least two samples)."""
    if len(samples) < 2:
        raise ValueError("need two samples")
    first, last = samples[0], samples[-1]
    span = last.at - first.at
    mib = 1024 * 1024
    return Usage(span, 100 * (last.cpu - first.cpu) / span if span > 0 else 0.0,
                 last.rss / mib, max(s.rss for s in samples) / mib, last.hwm / mib)


def measure_usage(pid: int, seconds: float, every: float = 0.5,
                  tick: Callable[[int], None] | None = None) -> Usage:
    """Sample ``pid`` for ``seconds``; ``tick(i)`` runs after each sample (to cause churn)."""
    samples = [sample(pid)]
    end = samples[0].at + seconds
    i = 0
    while time.monotonic() < end:
        time.sleep(min(every, max(end - time.monotonic(), 0.0)))
        samples.append(sample(pid))
        if tick is not None:
            tick(i)
        i += 1
    return usage_between(samples)
