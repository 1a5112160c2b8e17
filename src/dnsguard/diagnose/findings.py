"""The doctor's verdict vocabulary: `Severity`, `Finding`, and how findings become an exit code.

A finding is a value: a stable ``id`` (documented, never renamed: people alert on it), a
severity, a one-line summary, the evidence it was drawn from (counter deltas, rates, the
offending rule or setting, as short lines a human can check) and the fix. Classifiers return
lists of them and never print; `render_table` and `to_json` are the only presentations.

Exit codes of ``dnsguard doctor`` (2 stays "bad usage", as for every command):

    0  nothing is warning or critical (info findings may exist)
    1  doctor itself failed (as every command)
    3  the worst finding is a warning
    4  at least one finding is critical
"""

from __future__ import annotations

import enum
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "EXIT_CRITICAL",
    "EXIT_OK",
    "EXIT_WARNING",
    "FINDING_IDS",
    "Finding",
    "Severity",
    "exit_code",
    "render_table",
    "sort_findings",
    "to_json",
]

EXIT_OK, EXIT_WARNING, EXIT_CRITICAL = 0, 3, 4

#: Every id doctor may emit; ids are an interface (alerts, runbooks), so they are listed here.
FINDING_IDS = (
    "conntrack-table-full",
    "conntrack-early-drop",
    "conntrack-insert-failed",
    "conntrack-clash",
    "kernel-clash-fixes",
    "notrack-breaks-dnat",
    "dns-server-rcvbuf-overflow",
    "dns-slow-lookups",
    "dns-unreachable",
    "resolv-search-amplification",
    "interception-without-cache",
    "cache-requestlist-drops",
    "cache-upstream-failing",
    "cache-low-hit-ratio",
    "cache-nxdomain-sources",
)


class Severity(enum.Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "critical": 2}[self.value]


@dataclass(frozen=True)
class Finding:
    id: str
    severity: Severity
    summary: str
    evidence: tuple[str, ...]
    fix: str

    def __post_init__(self) -> None:
        if self.id not in FINDING_IDS:
            raise ValueError(f"unknown finding id {self.id!r}: add it to FINDING_IDS")

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "severity": self.severity.value, "summary": self.summary,
                "evidence": list(self.evidence), "fix": self.fix}


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first, then in the documented id order (stable output for diffs and tests)."""
    return sorted(findings, key=lambda f: (-f.severity.rank, FINDING_IDS.index(f.id)))


def exit_code(findings: Iterable[Finding]) -> int:
    worst = max((f.severity.rank for f in findings), default=0)
    return {0: EXIT_OK, 1: EXIT_WARNING, 2: EXIT_CRITICAL}[worst]


def to_json(findings: Sequence[Finding], **extra: object) -> dict[str, object]:
    return {**extra, "exit_code": exit_code(findings),
            "findings": [f.to_json() for f in sort_findings(findings)]}


def render_table(findings: Sequence[Finding], width: int = 100) -> str:
    """One block per finding: a header row (severity, id, summary), evidence, then the fix."""
    if not findings:
        return "no findings: nothing on this node explains slow DNS in this window\n"
    out = [f"{'SEVERITY':<9} {'ID':<28} SUMMARY"]
    indent = " " * 10
    for f in sort_findings(findings):
        head = f"{f.severity.value.upper():<9} {f.id:<28} "
        out.append(textwrap.fill(f.summary, width, initial_indent=head,
                                 subsequent_indent=" " * len(head), break_long_words=False,
                                 break_on_hyphens=False))
        for line in f.evidence:
            out.append(textwrap.fill(line, width, initial_indent=indent + "- ",
                                     subsequent_indent=indent + "  ", break_long_words=False,
                                     break_on_hyphens=False))
        out.append(textwrap.fill(f.fix, width, initial_indent=indent + "fix: ",
                                 subsequent_indent=indent + "     ", break_long_words=False,
                                 break_on_hyphens=False))
    return "\n".join(out) + "\n"
