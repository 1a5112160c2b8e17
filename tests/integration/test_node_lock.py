"""One agent per node, on the real kernel: a second dnsguard beside a running agent never
black-holes DNS.

Without the node lock, a `dnsguard cleanup` beside the agent, or a second agent stopped beside
it (a DaemonSet rollout with maxSurge), removes the link dnsguard0 and the rules the running
agent relies on. Here, while pods resolve in a loop: `cleanup` refuses and changes nothing;
`cleanup --force` removes everything and DNS keeps answering; a second agent waits for the lock
and takes over only after the first one's teardown; a second agent stopped while it waits
leaves the first untouched. Lookups are getaddrinfo from pods (glibc-style load), counted as
lookups, failures and lookups of 1 s or more.
"""

from __future__ import annotations

import re
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from dnsguard.testing.lab import Lab, LabConfig
from tests.support.lab_helpers import (
    VARIANTS,
    dnsguard,
    lock_file,
    nodelocal_args,
    start_agent,
    status,
    stop_agent,
    wait_for,
)
from tests.support.timeline import Timeline

pytestmark = pytest.mark.root

Samples = list[tuple[float, float, bool]]


@pytest.fixture(params=["iptables-nft", "nftables"])
def lab(request: pytest.FixtureRequest):
    mode, flavour, _ = VARIANTS[request.param]
    with Lab(LabConfig(proxy_mode=mode, iptables=flavour, ipv6=True)) as lab:  # type: ignore[arg-type]
        yield lab


@pytest.fixture
def agent_a(lab: Lab, tmp_path: Path):
    """Agent A, intercepting; stopped (SIGTERM) at the end if still alive."""
    args = nodelocal_args(lab, tmp_path / "state-a")
    log = tmp_path / "a.log"
    proc = start_agent(lab, args, log)
    try:
        wait_for(lambda: _cache(lab, args).get("intercepting") is True, timeout=30)
    except AssertionError:
        stop_agent(proc)
        raise AssertionError(log.read_text()) from None
    yield proc, args, log
    if proc.poll() is None:
        stop_agent(proc)


def _cache(lab: Lab, args: list[str]) -> dict[str, object]:
    doc = status(lab, args).get("cache")
    return doc if isinstance(doc, dict) else {}


def _rules(lab: Lab) -> str:
    """Netfilter state without the switch's element timers, which tick by themselves."""
    return re.sub(r" expires \S+", "", lab.save_rules())


def _link(lab: Lab) -> str:
    return lab.node_run(["ip", "-o", "addr", "show", "dev", "dnsguard0"], check=False).stdout


def _loads(lab: Lab, seconds: float) -> list[Timeline]:
    return [Timeline(lab, i, seconds=seconds, gap=0.02) for i in range(len(lab.pod_netns))]


def _count(what: str, timelines: list[Timeline]) -> tuple[Samples, Samples, Samples]:
    samples = [s for t in timelines for s in t.result()]
    failed = [s for s in samples if not s[2]]
    slow = [s for s in samples if s[1] - s[0] >= 1.0]
    print(f"\n{what}: {len(samples)} lookups, {len(failed)} failed, {len(slow)} >=1s")
    return samples, failed, slow


def _logged_at(log: Path, needle: str) -> float:
    """Wall time of the first log line containing ``needle`` (text log format)."""
    for line in log.read_text().splitlines():
        if needle in line:
            stamp = " ".join(line.split()[:2])
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"{needle!r} not in {log}:\n{log.read_text()}")


def test_cleanup_beside_the_agent_refuses_names_the_holder_and_changes_nothing(
        lab: Lab, agent_a) -> None:
    proc, args, _ = agent_a
    rules, link = _rules(lab), _link(lab)
    assert "dnsguard0" in link
    timelines = _loads(lab, seconds=6)
    time.sleep(1)  # let the load start before the refused cleanup
    res = dnsguard(lab, "cleanup", "--state-dir", str(Path(args[args.index("--state-dir") + 1])))
    _, failed, slow = _count("cleanup refused beside agent A", timelines)
    errors = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr
    assert len(errors) == 1 and errors[0].startswith("dnsguard: error: the node lock")
    assert f"dnsguard run (pid {proc.pid}" in errors[0] and " since " in errors[0]
    assert res.stdout == ""
    assert _rules(lab) == rules and _link(lab) == link
    assert _cache(lab, args).get("intercepting") is True
    assert not failed and not slow


def test_cleanup_force_removes_everything_dns_answers_and_the_agent_restores_it(
        lab: Lab, agent_a) -> None:
    proc, args, log = agent_a
    timelines = _loads(lab, seconds=12)
    time.sleep(1)
    res = dnsguard(lab, "cleanup", "--force", "--state-dir",
                   str(Path(args[args.index("--state-dir") + 1])))
    forced_at = time.monotonic()
    assert res.returncode == 0, res.stderr
    assert "link dnsguard0" in res.stdout and "status.json" in res.stdout
    assert f"held by dnsguard run (pid {proc.pid}" in res.stderr
    try:
        took: float | None = wait_for(lambda: "dnsguard0" in _link(lab)
                                      and _cache(lab, args).get("intercepting") is True,
                                      timeout=30)
    except AssertionError:
        took = None
    print(f"\ncleanup --force beside agent A: interception restored after "
          f"{'never' if took is None else f'{took:.2f}s'}")
    samples, failed, slow = _count("cleanup --force beside agent A", timelines)
    assert proc.poll() is None, log.read_text()
    assert any(start > forced_at for start, _, _ in samples)
    # DNS answered throughout: through kube-proxy's path while the agent's things were gone
    assert not failed and not slow
    assert took is not None, "the agent did not restore its link and interception"
    assert status(lab, args)["in_sync"] is True


def test_second_agent_waits_and_takes_over_only_after_the_first_tore_down(
        lab: Lab, agent_a, tmp_path: Path) -> None:
    """The maxSurge hand-over: B starts beside A, A gets SIGTERM, B takes over."""
    proc_a, _, log_a = agent_a
    args_b = nodelocal_args(lab, tmp_path / "state-b")
    log_b = tmp_path / "b.log"
    proc_b = start_agent(lab, args_b, log_b)
    try:
        wait_for(lambda: "waiting for the node lock" in log_b.read_text(), timeout=30)
        assert f"held by dnsguard run (pid {proc_a.pid}" in log_b.read_text()
        assert not (tmp_path / "state-b").joinpath("unbound.conf").exists()
        timelines = _loads(lab, seconds=14)
        time.sleep(2)
        assert proc_b.poll() is None
        assert stop_agent(proc_a) == 0, log_a.read_text()
        took = wait_for(lambda: _cache(lab, args_b).get("intercepting") is True, timeout=30)
        print(f"\nhand-over: B intercepting {took:.2f}s after A exited")
        _, failed, slow = _count("hand-over A -> B (SIGTERM to A)", timelines)
        # B took the lock only once A's teardown was complete, so nothing of B's was removed
        assert _logged_at(log_a, "teardown removed") <= _logged_at(log_b, "holding the node lock")
        assert log_b.read_text().count("waiting for the node lock") == 1
        assert "dnsguard0" in _link(lab) and status(lab, args_b)["in_sync"] is True
        assert _cache(lab, args_b).get("intercepting") is True
        assert not failed and not slow
    finally:
        if proc_b.poll() is None:
            assert stop_agent(proc_b) == 0, log_b.read_text()
    assert "DNSGUARD" not in lab.save_rules() and "dnsguard" not in lab.save_rules()
    assert lock_file(lab).exists()


def test_second_agent_stopped_while_waiting_leaves_the_first_untouched(
        lab: Lab, agent_a, tmp_path: Path) -> None:
    proc_a, args_a, log_a = agent_a
    rules, link, pid = _rules(lab), _link(lab), _cache(lab, args_a).get("pid")
    args_b = nodelocal_args(lab, tmp_path / "state-b")
    log_b = tmp_path / "b.log"
    timelines = _loads(lab, seconds=6)
    proc_b = start_agent(lab, args_b, log_b)
    try:
        wait_for(lambda: "waiting for the node lock" in log_b.read_text(), timeout=30)
        proc_b.send_signal(signal.SIGTERM)
        assert proc_b.wait(timeout=20) == 0, log_b.read_text()
    finally:
        if proc_b.poll() is None:
            proc_b.kill()
    _, failed, slow = _count("agent B stopped while waiting", timelines)
    assert "received SIGTERM while waiting for the node lock" in log_b.read_text()
    assert "teardown" not in log_b.read_text()
    assert [p.name for p in (tmp_path / "state-b").iterdir()] == ["node-resolv.conf"]
    assert proc_a.poll() is None and "teardown" not in log_a.read_text()
    assert _rules(lab) == rules and _link(lab) == link
    doc = _cache(lab, args_a)
    assert doc.get("intercepting") is True and doc.get("pid") == pid
    assert not failed and not slow
