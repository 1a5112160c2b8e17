"""Scrape a lab agent's /metrics, /healthz and /readyz from inside the node's namespace.

Shared by the metrics and cache-health tests (formerly in test_metrics.py).
"""

from __future__ import annotations

import re
import sys

from dnsguard.testing.lab import Lab

FETCH = r"""
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen("http://127.0.0.1:9253" + sys.argv[1], timeout=5) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""


def get(lab: Lab, path: str) -> tuple[int, str]:
    out = lab.node_run([sys.executable, "-c", FETCH, path], check=False).stdout
    code, _, body = out.partition("\n")
    return int(code or 0), body


def value(body: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} ([0-9.e+-]+|NaN|\+Inf)$", body, re.M)
    assert m, f"{series} not exported"
    return float(m.group(1))
