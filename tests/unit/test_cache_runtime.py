"""The node-local cache's fail-open state machine, driven through its seams with fakes.

No root, no sleeping: a fake clock, a fake process, a fake health checker, a fake switch and a
fake link. What these cannot prove (the real queries reach the cache through the real rules,
the real link repair) is proven on the kernel in tests/integration/test_cache_health.py.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dnsguard.agent import Agent
from dnsguard.cache.runtime import CacheRuntime, Upstream
from dnsguard.cache.unbound import CacheError
from dnsguard.cli import _ready
from dnsguard.metrics import Metrics
from dnsguard.model import Backend, IPAddress
from dnsguard.netfilter import Netfilter
from dnsguard.netfilter.alive import AliveSwitch
from dnsguard.netfilter.errors import NetfilterError
from dnsguard.plan import Plan
from dnsguard.plan.cache import CacheSpec
from dnsguard.testing.fakes import FakeRunner, FakeXtables

CLUSTER_IP = ipaddress.ip_address("198.18.1.10")
LOCAL_IP = ipaddress.ip_address("169.254.20.10")
LISTEN = (LOCAL_IP, CLUSTER_IP)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Process:
    def __init__(self) -> None:
        self.on_exit: Callable[[], None] | None = None
        self.alive = False
        self.starts = 0
        self.fail_start: str | None = None
        self.reloads = 0
        self.flushes = 0
        #: what forgetting the down upstreams does to the world (a checker's path comes back)
        self.on_flush: Callable[[], None] | None = None
        self._pid = 0

    @property
    def pid(self) -> int | None:
        return self._pid if self.alive else None

    def running(self) -> bool:
        return self.alive

    def start(self) -> None:
        if self.fail_start:
            raise CacheError(self.fail_start)
        self.starts += 1
        self._pid = 1000 + self.starts
        self.alive = True

    def kill(self) -> None:
        """What the exit watcher sees: the process is gone, then on_exit runs."""
        self.alive = False
        if self.on_exit is not None:
            self.on_exit()

    def exit_reason(self) -> str:
        return "unbound was killed by signal 9"

    def stop(self) -> None:
        self.alive = False

    def reload(self) -> None:
        self.reloads += 1

    def write_config(self, text: str) -> bool:
        return True

    def forget_down_upstreams(self) -> None:
        self.flushes += 1
        if self.on_flush is not None:
            self.on_flush()


class Checker:
    """Doors answer unless listed in ``down``; the two upstream paths are switches."""

    def __init__(self) -> None:
        self.down: dict[IPAddress, str] = {}
        self.cache_path = True
        self.proxy_path = True
        self.asked: list[str] = []

    def doors(self, addrs: Sequence[IPAddress]) -> dict[IPAddress, str | None]:
        self.asked.append("doors")
        return {a: self.down.get(a) for a in addrs}

    def upstream(self, port: int, domain: str) -> str | None:
        self.asked.append("upstream")
        return None if self.cache_path else "upstream probe: no answer within 1s"

    def bypass(self, cluster_ip: IPAddress, domain: str) -> str | None:
        self.asked.append(f"bypass {cluster_ip}")
        return None if self.proxy_path else "no answer within 1s"


class Switch:
    """The switch's content, and every call in order."""

    def __init__(self) -> None:
        self.on: set[IPAddress] = set()
        self.calls: list[str] = []
        self.before_refresh: Callable[[], None] | None = None

    def refresh(self, addrs: Iterable[IPAddress]) -> None:
        if self.before_refresh is not None:
            self.before_refresh()
        addrs = list(addrs)
        self.calls.append("refresh " + ",".join(map(str, addrs)))
        self.on.update(addrs)

    def withdraw(self, addrs: Iterable[IPAddress] | None = None) -> None:
        if addrs is None:
            self.calls.append("withdraw all")
            self.on.clear()
            return
        addrs = list(addrs)
        self.calls.append("withdraw " + ",".join(map(str, addrs)))
        self.on.difference_update(addrs)


class Link:
    def __init__(self) -> None:
        self.broken: str | None = None
        self.missing: set[IPAddress] = set()
        self.repairable = True
        self.repairs = 0

    def check(self, addrs: Sequence[IPAddress], *, deep: bool = False) -> str | None:
        if self.broken:
            return self.broken
        if deep and self.missing & set(addrs):
            return "address missing on dnsguard0"
        return None

    def repair(self, addrs: Sequence[IPAddress]) -> str:
        self.repairs += 1
        if not self.repairable:
            raise NetfilterError("ip link add dnsguard0 failed: Operation not permitted")
        self.broken = None
        self.missing.clear()
        return "dummy"


class Node:
    """A runtime with every seam faked, and the fakes to steer it."""

    def __init__(self, tmp_path: Path, cluster_ips: tuple[IPAddress, ...] = (CLUSTER_IP,)
                 ) -> None:
        self.clock = Clock()
        self.proc = Process()
        self.check = Checker()
        self.switch = Switch()
        self.link = Link()
        spec = CacheSpec(listen=LISTEN, health_port=5353, cluster_domain="cluster.local",
                         cluster_upstreams=((ipaddress.ip_address("198.18.0.2"), 53),),
                         external_upstreams=(), ipv6=False, cluster_ips=cluster_ips)
        self.rt = CacheRuntime(spec, tmp_path, FakeRunner(), Backend.IPTABLES_NFT,
                               monotonic=self.clock, unbound=self.proc, alive=self.switch,
                               checker=self.check, link=self.link)

    def beat(self, seconds: float = 0.5) -> None:
        self.rt.beat()
        self.clock.now += seconds

    @property
    def state(self):  # type: ignore[no-untyped-def]
        return self.rt.state


@pytest.fixture
def node(tmp_path: Path) -> Node:
    n = Node(tmp_path)
    n.beat()  # starts unbound
    n.beat()  # first health answer: intercepting
    assert n.state.intercepting and n.switch.on == set(LISTEN)
    return n


def test_starts_unbound_then_intercepts_only_after_every_door_answered(tmp_path: Path) -> None:
    n = Node(tmp_path)
    n.check.down = {CLUSTER_IP: "no answer within 0.5s"}
    n.beat()
    assert n.proc.starts == 1 and n.switch.on == set()
    n.beat()
    assert n.switch.on == {LOCAL_IP}
    assert not n.state.intercepting and "198.18.1.10:53" in n.state.reason
    n.check.down = {}
    n.beat()
    assert n.switch.on == set(LISTEN) and n.state.intercepting
    assert n.state.reason == "healthy" and n.state.restarts == 0


def test_killed_unbound_withdraws_at_once_and_restarts_with_backoff_1_2_4_capped(
        node: Node) -> None:
    for expected in (1.0, 2.0, 4.0, 4.0):
        node.switch.calls.clear()
        node.proc.kill()
        # the exit watcher alone: no beat has run yet
        assert node.switch.calls == ["withdraw all"] and node.switch.on == set()
        starts = node.proc.starts
        died_at = node.clock.now
        node.rt.beat()
        assert not node.state.intercepting and "killed by signal 9" in node.state.reason
        while node.proc.starts == starts:
            assert node.switch.on == set()
            node.beat(0.25)
        assert node.clock.now - died_at == pytest.approx(expected + 0.25)
        # started, but the backoff resets only once it answers: kill it again straight away
    node.beat()
    assert node.state.intercepting and node.state.restarts == 4
    node.proc.kill()
    died_at = node.clock.now
    node.rt.beat()
    while not node.proc.running():
        node.beat(0.25)
    assert node.clock.now - died_at == pytest.approx(1.25)  # healthy again: backoff reset


def test_a_start_that_fails_is_retried_with_the_same_backoff(tmp_path: Path) -> None:
    n = Node(tmp_path)
    n.proc.fail_start = "unbound rejected its config: bad"
    for _ in range(40):
        n.beat(0.25)
    assert n.state.reason == "unbound rejected its config: bad"
    assert n.switch.on == set() and not n.state.intercepting
    n.proc.fail_start = None
    while not n.proc.running():
        n.beat(0.25)
    n.beat()
    assert n.state.intercepting


def test_hung_cache_health_query_times_out_withdraws_at_once_and_recovers(node: Node) -> None:
    node.check.down = {a: "no answer within 0.5s" for a in LISTEN}
    node.switch.calls.clear()
    node.beat()
    assert node.switch.on == set() and node.switch.calls[0].startswith("withdraw")
    assert not node.state.intercepting and not node.state.healthy
    assert "no answer within 0.5s" in node.state.reason
    assert node.state.fail_opens == 1 and node.state.link == "ok"
    node.beat()
    assert node.state.fail_opens == 1  # one withdrawal, not one per beat
    node.check.down = {}
    node.beat()
    assert node.state.intercepting and node.switch.on == set(LISTEN)


def test_one_address_failing_withdraws_only_that_address(node: Node) -> None:
    node.check.down = {LOCAL_IP: "answered REFUSED"}
    node.switch.calls.clear()
    node.beat()
    assert node.switch.calls == ["withdraw 169.254.20.10", "refresh 198.18.1.10"]
    assert node.state.healthy and not node.state.intercepting
    assert node.state.failing == {"169.254.20.10": "answered REFUSED"}


@pytest.mark.parametrize("broken", ["link dnsguard0 missing", "link dnsguard0 down"])
def test_link_loss_is_withdrawn_then_repaired_and_interception_resumes_in_the_same_beat(
        node: Node, broken: str) -> None:
    node.link.broken = broken
    node.switch.calls.clear()
    node.beat()
    assert node.switch.calls[0] == "withdraw 169.254.20.10,198.18.1.10"
    assert node.link.repairs == 1 and node.state.link == "ok" and node.state.link_repairs == 1
    assert node.switch.calls[-1] == "refresh 169.254.20.10,198.18.1.10"
    assert node.state.intercepting


def test_addresses_removed_are_found_before_the_door_times_out_and_re_added(node: Node) -> None:
    node.link.missing = set(LISTEN)
    node.check.down = {a: "no answer within 0.5s" for a in LISTEN}

    def repaired() -> str:
        node.link.missing.clear()
        node.check.down = {}
        return "dummy"

    node.link.repair = lambda addrs: repaired()  # type: ignore[method-assign]
    node.switch.calls.clear()
    node.beat()
    assert node.switch.calls == ["withdraw 169.254.20.10,198.18.1.10",
                                 "refresh 169.254.20.10,198.18.1.10"]
    assert node.state.intercepting and node.state.link == "ok"


def test_link_that_cannot_be_repaired_stays_withdrawn_and_says_why(node: Node) -> None:
    node.link.broken = "link dnsguard0 missing"
    node.link.repairable = False
    for _ in range(3):
        node.beat()
    assert node.switch.on == set() and not node.state.intercepting
    assert node.state.link.startswith("link dnsguard0 missing; repair failed:")
    assert "Operation not permitted" in node.state.reason
    assert "refresh" not in " ".join(node.switch.calls[-3:])
    node.link.repairable = True
    node.beat()
    assert node.state.intercepting and node.state.link == "ok"


def test_a_healthy_link_costs_one_cheap_check_and_one_door_query_per_beat(node: Node) -> None:
    node.check.asked.clear()
    node.beat()
    node.beat()
    assert node.check.asked == ["doors", "doors"] and node.link.repairs == 0


def test_upstream_unreachable_on_both_paths_keeps_intercepting_and_serves_stale(
        node: Node) -> None:
    node.check.cache_path = node.check.proxy_path = False
    for _ in range(3):
        node.rt.probe_upstream()
        node.beat()
    assert node.state.upstream == Upstream.SERVING_STALE.value
    assert node.state.intercepting and node.switch.on == set(LISTEN)
    assert node.state.reason.startswith("serving stale answers: upstream probe")
    node.check.cache_path = node.check.proxy_path = True
    node.rt.probe_upstream()
    node.beat()
    assert node.state.upstream == "ok" and node.state.reason == "healthy"


def test_cache_path_broken_while_kube_proxy_path_answers_fails_open_after_two_probes(
        node: Node) -> None:
    node.check.cache_path = False
    node.rt.probe_upstream()
    node.beat()
    # one probe is not enough: not failed open yet
    assert node.state.intercepting and node.state.upstream == "unknown"
    node.check.asked.clear()
    node.rt.probe_upstream()
    # kube-proxy's path answers: unbound forgets the upstreams it marked down, is asked again
    assert node.check.asked == ["upstream", "bypass 198.18.1.10", "upstream"]
    node.beat()
    assert node.state.upstream == Upstream.FAILED_OPEN.value
    assert not node.state.intercepting and node.switch.on == set()
    assert node.state.healthy and node.state.reason.startswith("upstream probe")
    node.check.cache_path = True
    node.rt.probe_upstream()
    node.beat()
    assert node.state.upstream == "ok" and node.state.intercepting


def test_no_cluster_ip_known_keeps_intercepting(tmp_path: Path) -> None:
    n = Node(tmp_path, cluster_ips=())
    n.beat()
    n.beat()
    n.check.cache_path = False
    for _ in range(3):
        n.rt.probe_upstream()
        n.beat()
    assert n.state.upstream == "serving-stale" and n.state.intercepting
    assert not any(a.startswith("bypass") for a in n.check.asked)


def test_upstream_not_probed_yet_is_unknown_and_probe_skipped_while_unbound_is_down(
        tmp_path: Path) -> None:
    n = Node(tmp_path)
    assert n.state.upstream == "unknown"
    n.rt.probe_upstream()
    assert n.check.asked == [] and n.state.upstream == "unknown"


def test_shutdown_withdraw_is_never_undone_by_a_late_refresh(node: Node) -> None:
    # the heartbeat has judged the doors healthy and is about to refresh when shutdown comes
    node.switch.before_refresh = None
    node.rt.withdraw()
    assert node.switch.on == set() and node.state.reason == "withdrawn for shutdown"
    node.beat()
    node.rt._refresh(list(LISTEN), {})  # a beat that had passed its checks before shutdown
    assert node.switch.on == set()


def test_shutdown_racing_a_beat_in_another_thread_leaves_the_switch_off(node: Node) -> None:
    entered, go = threading.Event(), threading.Event()

    def slow_doors(addrs: Sequence[IPAddress]) -> dict[IPAddress, str | None]:
        entered.set()
        go.wait(5)
        return {a: None for a in addrs}

    node.check.doors = slow_doors  # type: ignore[method-assign]
    beat = threading.Thread(target=node.rt.beat)
    beat.start()
    assert entered.wait(5)
    node.rt.withdraw()
    go.set()
    beat.join(5)
    assert node.switch.on == set() and node.switch.calls[-1] == "withdraw all"


def test_update_with_new_addresses_repairs_the_link_and_reloads_without_judging_meanwhile(
        node: Node) -> None:
    new = CacheSpec(listen=(LOCAL_IP,), health_port=5353, cluster_domain="cluster.local",
                    cluster_upstreams=((ipaddress.ip_address("198.18.0.3"), 53),),
                    external_upstreams=(), ipv6=False, cluster_ips=(CLUSTER_IP,))
    seen: list[str] = []
    node.proc.reload = lambda: (node.rt.beat(), seen.append("reload"))  # type: ignore
    node.switch.calls.clear()
    node.rt.update(new)
    assert seen == ["reload"] and node.switch.calls == []  # the beat during reload did nothing
    assert node.link.repairs == 1
    node.beat()
    assert node.switch.calls == ["refresh 169.254.20.10"]


def test_status_metric_and_readiness_say_which_upstream_case_holds(node: Node) -> None:
    agent = Agent(Netfilter(FakeXtables(), Backend.IPTABLES_NFT, set()), Plan(()), interval=10,
                  cache=node.rt)
    agent.state.in_sync = True
    metrics = Metrics(CollectorRegistry())
    metrics.watch(agent, FakeRunner())

    def series() -> dict[str, float]:
        out: dict[str, float] = {}
        for line in metrics.exposition().decode().splitlines():
            if line.startswith("dnsguard_cache_upstream_state{"):
                label, value = line.split(" ")
                out[label.split('"')[1]] = float(value)
        return out

    assert series() == {"ok": 0, "serving-stale": 0, "failed-open": 0, "unknown": 1}
    node.check.cache_path = node.check.proxy_path = False
    node.rt.probe_upstream()
    node.beat()
    assert series() == {"ok": 0, "serving-stale": 1, "failed-open": 0, "unknown": 0}
    ready = _ready(agent)
    assert ready.ok and "serving stale answers" in ready.detail
    doc = agent.report()["cache"]
    assert doc["upstream"] == "serving-stale" and doc["link"] == "ok" and doc["intercepting"]
    node.check.proxy_path = True
    node.rt.probe_upstream()
    node.beat()
    assert series()["failed-open"] == 1
    assert not _ready(agent).ok and agent.report()["cache"]["upstream"] == "failed-open"


def test_switch_withdraws_single_addresses_on_both_kinds_of_switch(tmp_path: Path) -> None:
    v6 = ipaddress.ip_address("fd00:198:18:1::a")
    runner = FakeRunner()
    runner.add(["nft", "-f", "-"])
    AliveSwitch(runner, Backend.NFTABLES).withdraw([CLUSTER_IP, v6])
    # add-then-delete in one transaction: succeeds whether or not the element was there
    assert runner.calls == [(("nft", "-f", "-"),
                             "add element inet dnsguard alive4 { 198.18.1.10 }\n"
                             "delete element inet dnsguard alive4 { 198.18.1.10 }\n"
                             "add element inet dnsguard alive6 { fd00:198:18:1::a }\n"
                             "delete element inet dnsguard alive6 { fd00:198:18:1::a }\n")]
    recent = tmp_path / "net/xt_recent"
    recent.mkdir(parents=True)
    lists = {name: recent / name for name in ("dnsguard-alive4", "dnsguard-alive6")}
    for path in lists.values():
        path.touch()
    switch = AliveSwitch(FakeRunner(), Backend.IPTABLES_NFT, proc_root=tmp_path)
    switch.withdraw([LOCAL_IP, v6])
    written = [lists["dnsguard-alive4"].read_text(), lists["dnsguard-alive6"].read_text()]
    assert written == ["-169.254.20.10\n", "-fd00:198:18:1::a\n"]


def test_withdrawing_some_addresses_counts_as_a_fail_open_once(node: Node) -> None:
    node.check.down = {CLUSTER_IP: "answered NXDOMAIN"}
    node.beat()
    node.beat()
    assert node.state.fail_opens == 1 and not node.state.intercepting
    node.check.down = {}
    node.beat()
    assert node.state.intercepting and node.state.fail_opens == 1


def test_upstreams_unbound_still_holds_as_down_are_forgotten_before_failing_open(
        node: Node) -> None:
    """After a CoreDNS outage unbound keeps its upstreams marked down for minutes: the cache
    path fails while kube-proxy's path answers again. Forgetting (flush_infra) brings the cache
    back; failing open would send every pod to kube-proxy's path for nothing."""
    node.check.cache_path = node.check.proxy_path = False
    node.rt.probe_upstream()
    node.beat()
    assert node.state.upstream == Upstream.SERVING_STALE.value
    node.check.proxy_path = True  # CoreDNS is back; unbound answers only once it forgets
    node.proc.on_flush = lambda: setattr(node.check, "cache_path", True)
    for _ in range(3):
        node.rt.probe_upstream()
        node.beat()
    assert node.proc.flushes == 1
    assert node.state.upstream == Upstream.OK.value and node.state.intercepting
    assert node.switch.on == set(LISTEN)
