"""The node-local cache's health on the real kernel: the door pods use, and its own heartbeat.

Each fault is injected while a pod resolves in a loop (glibc getaddrinfo, a new lookup every
50 ms): the link deleted, its addresses flushed, the link set down. Before the health check
went through the door pods use, each of these black-holed DNS for as long as one waited while
/readyz said ready. Here DNS must answer again within 2 s and interception must resume once the
agent has repaired the link. A second test slows every table read to 5 s (a wrapper first on the
agent's PATH) with syncs every 2 s: the switch has its own heartbeat, so no lookup may lapse
to kube-proxy's path (0 conntrack entries to the ClusterIP). Two more: a hung cache (SIGSTOP)
is withdrawn and taken back, and a cluster DNS unreachable on both paths keeps interception
(serving stale) while status, /readyz and the metric say so.

What these cannot prove: faults on a node with kube-proxy's 40k rules (the lab has a few), and
what an unhealthy kernel would do to the heartbeat thread itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnsguard.testing.lab import Lab, LabConfig
from tests.support.lab_helpers import (
    VARIANTS,
    conntrack_to,
    nodelocal_args,
    start_agent,
    status,
    stop_agent,
    wait_for,
)
from tests.support.scrape import get, value
from tests.support.timeline import Timeline

pytestmark = pytest.mark.root

#: the issue's bound: DNS answers again within this many seconds of the fault
ANSWER_AGAIN = 2.0

FAULTS = {
    "link-deleted": ["ip", "link", "del", "dnsguard0"],
    "addresses-flushed": ["ip", "addr", "flush", "dev", "dnsguard0"],
    "link-down": ["ip", "link", "set", "dnsguard0", "down"],
}


@pytest.fixture(params=["iptables-nft", "nftables"])
def lab(request: pytest.FixtureRequest):
    mode, flavour, _ = VARIANTS[request.param]
    with Lab(LabConfig(proxy_mode=mode, iptables=flavour, ipv6=True)) as lab:  # type: ignore[arg-type]
        yield lab


def _cache(lab: Lab, args: list[str]) -> dict[str, object]:
    doc = status(lab, args).get("cache")
    return doc if isinstance(doc, dict) else {}


def _start(lab: Lab, args: list[str], log: Path, env: dict[str, str] | None = None,
           timeout: float = 30.0):
    if env is None:
        proc = start_agent(lab, args, log)
    else:
        with log.open("w") as out:
            proc = lab.popen_in(lab.node_netns, [sys.executable, "-m", "dnsguard", "run", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: _cache(lab, args).get("intercepting") is True, timeout=timeout)
    except AssertionError:
        stop_agent(proc, timeout=120)
        raise AssertionError(log.read_text()) from None
    return proc


@pytest.mark.parametrize("fault", list(FAULTS))
def test_link_fault_under_load_answers_again_within_2s_and_interception_resumes(
        lab: Lab, tmp_path: Path, fault: str) -> None:
    args = nodelocal_args(lab, tmp_path / "state")
    log = tmp_path / "agent.log"
    proc = _start(lab, args, log)
    try:
        timeline = Timeline(lab, 0, seconds=9)
        time.sleep(2.0)  # lookups before the fault: the baseline of the timeline
        faulted_at = time.monotonic()
        lab.node_run(FAULTS[fault])
        samples = timeline.result()
        took, inflight = Timeline.recovery(samples, faulted_at)
        after = [s for s in samples if s[0] >= faulted_at]
        failed = sum(1 for _, _, ok in after if not ok)
        slow = sum(1 for start, end, _ in after if end - start >= 1.0)
        print(f"\n{fault}: {len(after)} lookups after the fault, {failed} failed, {slow} took "
              f">= 1 s; new lookups answered {took:.2f}s after it; worst in-flight "
              f"{inflight:.2f}s")
        assert took <= ANSWER_AGAIN, log.read_text()
        # the agent repaired the link and intercepts again: lookups skip conntrack again
        wait_for(lambda: _cache(lab, args).get("intercepting") is True
                 and _cache(lab, args).get("link") == "ok", timeout=15)
        doc = _cache(lab, args)
        assert isinstance(doc["link_repairs"], int) and doc["link_repairs"] >= 1
        lab.flush_conntrack()
        s = lab.lookup_load(count=40, concurrency=2, duration=10).summary()
        assert s.failed == 0
        for ip in lab.dns_ips:
            assert conntrack_to(lab, str(ip)) == 0, f"tracked DNS to {ip} after the repair"
        assert "repaired dnsguard0" in log.read_text()
    finally:
        stop_agent(proc)


SLOW = """#!/bin/sh
# dnsguard test: table reads take 5 s (as beside kube-proxy's 40k rules); writes do not
case " $* " in
  *" list "*) sleep 5 ;;
esac
exec {real} "$@"
"""


def test_slow_table_reads_never_let_the_switch_lapse(lab: Lab, tmp_path: Path) -> None:
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    for tool in ("iptables-nft-save", "ip6tables-nft-save", "nft"):
        real = lab.node_run(["sh", "-c", f"command -v {tool}"]).stdout.strip()
        text = SLOW.format(real=real)
        if tool != "nft":  # a save is a read whatever its arguments
            text = text.replace('case " $* " in\n  *" list "*) sleep 5 ;;\nesac', "sleep 5")
        path = wrappers / tool
        path.write_text(text)
        path.chmod(0o755)
    args = nodelocal_args(lab, tmp_path / "state")
    args[args.index("--sync-interval") + 1] = "2"
    env = dict(os.environ, PATH=f"{wrappers}:{os.environ.get('PATH', '')}")
    log = tmp_path / "agent.log"
    # every sync reads each table family at least once: 15 s and more for the first one
    proc = _start(lab, args, log, env=env, timeout=90)
    try:
        wait_for(lambda: _syncs(tmp_path / "state") >= 2, timeout=90)
        lab.flush_conntrack()
        before = _syncs(tmp_path / "state")
        # lookups for 20 s, whatever their number: several slow syncs run meanwhile
        s = lab.lookup_load(count=100_000, concurrency=2, duration=20).summary()
        syncs = _syncs(tmp_path / "state") - before
        tracked = sum(conntrack_to(lab, str(ip)) for ip in lab.dns_ips)
        print(f"\nslow reads (5 s), syncs every 2 s: {s.count} lookups, {s.failed} failed, "
              f"{tracked} conntrack entries to the ClusterIP, {syncs} syncs started meanwhile")
        assert syncs >= 1  # the load ran beside slow syncs, not between them
        assert s.failed == 0
        assert tracked == 0, "lookups lapsed to kube-proxy's path during slow syncs"
    finally:
        stop_agent(proc, timeout=120)  # teardown reads the tables too


def _syncs(state: Path) -> int:
    """Syncs the agent has started, from its status file."""
    try:
        return int(json.loads((state / "status.json").read_text())["syncs"])
    except (OSError, ValueError, KeyError):
        return 0


def test_cluster_dns_down_keeps_interception_serves_stale_and_stays_ready(
        lab: Lab, tmp_path: Path) -> None:
    """Every CoreDNS pod unreachable: from the cache and through kube-proxy's path alike."""
    args = [*nodelocal_args(lab, tmp_path / "state"), "--metrics-address", "127.0.0.1:9253"]
    log = tmp_path / "agent.log"
    proc = _start(lab, args, log)
    links = []
    try:
        wait_for(lambda: _cache(lab, args).get("upstream") == "ok", timeout=15)
        assert lab.lookup_load(count=5, concurrency=1, duration=5).summary().failed == 0
        for i in range(len(lab.dns_netns)):
            for line in lab.dns_run(i, ["ip", "-o", "link", "show"]).stdout.splitlines():
                dev = line.split(":")[1].strip().split("@")[0]
                if dev != "lo":
                    lab.dns_run(i, ["ip", "link", "set", dev, "down"])
                    links.append((i, dev))
        wait_for(lambda: _cache(lab, args).get("upstream") == "serving-stale", timeout=30)
        doc = _cache(lab, args)
        code, body = get(lab, "/readyz")
        metrics = get(lab, "/metrics")[1]
        print(f"\ncluster DNS down: cache {doc['upstream']}, intercepting {doc['intercepting']},"
              f" /readyz {code} {body.strip()}")
        assert doc["intercepting"] is True
        assert code == 200 and "serving stale" in body
        assert value(metrics, 'dnsguard_cache_upstream_state{state="serving-stale"}') == 1
        assert value(metrics, 'dnsguard_cache_upstream_state{state="failed-open"}') == 0
        # names seen before still answer, from the cache
        s = lab.lookup_load(count=5, concurrency=1, duration=5).summary()
        assert s.failed == 0
        for i, dev in links:
            lab.dns_run(i, ["ip", "link", "set", dev, "up"])
        links.clear()
        wait_for(lambda: _cache(lab, args).get("upstream") == "ok", timeout=30)
        assert _cache(lab, args)["intercepting"] is True
    finally:
        for i, dev in links:
            lab.dns_run(i, ["ip", "link", "set", dev, "up"], check=False)
        stop_agent(proc)


def test_hung_cache_is_withdrawn_within_2s_and_taken_back_when_it_answers_again(
        lab: Lab, tmp_path: Path) -> None:
    """SIGSTOP: the process is there, its door queries time out; SIGCONT: it answers again."""
    args = nodelocal_args(lab, tmp_path / "state")
    log = tmp_path / "agent.log"
    proc = _start(lab, args, log)
    pid = _cache(lab, args)["pid"]
    assert isinstance(pid, int)
    try:
        timeline = Timeline(lab, 0, seconds=7)
        time.sleep(1.5)  # lookups before the fault: the baseline of the timeline
        hung_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        samples = timeline.result()
        took, inflight = Timeline.recovery(samples, hung_at)
        after = [s for s in samples if s[0] >= hung_at]
        failed = sum(1 for _, _, ok in after if not ok)
        print(f"\nunbound SIGSTOP: {len(after)} lookups after it, {failed} failed; new lookups "
              f"answered {took:.2f}s after it; worst in-flight {inflight:.2f}s")
        assert took <= ANSWER_AGAIN, log.read_text()
        doc = _cache(lab, args)
        assert doc["intercepting"] is False and "no answer within" in str(doc["reason"])
        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: _cache(lab, args).get("intercepting") is True, timeout=10)
        assert _cache(lab, args)["pid"] == pid  # taken back, not restarted
    finally:
        os.kill(pid, signal.SIGCONT)
        stop_agent(proc)
