"""Node-local cache mode on the real kernel: pods keep their resolv.conf, lookups bypass
conntrack, and DNS never black-holes when the cache, or the agent with it, dies.

Client pods resolve with glibc's getaddrinfo (parallel A and AAAA from one socket). Recovery
times are measured against the host's monotonic clock, which pods share.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnsguard.model import ALIVE_SECONDS, Family
from dnsguard.testing.lab import Lab, LabConfig, pod_ip
from tests.support.lab_helpers import (
    VARIANTS,
    conntrack_to,
    dnsguard,
    nodelocal_args,
    start_agent,
    status,
    stop_agent,
    wait_for,
    without_empty_legacy_tables,
)
from tests.support.timeline import Timeline

pytestmark = pytest.mark.root

#: The issue's bound for lookups to work again after the cache (or the agent) is killed.
RECOVERY_BOUND = 3.0
#: glibc's default per-query timeout: what a query lost in flight costs, whatever the server
GLIBC_RETRY = 5.0

@pytest.fixture(params=["iptables-nft", "iptables-legacy", "nftables"])
def lab(request: pytest.FixtureRequest):
    mode, flavour, _ = VARIANTS[request.param]
    with Lab(LabConfig(proxy_mode=mode, iptables=flavour, ipv6=True)) as lab:  # type: ignore[arg-type]
        yield lab


@pytest.fixture
def agent(lab: Lab, tmp_path: Path):
    """A running agent, healthy and intercepting; stopped (SIGTERM) at the end if alive."""
    state = tmp_path / "state"
    args = nodelocal_args(lab, state)
    log = tmp_path / "agent.log"
    proc = start_agent(lab, args, log)
    try:
        wait_for(lambda: _cache(lab, args).get("intercepting") is True, timeout=20)
    except AssertionError:
        stop_agent(proc)
        raise AssertionError(log.read_text()) from None
    yield proc, args, state, log
    if proc.poll() is None:
        stop_agent(proc)


def _cache(lab: Lab, args: list[str]) -> dict[str, object]:
    doc = status(lab, args).get("cache")
    return doc if isinstance(doc, dict) else {}


def _unbound_queries(lab: Lab, state: Path) -> int:
    out = lab.node_run(["unbound-control", "-c", str(state / "unbound.conf"),
                        "stats_noreset"]).stdout
    stats = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return int(float(stats["total.num.queries"]))


def test_pods_resolve_through_the_cache_without_conntrack_and_upstream_over_tcp(
        lab: Lab, agent) -> None:
    _, args, state, _ = agent
    lab.flush_conntrack()
    served = _unbound_queries(lab, state)
    result = lab.lookup_load(count=100, concurrency=4, duration=20)
    s = result.summary()
    assert s.failed == 0 and s.count == 100 * len(lab.pod_netns)
    # every lookup reached the cache (A+AAAA, search list expansion: more queries than lookups)
    assert _unbound_queries(lab, state) - served >= s.count
    for ip in lab.dns_ips:
        assert conntrack_to(lab, str(ip)) == 0, f"tracked DNS to {ip}"
    assert conntrack_to(lab, "169.254.20.10") == 0
    udp_up = tcp_up = 0
    for ep in lab.dns_endpoints:
        fam = "ipv6" if ep.version == 6 else "ipv4"
        for proto in ("udp", "tcp"):
            out = lab.node_run(["conntrack", "-L", "-f", fam, "-p", proto, "--orig-dst", str(ep)],
                               check=False).stdout
            n = sum(1 for ln in out.splitlines() if "dport=53" in ln)
            udp_up += n if proto == "udp" else 0
            tcp_up += n if proto == "tcp" else 0
    assert udp_up == 0, "the cache must not query its upstreams over UDP"
    assert tcp_up >= 1
    assert status(lab, args)["in_sync"] is True


def test_kill_9_of_the_cache_falls_back_within_the_bound_and_interception_resumes(
        lab: Lab, agent) -> None:
    _, args, _, log = agent
    pid = _cache(lab, args)["pid"]
    assert isinstance(pid, int)
    lab.flush_conntrack()  # intercepted lookups leave no entries: any after this fell back
    timeline = Timeline(lab, 0, seconds=8)
    time.sleep(1.5)  # lookups before the kill: the timeline's baseline, not a wait
    assert _tracked_dns_from_pod(lab, 0) == 0  # the baseline: intercepted, so untracked
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    samples = timeline.result()
    took, inflight = Timeline.recovery(samples, killed_at)
    print(f"\nkill -9 cache: new lookups succeed {took:.2f}s after the kill; "
          f"worst in-flight lookup {inflight:.2f}s")
    assert took <= RECOVERY_BOUND
    assert inflight <= GLIBC_RETRY + 1.5
    assert sum(1 for _, _, ok in samples if ok) > 0.8 * len(samples)
    # Fall-back, not only a fast restart: some lookups of the pod went kube-proxy's way
    # (tracked and DNATed) while the cache was down. A restart alone would leave none.
    assert _tracked_dns_from_pod(lab, 0) > 0
    wait_for(lambda: _cache(lab, args).get("intercepting") is True, timeout=15)
    doc = _cache(lab, args)
    assert doc["restarts"] == 1 and doc["pid"] != pid
    assert "was killed by signal 9" in log.read_text()


def _tracked_dns_from_pod(lab: Lab, pod: int) -> int:
    """Conntrack entries from client pod ``pod`` to a cluster DNS address, port 53."""
    n = 0
    for ip in lab.dns_ips:
        fam = Family.of(ip)
        out = lab.node_run(["conntrack", "-L", "-f", f"ipv{fam.value}", "--orig-src",
                            str(pod_ip(pod, fam)), "--orig-dst", str(ip)], check=False).stdout
        n += sum(1 for ln in out.splitlines() if "dport=53 " in ln)
    return n


def test_kill_9_of_agent_and_cache_together_falls_back_and_cleanup_removes_all(
        lab: Lab, agent, tmp_path: Path) -> None:
    proc, args, state, _ = agent
    cache_pid = _cache(lab, args)["pid"]
    assert isinstance(cache_pid, int)
    before_cleanup_check = lab.save_rules()
    assert "DNSGUARD" in before_cleanup_check or "dnsguard" in before_cleanup_check
    timeline = Timeline(lab, 1, seconds=8)
    time.sleep(1.5)
    killed_at = time.monotonic()
    # what an OOM kill of the pod does: every process dies, no handler runs. The agent is
    # frozen first so that its unbound exit watcher cannot withdraw interception either: only
    # the kernel-side switch expiring can bring DNS back.
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(cache_pid, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    for p in (proc.pid, cache_pid):
        wait_for(lambda p=p: not Path(f"/proc/{p}").exists() or _zombie(p), timeout=5)
    samples = timeline.result()
    took, inflight = Timeline.recovery(samples, killed_at)
    print(f"\nkill -9 agent+cache: new lookups succeed {took:.2f}s after the kill; "
          f"worst in-flight lookup {inflight:.2f}s")
    assert took <= RECOVERY_BOUND
    assert took >= 0.5, "nothing but the switch expiring should have restored DNS"
    caught = [s for s in samples if killed_at - 1 <= s[0] < killed_at + took]
    print(f"  lookups started before recovery: {len(caught)}, "
          f"{sum(1 for s in caught if not s[2])} failed")
    assert inflight <= GLIBC_RETRY + 1.5
    assert not any(_comm(p) in ("unbound", "dnsguard") for p in _pids_in(lab))
    assert _cache(lab, args)["agent"] == "not running"
    res = dnsguard(lab, "cleanup", "--state-dir", str(state))
    assert res.returncode == 0
    assert "DNSGUARD" not in lab.save_rules() and "dnsguard" not in lab.save_rules()
    assert lab.node_run(["ip", "link", "show", "dnsguard0"], check=False).returncode != 0
    assert not any((state / n).exists() for n in ("unbound.conf", "status.json", "unbound.ctl"))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pids_in(lab: Lab) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", lab.node_netns], capture_output=True,
                         text=True, check=False).stdout
    return [int(p) for p in out.split()]


def test_sigterm_under_load_fails_no_lookup_and_restores_tables(lab: Lab, tmp_path: Path) -> None:
    before = lab.save_rules()
    args = nodelocal_args(lab, tmp_path / "state")
    log = tmp_path / "agent.log"
    proc = start_agent(lab, args, log)
    wait_for(lambda: _cache(lab, args).get("intercepting") is True, timeout=20)
    timelines = [Timeline(lab, i, seconds=7, gap=0.01) for i in range(len(lab.pod_netns))]
    time.sleep(2)
    assert stop_agent(proc) == 0, log.read_text()
    samples = [s for t in timelines for s in t.result()]
    failed = [s for s in samples if not s[2]]
    slow = [s for s in samples if s[1] - s[0] >= 1.0]
    print(f"\nSIGTERM under load: {len(samples)} lookups, {len(failed)} failed, {len(slow)} >=1s")
    assert not failed and not slow
    assert without_empty_legacy_tables(lab.save_rules()) == without_empty_legacy_tables(before)
    log_text = log.read_text()
    assert log_text.index("draining") < log_text.index("teardown removed")


def _one_lookup_works(lab: Lab) -> bool:
    r = lab.lookup_load(pods=[0], count=1, concurrency=1, duration=3, grace=3)
    return not r.failures and len(r.latencies) == 1


def test_unreachable_upstream_fails_open_and_status_says_why(lab: Lab, tmp_path: Path) -> None:
    # in the pod range, but nobody is there
    args = nodelocal_args(lab, tmp_path / "state", upstreams=["198.18.0.250"])
    proc = start_agent(lab, args, tmp_path / "agent.log")
    try:
        # the reason itself, not a message quoting the state dir (named after this test)
        wait_for(lambda: str(_cache(lab, args).get("reason")).startswith("upstream probe"),
                 timeout=30)
        doc = _cache(lab, args)
        assert doc["intercepting"] is False and doc["agent"] == "running"
        # the switch expires (or was withdrawn) within ALIVE_SECONDS: kube-proxy's path answers
        # from then on; the bound is generous for a shared machine, the load below is the test
        wait_for(lambda: _one_lookup_works(lab), timeout=ALIVE_SECONDS + 10)
        assert lab.lookup_load(count=10, concurrency=2, duration=15).summary().failed == 0
    finally:
        stop_agent(proc)


def test_missing_unbound_is_a_clear_error_and_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    before = lab.save_rules()
    args = [*nodelocal_args(lab, tmp_path / "state"), "--unbound", "/nonexistent/unbound"]
    res = dnsguard(lab, "run", *args, timeout=30)
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("dnsguard: error:")]
    assert errors == ["dnsguard: error: /nonexistent/unbound-checkconf not found: install unbound"]
    assert lab.save_rules() == before
    assert lab.node_run(["ip", "link", "show", "dnsguard0"], check=False).returncode != 0


def test_local_ip_already_in_use_is_refused_before_anything_changes(
        lab: Lab, tmp_path: Path) -> None:
    lab.node_run(["ip", "addr", "add", "169.254.20.10/32", "dev", "lo"])
    before = lab.save_rules()
    res = dnsguard(lab, "run", *nodelocal_args(lab, tmp_path / "state"), timeout=30)
    assert res.returncode == 1
    assert "--local-ip 169.254.20.10 is already on link lo" in res.stderr
    assert lab.save_rules() == before


def test_port_53_conflict_is_reported_fail_open_never_a_black_hole(
        lab: Lab, tmp_path: Path) -> None:
    squatter = lab.popen_in(lab.node_netns, [sys.executable, "-c", SQUAT, str(lab.dns_ips[0])],
                            stdout=subprocess.PIPE)
    assert squatter.stdout is not None and squatter.stdout.readline().strip() == "bound"
    args = nodelocal_args(lab, tmp_path / "state")
    proc = start_agent(lab, args, tmp_path / "agent.log")
    try:
        wait_for(lambda: "unbound" in str(_cache(lab, args).get("reason")), timeout=20)
        doc = _cache(lab, args)
        assert doc["intercepting"] is False
        assert "Address already in use" in str(doc["reason"]) or "could not open" in str(
            doc["reason"])
        assert lab.lookup_load(count=10, concurrency=2, duration=15).summary().failed == 0
    finally:
        stop_agent(proc)
        squatter.kill()
        squatter.communicate()


# Holds UDP port 53 on the ClusterIP (IP_FREEBIND: the address need not be local yet).
SQUAT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 15, 1)
s.bind((sys.argv[1], 53))
print("bound", flush=True)
time.sleep(120)
"""

assert socket  # used by SQUAT's child, imported here for linters reading the string


def test_rolling_restart_under_load_fails_no_lookup(tmp_path: Path) -> None:
    """What a DaemonSet rolling update does: SIGTERM the agent, start a new one, under load."""
    mode, flavour, _ = VARIANTS["iptables-nft"]
    with Lab(LabConfig(proxy_mode=mode, iptables=flavour)) as lab:  # type: ignore[arg-type]
        args = nodelocal_args(lab, tmp_path / "state")
        old = start_agent(lab, args, tmp_path / "old.log")
        wait_for(lambda: _cache(lab, args).get("intercepting") is True, timeout=20)
        timelines = [Timeline(lab, i, seconds=12, gap=0.01) for i in range(len(lab.pod_netns))]
        time.sleep(2)
        assert stop_agent(old) == 0
        new = start_agent(lab, args, tmp_path / "new.log")
        try:
            took = wait_for(lambda: _cache(lab, args).get("intercepting") is True, timeout=20)
            samples = [s for t in timelines for s in t.result()]
        finally:
            stop_agent(new)
        failed = [s for s in samples if not s[2]]
        slow = [s for s in samples if s[1] - s[0] >= 1.0]
        print(f"\nrolling restart under load: new agent intercepting after {took:.2f}s; "
              f"{len(samples)} lookups, {len(failed)} failed, {len(slow)} >=1s")
        assert not failed and not slow
