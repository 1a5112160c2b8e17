"""Classifier: which of the conntrack insert-race fixes the running kernel has.

Three races drop one of a lookup's two queries (A and AAAA from one socket, confirmed on two
CPUs at once). Upstream fixed them in steps; the table below is what doctor compares
``uname -r`` against. Distribution kernels backport: RHEL 8's 4.18 carries the clash resolution
and its ``clash_resolve`` counter. So when the counter exists the version is not trusted to
understate the kernel, and the finding says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dnsguard.diagnose.findings import Finding, Severity

__all__ = ["CLASH_COUNTER_SINCE", "CLASH_FIXES", "ClashFix", "classify_kernel", "parse_release"]


@dataclass(frozen=True)
class ClashFix:
    since: tuple[int, int]
    what: str


CLASH_FIXES = (
    ClashFix((4, 19), "a packet that loses the insert race to an identical entry (same tuple, "
                      "same NAT) is kept instead of dropped"),
    ClashFix((5, 0), "NAT no longer takes the first query's entry for a competitor and moves the "
                     "second query to another source port, so both entries match and the "
                     "clash resolves"),
    ClashFix((5, 6), "clashing entries may both be inserted, so A and AAAA DNATed to two "
                     "different DNS endpoints both survive"),
)
#: The ``clash_resolve`` counter (``clashres`` column) exists from this version on.
CLASH_COUNTER_SINCE = (5, 10)

_RELEASE = re.compile(r"^(\d+)\.(\d+)")


def parse_release(release: str) -> tuple[int, int] | None:
    """``6.18.44-fc-v595`` -> (6, 18); None when it does not start with a version."""
    m = _RELEASE.match(release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _v(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def classify_kernel(release: str | None, has_clash_counter: bool | None) -> list[Finding]:
    """``has_clash_counter``: whether conntrack reports ``clash_resolve`` (None: unknown)."""
    version = parse_release(release) if release else None
    if version is None:
        return []
    missing = [f for f in CLASH_FIXES if version < f.since]
    evidence = [f"running kernel {release}"]
    evidence += [f"{_v(f.since)}: {'missing' if f in missing else 'present'}: {f.what}"
                 for f in CLASH_FIXES]
    if has_clash_counter is not None:
        evidence.append(f"clash_resolve counter {'present' if has_clash_counter else 'absent'}"
                        f" (upstream from {_v(CLASH_COUNTER_SINCE)})")
    if not missing:
        return [Finding(
            "kernel-clash-fixes", Severity.INFO,
            f"kernel {_v(version)} has all three conntrack insert-race fixes",
            tuple(evidence),
            "nothing to do for the races; 5 s stalls here come from full tables, evictions, "
            "lost packets or overloaded DNS servers (see the other findings)",
        )]
    if has_clash_counter:
        return [Finding(
            "kernel-clash-fixes", Severity.INFO,
            f"kernel {_v(version)} predates {len(missing)} race fix(es) upstream, but it "
            "reports clash_resolve, so they were backported",
            tuple(evidence),
            "confirm with the distribution's changelog; watch conntrack-insert-failed",
        )]
    return [Finding(
        "kernel-clash-fixes", Severity.WARNING,
        f"kernel {_v(version)} lacks {len(missing)} of 3 conntrack insert-race fixes "
        f"(needs {_v(CLASH_FIXES[-1].since)} or later)",
        tuple(evidence),
        f"upgrade the node kernel to {_v(CLASH_FIXES[-1].since)} or later; until then keep "
        "DNS out of the race: a node-local DNS cache (dnsguard --mitigation nodelocal), "
        "NOTRACK in IPVS mode, or 'options single-request-reopen' in pods' dnsConfig",
    )]
