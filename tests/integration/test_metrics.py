"""/metrics, /healthz and /readyz of a real agent in a lab node: values move with the lab."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dnsguard.metrics import SYNC_ERROR_REASONS
from dnsguard.model import ProxyMode
from dnsguard.testing.lab import Lab, LabConfig
from tests.support.lab_helpers import nodelocal_args, start_agent, stop_agent, wait_for
from tests.support.scrape import get, value

pytestmark = pytest.mark.root

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

        # the cache hangs: not ready (503, saying why) for as long as it hangs, yet alive (a
        # hung cache must not get the agent restarted), then ready again once it answers.
        # SIGSTOP, not a kill: a killed cache is restarted within a beat, too short a 503 to see
        # (the flush above withdrew the ClusterIP, whose health query it made unanswerable, for
        # a beat or two: intercepting again first)
        wait_for(lambda: get(lab, "/readyz")[0] == 200, timeout=10)
        pid = int(re.search(r"pid (\d+)", (tmp_path / "agent.log").read_text()).group(1))
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: get(lab, "/readyz")[0] == 503, timeout=10)
            code, why = get(lab, "/readyz")
            assert (code, why.startswith("cache not intercepting:")) == (503, True), why
            assert get(lab, "/healthz")[0] == 200
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: get(lab, "/readyz")[0] == 200, timeout=10)

        # the cache dies: fail-open counted, restarted, then ready again
        opened = value(get(lab, "/metrics")[1], "dnsguard_cache_fail_open_total")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: value(get(lab, "/metrics")[1],
                               "dnsguard_cache_fail_open_total") == opened + 1, timeout=5)
        wait_for(lambda: value(get(lab, "/metrics")[1], "dnsguard_cache_restarts_total") == 1,
                 timeout=10)
        wait_for(lambda: get(lab, "/readyz")[0] == 200, timeout=10)
        assert "cache intercepting" in get(lab, "/readyz")[1]
    finally:
        assert stop_agent(agent) == 0


def _threads_and_rss(pid: int) -> tuple[int, int]:
    """(threads, RSS in KiB) of ``pid`` from /proc."""
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def test_a_flood_of_idle_and_slow_connections_cannot_starve_the_probes(
        lab: Lab, tmp_path: Path) -> None:
    """500 idle and 100 slow-loris connections (reopened as fast as the server closes them):
    the real agent's thread count and RSS stay bounded and every normal scrape answers.

    Before the bounded server, each connection held a thread for as long as it stayed open.
    """
    args = [*nodelocal_args(lab, tmp_path / "state"), "--metrics-address", "127.0.0.1:9253"]
    agent = start_agent(lab, args, tmp_path / "agent.log")
    try:
        wait_for(lambda: get(lab, "/readyz")[0] == 200, timeout=20)
        get(lab, "/metrics")
        base_threads, base_rss = _threads_and_rss(agent.pid)
        samples: list[tuple[int, int]] = []
        flood = lab.popen_in(lab.node_netns, [
            sys.executable, str(Path(__file__).with_name("slowloris.py")), "127.0.0.1", "9253",
            "500", "100", "15", "5"], stdout=subprocess.PIPE)
        assert flood.stdout is not None
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                samples.append(_threads_and_rss(agent.pid))

        sampler = threading.Thread(target=sample)
        assert flood.stdout.readline().strip() == "flooding"
        sampler.start()
        try:
            report = json.loads(flood.stdout.readline())
            assert flood.wait(timeout=30) == 0
        finally:
            done.set()
            sampler.join()
            flood.stdout.close()
        scrapes = report["scrapes"]
        failed = [s for s in scrapes if s["code"] != 200]
        worst = max(s["seconds"] for s in scrapes)
        most_threads = max(t for t, _ in samples)
        most_rss = max(r for _, r in samples)
        print(f"flood: {len(scrapes)} scrapes, slowest {worst:.3f}s; threads {base_threads} -> "
              f"max {most_threads}; RSS {base_rss} KiB -> max {most_rss} KiB; "
              f"{report['closed_by_server']} connections closed by the server, "
              f"{report['refused']} refused, {report['most_open']} open at most")
        assert len(scrapes) >= 10 and not failed, failed
        # the loop and at most 4 answering workers: never a thread per connection
        assert most_threads <= base_threads + 4
        assert most_rss - base_rss < 16 * 1024
        # the flood was real: the server had to close its connections, again and again
        assert report["closed_by_server"] > 600
        assert get(lab, "/healthz")[0] == 200
    finally:
        assert stop_agent(agent) == 0
