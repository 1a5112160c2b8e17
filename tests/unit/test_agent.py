"""The reconcile loop against the semantic xtables fake and a fake clock (no root, no sleeps)."""

from __future__ import annotations

import ipaddress
import threading

from dnsguard.agent import Agent
from dnsguard.config import Settings
from dnsguard.model import Backend, Family, NodeFacts, ProxyMode
from dnsguard.netfilter import Netfilter, cleanup
from dnsguard.plan import Plan, plan
from dnsguard.testing.fakes import FakeClock, FakeXtables

KUBE = """*nat
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
COMMIT
*raw
:OTHER-RAW - [0:0]
-A PREROUTING -j OTHER-RAW
-A OTHER-RAW -p udp -j ACCEPT
COMMIT
"""


def make(backend: Backend = Backend.IPTABLES_NFT, dual: bool = True):
    ips = [ipaddress.ip_address("198.18.1.10")]
    cidrs = [ipaddress.ip_network("198.18.0.0/24")]
    if dual:
        ips.append(ipaddress.ip_address("fd00:198:18:1::a"))
        cidrs.append(ipaddress.ip_network("fd00:198:18::/64"))
    p = plan(NodeFacts(ProxyMode.IPVS, tuple(ips), tuple(cidrs)), Settings())
    xt = FakeXtables()
    for prog in ("iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy"):
        xt.run([f"{prog}-restore", "--noflush"], stdin=KUBE)
    before = {prog: xt.save(prog) for prog in xt.state}
    nf = Netfilter(xt, backend, {Family.V4, Family.V6})
    clock = FakeClock()
    return xt, nf, p, Agent(nf, p, interval=10.0, clock=clock), clock, before


def test_first_sync_writes_then_steady_state_writes_nothing() -> None:
    xt, nf, _, agent, _, _ = make()
    assert agent.sync() is True
    assert xt.restores == 4 + 2  # 4 setup restores, then one per family for raw
    save = xt.save("iptables-nft")
    assert save.index("-A PREROUTING -m comment") < save.index("-A PREROUTING -j OTHER-RAW")
    assert agent.sync() is True
    assert xt.restores == 6
    assert agent.state.writes == 1 and agent.state.outside_changes == 0


def test_a_sync_reads_the_kernel_once_before_writing_and_once_to_verify() -> None:
    """At 10k Services one read is seconds and tens of MiB: drift and apply share it."""
    xt, _, _, agent, _, _ = make()
    saves = lambda: sum(c.startswith(("iptables-nft-save", "ip6tables-nft-save"))  # noqa: E731
                        for c in xt.commands)
    agent.sync()  # writes: one read per family before, one to verify
    assert (saves(), xt.restores) == (4, 6)
    agent.sync()  # in sync: one read per family, nothing written
    assert (saves(), xt.restores) == (6, 6)


def test_outside_flush_is_detected_counted_and_repaired_in_one_sync() -> None:
    xt, nf, p, agent, _, _ = make()
    agent.sync()
    xt.flush("ip6tables-nft", "raw", "DNSGUARD-PREROUTING")
    assert nf.drift(p) == ["ipv6/raw: chain DNSGUARD-PREROUTING has 0 rules, plan has 4"]
    assert agent.sync() is True
    assert agent.state.outside_changes == 1
    assert nf.drift(p) == []


def test_failed_restore_keeps_previous_rules_and_backs_off() -> None:
    xt, nf, p, agent, clock, _ = make(dual=False)
    agent.sync()
    good = xt.save("iptables-nft")
    xt.flush("iptables-nft", "raw", "DNSGUARD-PREROUTING")
    flushed = xt.save("iptables-nft")
    for _ in range(5):
        xt.fail_next_restore = "Another app is currently holding the xtables lock.\n"
        assert agent.sync() is False
        assert xt.save("iptables-nft") == flushed  # nothing half-applied
        assert agent.state.failures["lock_held"] >= 1
        delays = agent.next_delay()
    assert delays == 10.0  # 1, 2, 4, 8 -> capped at the interval
    assert agent.sync() is True
    assert xt.save("iptables-nft") == good


def test_backoff_sequence_doubles_to_the_interval() -> None:
    xt, _, _, agent, _, _ = make(dual=False)
    seen = []
    for _ in range(6):
        xt.fail_next_restore = "boom\n"
        agent.sync()
        seen.append(agent.next_delay())
    assert seen == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_run_loop_repairs_within_one_interval_and_stops() -> None:
    xt, nf, p, agent, clock, _ = make()
    stop = threading.Event()
    ticks: list[list[str]] = []

    def on_wait(c: FakeClock) -> None:
        ticks.append(nf.drift(p))
        if len(ticks) == 1:
            xt.flush("iptables-nft", "raw")  # someone runs iptables -t raw -F
        if len(ticks) == 3:
            stop.set()

    clock.on_wait = on_wait
    agent.run(stop)
    assert ticks[0] == [] and ticks[1] == []  # repaired by the next sync
    assert agent.state.outside_changes == 1
    assert clock.waits == [10.0, 10.0, 10.0]


def test_cleanup_restores_every_table_exactly() -> None:
    xt, nf, _, agent, _, before = make()
    agent.sync()
    assert {prog: xt.save(prog) for prog in xt.state} != before
    removed = cleanup(xt, {Family.V4, Family.V6})
    assert removed == ["iptables-nft: ipv4/raw", "iptables-nft: ipv6/raw"]
    assert {prog: xt.save(prog) for prog in xt.state} == before
    assert cleanup(xt, {Family.V4, Family.V6}) == []


def test_backend_switch_removes_the_other_backends_rules() -> None:
    xt, _, p, agent, _, before = make(Backend.IPTABLES_LEGACY)
    agent.sync()
    nft = Netfilter(xt, Backend.IPTABLES_NFT, {Family.V4, Family.V6})
    assert nft.cleanup_other_backends() == ["iptables-legacy: ipv4/raw",
                                            "iptables-legacy: ipv6/raw"]
    assert xt.save("iptables-legacy") == before["iptables-legacy"]


def test_empty_plan_removes_stale_chains() -> None:
    xt, nf, _, agent, _, before = make()
    agent.sync()
    assert nf.apply(Plan(())) == ["ipv4/raw", "ipv6/raw"]
    assert {prog: xt.save(prog) for prog in xt.state} == before
