"""Helpers for tests that drive `KubeSource` against the fake API server.

Shared by the kube source and kube scale tests (formerly in test_kube_source.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from dnsguard.kube import ClusterFacts, KubeSource


def wait_facts(src: KubeSource, predicate: Callable[[ClusterFacts], bool],
               timeout: float = 1.0) -> ClusterFacts:
    """Facts once ``predicate`` holds, waiting on wait_changed; fails after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        facts = src.snapshot()
        if facts is not None and predicate(facts):
            return facts
        left = end - time.monotonic()
        if left <= 0:
            pytest.fail(f"facts did not change within {timeout}s: {facts}")
        src.wait_changed(left)
