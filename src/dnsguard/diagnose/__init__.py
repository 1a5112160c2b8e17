"""``dnsguard doctor``: sample the node, classify, report.

Layers, in the direction of imports:

    samples.py    frozen inputs (counter windows, rule dumps, probe reports, resolv.conf)
    findings.py   Finding, Severity, exit codes, table and JSON output
    conntrack.py, kernel.py, rules.py, dns.py, intercept.py, cache.py
                  pure classifiers: samples in, findings out; no I/O, no clock
    sampler.py    the only I/O: reads the node (through the Runner and proc_root) twice
                  over a window, with the built-in probe running in between

`classify` runs every classifier; a sample that is missing yields no finding, so doctor on a
node without conntrack, kube-proxy or a DNS server says less, never something wrong.
"""

from __future__ import annotations

from dnsguard.diagnose.cache import classify_cache
from dnsguard.diagnose.conntrack import classify_conntrack
from dnsguard.diagnose.dns import classify_probes, classify_rcvbuf, classify_resolv
from dnsguard.diagnose.findings import (
    EXIT_CRITICAL,
    EXIT_OK,
    EXIT_WARNING,
    FINDING_IDS,
    Finding,
    Severity,
    exit_code,
    render_table,
    sort_findings,
    to_json,
)
from dnsguard.diagnose.intercept import classify_interception
from dnsguard.diagnose.kernel import classify_kernel
from dnsguard.diagnose.rules import classify_notrack
from dnsguard.diagnose.samples import Samples

__all__ = [
    "EXIT_CRITICAL",
    "EXIT_OK",
    "EXIT_WARNING",
    "FINDING_IDS",
    "Finding",
    "Samples",
    "Severity",
    "classify",
    "exit_code",
    "render_table",
    "to_json",
]


def classify(samples: Samples) -> list[Finding]:
    """Every finding the samples support, worst first."""
    ct = samples.conntrack
    has_clash = None if ct is None else ct.after.get("clash_resolve") is not None
    return sort_findings([
        *classify_conntrack(ct),
        *classify_kernel(samples.kernel_release, has_clash),
        *classify_notrack(samples.rules),
        *classify_rcvbuf(samples.dns_servers),
        *classify_probes(samples.probes),
        *classify_resolv(samples.resolv),
        *classify_interception(samples.rules, samples.udp_listeners, samples.probes),
        *classify_cache(samples.cache),
    ])
