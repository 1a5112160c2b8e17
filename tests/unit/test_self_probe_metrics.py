"""Self-probe results in the latency histogram: a failure must not poison its sum."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry

from dnsguard.cli import SELF_PROBE_TIMEOUT, record_probe
from dnsguard.metrics import Metrics


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    value = reg.get_sample_value(name, labels)
    assert value is not None, name
    return value


def test_a_failed_probe_lands_past_the_last_bucket_and_keeps_the_sum_finite() -> None:
    reg = CollectorRegistry()
    metrics = Metrics(reg)
    record_probe(metrics, "local", 0.002)
    record_probe(metrics, "local", None)
    total = _value(reg, "dnsguard_probe_duration_seconds_sum", target="local")
    assert math.isfinite(total) and total > SELF_PROBE_TIMEOUT
    last = _value(reg, "dnsguard_probe_duration_seconds_bucket", target="local",
                  le=f"{SELF_PROBE_TIMEOUT:.1f}")
    inf = _value(reg, "dnsguard_probe_duration_seconds_bucket", target="local", le="+Inf")
    assert (last, inf) == (1.0, 2.0)
    assert _value(reg, "dnsguard_probe_failures_total", target="local") == 1.0
