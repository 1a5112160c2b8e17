"""/metrics, /healthz and /readyz of a real agent in a lab node: values move with the lab."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
from dnsguard_helpers import nodelocal_args, start_agent, stop_agent, wait_for

from dnsguard.metrics import SYNC_ERROR_REASONS
from dnsguard.model import ProxyMode
from dnsguard.testing.lab import Lab, LabConfig

pytestmark = pytest.mark.root

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


@pytest.fixture
def lab():
    with Lab(LabConfig(proxy_mode=ProxyMode.IPTABLES, iptables="legacy")) as lab:
        yield lab


def test_metrics_and_health_follow_the_node(lab: Lab, tmp_path: Path) -> None:
    args = [*nodelocal_args(lab, tmp_path / "state"), "--metrics-address", "127.0.0.1:9253",
            "--probe-interval", "0.2"]
    agent = start_agent(lab, args, tmp_path / "agent.log")
    try:
        wait_for(lambda: get(lab, "/readyz")[0] == 200, timeout=20)
        code, body = get(lab, "/metrics")
        assert code == 200
        assert value(body, "dnsguard_rules_in_sync") == 1
        assert value(body, "dnsguard_cache_intercepting") == 1
        assert value(body, "dnsguard_rules_planned") == 23  # 20 + the agent probes' 3
        for reason in SYNC_ERROR_REASONS:  # every series exists at zero from the start
            assert value(body, f'dnsguard_sync_errors_total{{reason="{reason}"}}') == 0
        assert value(body, "dnsguard_outside_changes_total") == 0
        assert value(body, 'dnsguard_conntrack_stat_total{stat="insert_failed"}') >= 0
        assert value(body, "dnsguard_conntrack_max") > 0
        assert get(lab, "/healthz")[0] == 200

        # an outside flush is counted and repaired
        lab.node_run(["iptables-legacy", "-t", "raw", "-F"])
        wait_for(lambda: value(get(lab, "/metrics")[1],
                               "dnsguard_outside_changes_total") == 1, timeout=5)

        # the self probe measures the cache
        wait_for(lambda: value(get(lab, "/metrics")[1],
                               'dnsguard_probe_duration_seconds_count{target="local"}') >= 3,
                 timeout=10)

        # the cache dies: not ready, fail-open counted, then back
        # (the flush above withdrew the ClusterIP, whose health query it made unanswerable, for
        # a beat or two: intercepting again first)
        wait_for(lambda: get(lab, "/readyz")[0] == 200, timeout=10)
        opened = value(get(lab, "/metrics")[1], "dnsguard_cache_fail_open_total")
        pid = int(re.search(r"pid (\d+)", (tmp_path / "agent.log").read_text()).group(1))
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: value(get(lab, "/metrics")[1],
                               "dnsguard_cache_fail_open_total") == opened + 1, timeout=5)
        wait_for(lambda: value(get(lab, "/metrics")[1], "dnsguard_cache_restarts_total") == 1,
                 timeout=10)
        wait_for(lambda: get(lab, "/readyz")[0] == 200, timeout=10)
        assert "cache intercepting" in get(lab, "/readyz")[1]
    finally:
        assert stop_agent(agent) == 0
