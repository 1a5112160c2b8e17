"""The cache's own numbers from a live agent in a lab node: present from the first scrape, moving
with the traffic the lab sends, and monotonic when unbound reloads or is killed and restarted.

What this cannot prove: behaviour under a saturated unbound (the request list filling), which
the recorded statistics in tests/unit/data/unbound cover at the parsing level only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dnsguard.cache.stats import QUERY_TYPES, RCODES, CacheStats, CacheStatsCollector
from dnsguard.model import ProxyMode
from dnsguard.testing.lab import Lab, LabConfig, pod_ip
from tests.support.lab_helpers import dnsguard, nodelocal_args, start_agent, stop_agent, wait_for

pytestmark = pytest.mark.root

FETCH = r"""
import sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:9253" + sys.argv[1], timeout=5) as r:
    print(r.read().decode())
"""

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(lab: Lab) -> Series:
    body = lab.node_run([sys.executable, "-c", FETCH, "/metrics"], check=False).stdout
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def get(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), float("nan"))


@pytest.fixture
def lab():
    with Lab(LabConfig(proxy_mode=ProxyMode.IPTABLES, iptables="legacy")) as lab:
        yield lab


def test_cache_series_follow_traffic_faults_and_restarts(lab: Lab, tmp_path: Path) -> None:
    # example.org goes to the first DNS pod alone, over UDP (a --forward-zone): one upstream whose
    # stop the cache cannot route around, and whose timeouts unbound counts per query
    zone_ep = lab.dns_endpoints[0]
    args = [*nodelocal_args(lab, tmp_path / "state"), "--metrics-address", "127.0.0.1:9253",
            "--forward-zone", f"example.org={zone_ep}"]
    agent = start_agent(lab, args, tmp_path / "agent.log")
    try:
        wait_for(lambda: get(scrape(lab), "dnsguard_cache_stats_up") == 1, timeout=30)
        start = scrape(lab)
        # every series the collector declares (bar the per-upstream ones, which follow the
        # configured forwarders) is in the first scrape
        declared = {(s.name, frozenset(s.labels.items()))
                    for fam in CacheStatsCollector(CacheStats).collect() for s in fam.samples}
        assert len(declared) > 50 and declared <= set(start), declared - set(start)
        # present from the start, at zero where nothing has happened yet
        for t in (*QUERY_TYPES, "other"):
            assert (("dnsguard_cache_queries_by_type_total", frozenset({("type", t)}))
                    in start), t
        for r in (*RCODES, "other"):
            assert get(start, "dnsguard_cache_responses_total", rcode=r) >= 0, r
        assert get(start, "dnsguard_cache_responses_total", rcode="SERVFAIL") == 0
        for reason in ("exceeded", "overwritten"):
            assert get(start, "dnsguard_cache_requestlist_dropped_total", reason=reason) == 0
        assert get(start, "dnsguard_cache_stats_resets_total") == 0
        dot = {"zone": "example.org.", "upstream": str(zone_ep)}
        assert get(start, "dnsguard_cache_upstream_timeouts_total", **dot) == 0

        # traffic: queries, hits and misses move; the hit ratio is computable
        wait_for(lambda: get(scrape(lab), "dnsguard_cache_intercepting") == 1, timeout=20)
        lab.lookup_load(count=40, duration=3)
        wait_for(lambda: get(scrape(lab), "dnsguard_cache_hits_total")
                 >= get(start, "dnsguard_cache_hits_total") + 40, timeout=20)
        loaded = scrape(lab)
        assert get(loaded, "dnsguard_cache_misses_total") > get(start,
                                                                "dnsguard_cache_misses_total")
        assert get(loaded, "dnsguard_cache_queries_by_type_total", type="AAAA") > 0
        assert get(loaded, "dnsguard_cache_recursion_duration_seconds_count") > 0

        # an operator's live view reads the same numbers (plain text: not a terminal)
        view = lab.node_run(["timeout", "8", sys.executable, "-m", "dnsguard", "status",
                             "--watch", "--metrics-address", "127.0.0.1:9253"],
                            check=False).stdout
        assert view.count("dnsguard status --watch") >= 2, view
        assert "rules       in sync" in view and "intercept   yes" in view
        assert re.search(r"cache       [\d.]+ queries/s, hit ratio", view), view

        # the zone's upstream stops answering: its timeouts and SERVFAILs are counted
        dnsmasqs = [lab._dns_procs[0].pid]  # ip netns exec execs dnsmasq: same PID
        for pid in dnsmasqs:
            os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(3):
                lab.pod_run(0, ["dig", "+time=3", "+tries=1", f"stopped{i}.example.org"],
                            check=False)
            wait_for(lambda: get(scrape(lab), "dnsguard_cache_upstream_timeouts_total", **dot)
                     >= 1, timeout=20)
        finally:
            for pid in dnsmasqs:
                os.kill(pid, signal.SIGCONT)
        faulted = scrape(lab)
        assert get(faulted, "dnsguard_cache_upstream_rto_seconds", **dot) > 1

        # a config reload (what a CoreDNS rollout causes: new endpoints) zeroes unbound's
        # statistics in place; then unbound is killed and the agent restarts it. Either way
        # every counter carries on from where it was.
        ctl = ["unbound-control", "-c", str(tmp_path / "state/unbound.conf")]
        for resets, fault in enumerate(("reload", "kill"), start=1):
            before = scrape(lab)
            if fault == "reload":
                lab.node_run([*ctl, "reload"])
            else:
                pid = int(lab.node_run([*ctl, "status"]).stdout.split("pid ")[1].split(")")[0])
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda r=resets: get(scrape(lab), "dnsguard_cache_stats_resets_total")
                     == r, timeout=30)
            lab.pod_run(0, ["dig", "+time=2", f"after-{fault}.example.org"], check=False)
            wait_for(lambda b=before: get(scrape(lab), "dnsguard_cache_queries_total")
                     > get(b, "dnsguard_cache_queries_total"), timeout=30)
            after = scrape(lab)
            for (name, labels), value in before.items():
                if name.startswith("dnsguard_cache_") and name.endswith(
                        ("_total", "_count", "_bucket", "_sum")):
                    assert after[(name, labels)] >= value, (fault, name, labels)
        print(f"\nqueries {get(after, 'dnsguard_cache_queries_total'):.0f}, hits "
              f"{get(after, 'dnsguard_cache_hits_total'):.0f}, "
              f"upstream timeouts {get(after, 'dnsguard_cache_upstream_timeouts_total', **dot)}")
    finally:
        assert stop_agent(agent) == 0


def test_query_log_from_the_flag_toggled_live_and_kept_across_a_restart(
        lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = [*nodelocal_args(lab, state), "--metrics-address", "127.0.0.1:9253",
            "--log-queries"]
    agent = start_agent(lab, args, tmp_path / "agent.log")
    log = state / "unbound.log"
    pod = str(pod_ip(0))

    def logged(name: str) -> bool:
        lab.pod_run(0, ["dig", "+time=2", "+tries=1", f"{name}.example.org"], check=False)
        return any(pod in ln and f"{name}.example.org." in ln
                   for ln in log.read_text(errors="replace").splitlines())

    try:
        wait_for(lambda: get(scrape(lab), "dnsguard_cache_intercepting") == 1, timeout=30)
        wait_for(lambda: logged("first"), timeout=20)  # --log-queries applied on start
        off = dnsguard(lab, "cache-log", "off", "--state-dir", str(state))
        assert off.returncode == 0 and "query log off" in off.stdout, off.stderr
        logged("while-off")
        on = dnsguard(lab, "cache-log", "on", "--state-dir", str(state))
        assert on.returncode == 0 and "query log on" in on.stdout, on.stderr
        wait_for(lambda: logged("while-on"), timeout=20)
        # checked only now: a line written just after dig returned would be in by now
        assert "while-off.example.org." not in log.read_text(errors="replace")
        # a restarted unbound forgets set_option; the agent applies --log-queries again
        pid = int(lab.node_run(["unbound-control", "-c", str(state / "unbound.conf"),
                                "status"]).stdout.split("pid ")[1].split(")")[0])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: get(scrape(lab), "dnsguard_cache_stats_resets_total") == 1,
                 timeout=30)
        wait_for(lambda: get(scrape(lab), "dnsguard_cache_intercepting") == 1, timeout=30)
        wait_for(lambda: logged("after-restart"), timeout=20)
    finally:
        assert stop_agent(agent) == 0
    bad = dnsguard(lab, "cache-log", "on", "--state-dir", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and "cannot reach the cache" in bad.stderr


def test_doctor_names_the_pod_behind_an_nxdomain_storm(lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = [*nodelocal_args(lab, state), "--log-queries"]
    agent = start_agent(lab, args, tmp_path / "agent.log")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"storm{i}.example.org A\n" for i in range(20000)))
    try:
        wait_for(lambda: "query log on" in dnsguard(lab, "cache-log", "status",
                                                     "--state-dir", str(state)).stdout,
                 timeout=30)
        # one pod asks for names that do not exist, for a bounded time, while doctor watches
        storm = lab.popen_in(lab.pod_netns[1], ["timeout", "12", "dig", "+time=1", "+tries=1",
                                                "+short", "-f", str(names)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        doctor = dnsguard(lab, "doctor", "--json", "--window", "5", "--no-probe",
                          "--resolv-conf", "", *args)
        storm.wait(timeout=30)
    finally:
        assert stop_agent(agent) == 0
    doc = json.loads(doctor.stdout)
    found = {f["id"]: f for f in doc["findings"]}
    assert {"cache-low-hit-ratio", "cache-nxdomain-sources"} <= set(found), doctor.stdout
    top = found["cache-nxdomain-sources"]["evidence"][1]
    assert top.startswith(f"{pod_ip(1)}: "), top
    assert "storm" in top
    print(f"\n{found['cache-low-hit-ratio']['evidence'][0]}\n{top[:120]}")
