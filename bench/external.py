"""Scale of ``--external-to-cluster``: N Services with external IPs (kube-proxy's partial syncs).

Two measurements, each in network namespaces of its own (``dgbench-<hex>``, deleted afterwards
even on failure; IPv4 addresses from 198.18.0.0/15 only, never a rule in the host's namespace):

* **rule sync**, per backend, on the plan of N Services (`bench.fakeapi.external_service`, read
  through `dnsguard.kube.extract.service_external` as the agent reads them): full sync (a node
  without rules -> all of them, one restore per table and family; nft: one ``nft -f``), no-op
  sync (read and diff, nothing to write), partial sync (one Service's external IP changes: only
  the chains it touches are rewritten), and the same rules written kakao-style: one exec per
  rule, ``iptables -C`` then ``-A``, plus one ``-N`` per Service chain (kakao's tools write
  iptables only, so not on nftables). No ``-L`` before ``-N``: the baseline gets every benefit
  of the doubt, so its ratio is a lower bound;
* **the agent**, ``dnsguard run --external-to-cluster`` on iptables-legacy with its facts from
  a fake API server publishing the N Services: time from its start to its first full sync, RSS
  once synced next to the same agent with no external Service, and how long one Service change
  in the API takes to reach the kernel (the agent's own log line, then checked in
  iptables-save).

Kakao-style at 10k Services takes hours on iptables-legacy (every exec reads the whole table and
every ``-A`` writes it back, so an exec costs more as the table grows), so it is sampled at both
ends of that growth, bounded by count and time: Services added to an empty node, and Services
added on top of the full N (keys sorting after all N, so ``-A`` keeps the plan's order). The
total is N times the per-Service cost interpolated at the half-full table
(`bench.results.extrapolate_between`). Each sample is verified: the kernel then holds exactly
dnsguard's plan for those Services, so both ways did the same work.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import footprint
from bench.fakeapi import CHANGED_IP, changed_service, external_ip, external_service
from bench.node import parse_log_times, worker_env
from bench.results import extrapolate_between, ratio
from bench.rulesync import _ipt
from bench.spec import Profile
from dnsguard.config import Settings
from dnsguard.kube.extract import service_external
from dnsguard.model import (
    Backend,
    Chain,
    ExternalService,
    Family,
    Mitigation,
    NodeFacts,
    ProxyMode,
    Table,
)
from dnsguard.netfilter import Completed, Netfilter, NetfilterError, Runner, SubprocessRunner
from dnsguard.netfilter.iptables import TableState, desired_tables
from dnsguard.plan import Plan, plan
from dnsguard.plan.render import iptables_jump, iptables_rule
from dnsguard.report import STATUS_FILE

__all__ = ["KakaoSample", "SyncResult", "Workload", "kakao_json", "measure", "workload"]

log = logging.getLogger("bench.external")

SETTINGS = Settings(mitigation=Mitigation.NONE, external_to_cluster=True)
POD_CIDR = ipaddress.ip_network("198.18.0.0/24")
#: the kube-dns Service and its endpoint the fake API publishes (the agent's API facts need it)
DNS_IP, DNS_ENDPOINT = "198.18.1.10", "198.18.0.53"
NODE = "bench-node"
#: namespace of the Services the full-table kakao sample adds: sorts after every ``nsN``
EXTRA_NAMESPACE = "zz-kakao"
NAT = Table.NAT.value
AGENT_BACKEND = Backend.IPTABLES_LEGACY
#: seconds the agent gets for its first full sync, and for applying one change
AGENT_TIMEOUT = 180.0


# ------------------------------------------------------------------ what is synced


def facts(services: Sequence[ExternalService]) -> NodeFacts:
    return NodeFacts(proxy_mode=ProxyMode.IPVS, pod_cidrs=(POD_CIDR,),
                     families=frozenset({Family.V4}), external_services=tuple(services))


def _external(obj: dict[str, Any]) -> ExternalService:
    svc = service_external(obj)
    if svc is None:
        raise ValueError(f"not an external Service: {obj['metadata']}")
    return svc


@dataclass(frozen=True)
class Workload:
    """N Services (sorted by key, as the planner orders them), the one-Service change, extra
    Services for the full-table kakao sample, and the two plans."""

    services: tuple[ExternalService, ...]
    changed: tuple[ExternalService, ...]
    extras: tuple[ExternalService, ...]
    plan: Plan
    changed_plan: Plan
    plan_seconds: float

    @property
    def changed_key(self) -> str:
        return next(a.key for a, b in zip(self.services, self.changed, strict=True) if a != b)

    def to_json(self) -> dict[str, object]:
        return {"services": len(self.services), "rules": self.plan.rule_count,
                "chains": sum(len(rs.chains) for rs in self.plan.rulesets),
                "plan_seconds": round(self.plan_seconds, 3), "changed_service": self.changed_key,
                "changed_to": CHANGED_IP}


def workload(n: int, extras: int) -> Workload:
    services = sorted((_external(external_service(i)) for i in range(n)), key=lambda s: s.key)
    moved = _external(changed_service(n))
    changed = tuple(moved if s.key == moved.key else s for s in services)
    more = tuple(_external(external_service(n + j, namespace=EXTRA_NAMESPACE))
                 for j in range(extras))
    t0 = time.monotonic()
    full = plan(facts(services), SETTINGS)
    seconds = time.monotonic() - t0
    return Workload(tuple(services), changed, more, full, plan(facts(changed), SETTINGS),
                    seconds)


# ------------------------------------------------------------------ namespaces and processes


@contextlib.contextmanager
def scratch_netns() -> Iterator[str]:
    """A new, empty network namespace (loopback up) that is deleted on the way out."""
    name = f"dgbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


class _Counting:
    """A `Runner` that counts execs and the lines they were fed (restore input)."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.execs = 0
        self.lines = 0

    def run(self, argv: Sequence[str], *, stdin: str | None = None,
            timeout: float = 30.0) -> Completed:
        self.execs += 1
        self.lines += stdin.count("\n") if stdin else 0
        return self.inner.run(argv, stdin=stdin, timeout=timeout)

    def take(self) -> tuple[int, int]:
        """(execs, lines) since the last take."""
        out = (self.execs, self.lines)
        self.execs = self.lines = 0
        return out


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def _in_sync(nf: Netfilter, p: Plan, what: str) -> None:
    drift = nf.drift(p)
    if drift:
        raise RuntimeError(f"{nf.backend.value}: {what}: kernel differs from the plan: "
                           + "; ".join(drift[:3]))


def _same_rules(nf: Netfilter, p: Plan, what: str) -> None:
    """The plan's rules, each chain's in any order: kakao-style appends a dispatch shard's jump
    when its first Service comes, where the plan orders the jumps by address."""
    have = nf.observe().ipt[Family.V4]
    want = desired_tables(p, Family.V4)
    for table in {*have, *want}:
        h, w = have.get(table, TableState()), want.get(table, TableState())
        if ({c: sorted(r) for c, r in h.chains.items()} != {c: sorted(r) for c, r in
                                                           w.chains.items()}
                or h.jumps != w.jumps):
            raise RuntimeError(f"{nf.backend.value}: {what}: {table.value} rules differ from "
                               "the plan")


# ------------------------------------------------------------------ kakao-style


@dataclass(frozen=True)
class KakaoSample:
    """Services written one exec per rule onto a table already holding ``table_services``."""

    table_services: int
    services: int
    seconds: float
    execs: int

    @property
    def per_service(self) -> float:
        return self.seconds / self.services

    @property
    def midpoint(self) -> float:
        """The mean table size (Services) the sample's Services were added to."""
        return self.table_services + (self.services - 1) / 2

    def to_json(self) -> dict[str, object]:
        return {"table_services": self.table_services, "services": self.services,
                "seconds": round(self.seconds, 3), "execs": self.execs}


def kakao_json(n: int, setup: KakaoSample, empty: KakaoSample,
               full: KakaoSample) -> dict[str, Any]:
    """The kakao-style estimate for ``n`` Services: the one-off hook setup, then ``n`` Services
    at the per-Service cost interpolated between the two samples."""
    total = setup.seconds + extrapolate_between((empty.midpoint, empty.per_service),
                                                (full.midpoint, full.per_service), n)
    return {"seconds": round(total, 1), "extrapolated": n > empty.services,
            "execs": setup.execs + round(n * empty.execs / empty.services),
            "setup": setup.to_json(), "empty_table": empty.to_json(),
            "full_table": full.to_json()}


def _service_chains(svc: ExternalService) -> tuple[Chain, ...]:
    return plan(facts((svc,)), SETTINGS).for_family(Family.V4).chains


def _kakao_setup(runner: Runner, tool: str) -> KakaoSample:
    """The chains hooked into nat PREROUTING and OUTPUT, and their jumps: once per node."""
    t0 = time.monotonic()
    execs = 0
    for chain in (c for c in _service_chains(_external(external_service(0))) if c.hooked):
        jump = iptables_jump(chain)[2:]
        for argv in (["-N", chain.name], ["-I", chain.hook.value, "1", *jump]):
            execs += 1
            res = runner.run([tool, "-w", "5", "-t", NAT, *argv])
            if not res.ok:
                raise RuntimeError(f"{tool} {argv[0]} failed: {res.stderr.strip()}")
    return KakaoSample(0, 0, time.monotonic() - t0, execs)


def _kakao(runner: Runner, tool: str, services: Sequence[ExternalService], table: int,
           cap: float) -> KakaoSample:
    """kakao-style, one Service after the other until ``cap`` seconds: ``-N`` its chain, then
    ``-C`` and (when missing) ``-A`` per rule, in its chain and in the dispatch chains."""
    work = [_service_chains(s) for s in services]  # planned before the clock starts
    base = [tool, "-w", "5", "-t", NAT]
    execs = done = 0
    t0 = time.monotonic()
    for chains in work:
        for chain in chains:
            if not chain.hooked:
                execs += 1
                res = runner.run([*base, "-N", chain.name])
                # a dispatch shard is shared by the Services of one /24: made by the first
                if not res.ok and "exists" not in res.stderr:
                    raise RuntimeError(f"{tool} -N {chain.name}: {res.stderr.strip()}")
            for rule in chain.rules:
                spec = iptables_rule(chain.name, rule, Family.V4)[2:]
                execs += 1
                if runner.run([*base, "-C", chain.name, *spec]).ok:
                    continue
                execs += 1
                res = runner.run([*base, "-A", chain.name, *spec])
                if not res.ok:
                    raise RuntimeError(f"{tool} -A {chain.name}: {res.stderr.strip()}")
        done += 1
        if time.monotonic() - t0 > cap:
            break
    return KakaoSample(table, done, time.monotonic() - t0, execs)


# ------------------------------------------------------------------ rule sync


@dataclass(frozen=True)
class SyncResult:
    backend: str
    full: float
    full_lines: int
    noop: float
    partial: float
    partial_lines: int
    cleanup: float
    kakao: dict[str, Any] | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "backend": self.backend, "full_sync_seconds": round(self.full, 3),
            "full_sync_restore_lines": self.full_lines,
            "noop_sync_seconds": round(self.noop, 3),
            "partial_sync_seconds": round(self.partial, 3),
            "partial_sync_restore_lines": self.partial_lines,
            "cleanup_seconds": round(self.cleanup, 3),
        }
        if self.kakao is None:
            out["kakao_skipped"] = "kakao's tools write iptables rules only"
        else:
            out["kakao"] = self.kakao
            r = ratio(self.kakao["seconds"], self.full)
            out["kakao_over_full"] = None if r is None else round(r, 1)
        return out


def measure_sync(netns: str, backend: Backend, w: Workload, sample: int,
                 cap: float) -> SyncResult:
    """Full, no-op and partial sync, cleanup, and (iptables) the two kakao-style samples."""
    rec = _Counting(SubprocessRunner(("ip", "netns", "exec", netns)))
    nf = Netfilter(rec, backend, [Family.V4])
    _in_sync(nf, Plan(()), "a new namespace")
    rec.take()
    full = _timed(lambda: nf.apply(w.plan))
    full_lines = rec.take()[1]
    noop = _timed(lambda: nf.apply(w.plan))
    if rec.take()[1]:
        raise RuntimeError(f"{backend.value}: the sync after a full sync wrote something")
    partial = _timed(lambda: nf.apply(w.changed_plan))
    partial_lines = rec.take()[1]
    _in_sync(nf, w.changed_plan, "after the partial sync")
    log.info("%s: full %.2fs, no-op %.2fs, partial %.2fs (%d restore lines)", backend.value,
             full, noop, partial, partial_lines)
    if not backend.is_iptables:
        return SyncResult(backend.value, full, full_lines, noop, partial, partial_lines,
                          _timed(lambda: nf.apply(Plan(()))))
    tool = _ipt(backend)
    at_full = _kakao(rec, tool, w.extras[:sample], len(w.services), cap)
    _same_rules(nf, plan(facts(w.changed + w.extras[:at_full.services]), SETTINGS),
                "after kakao-style adds on the full table")
    cleanup = _timed(lambda: nf.apply(Plan(())))
    _in_sync(nf, Plan(()), "after cleanup")
    setup = _kakao_setup(rec, tool)
    empty = _kakao(rec, tool, w.services[:sample], 0, cap)
    _same_rules(nf, plan(facts(w.services[:empty.services]), SETTINGS),
                "after kakao-style adds on an empty table")
    nf.apply(Plan(()))
    kakao = kakao_json(len(w.services), setup, empty, at_full)
    log.info("%s kakao-style: %.3fs/Service on an empty table, %.3fs on the full one -> %.0fs",
             backend.value, empty.per_service, at_full.per_service, kakao["seconds"])
    return SyncResult(backend.value, full, full_lines, noop, partial, partial_lines, cleanup,
                      kakao)


# ------------------------------------------------------------------ the agent


def _env() -> dict[str, str]:
    """bench and dnsguard importable; no proxy between the agent and the API on 127.0.0.1."""
    return {k: v for k, v in worker_env().items() if "proxy" not in k.lower()}


def _stop(p: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """SIGTERM to the PID we started, SIGKILL if it overstays."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def first_log_time(text: str, prefix: str, after: float) -> float | None:
    """Wall-clock time of the first agent log line (``LEVEL message``) whose message starts
    with ``prefix``, at or after ``after`` (the log has milliseconds)."""
    for at, line in parse_log_times(text):
        if at >= after - 0.001 and line.split(" ", 1)[-1].startswith(prefix):
            return at
    return None


def _since(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


class _AgentRun:
    """One fake API server and one agent in a scratch namespace; processes ended by PID."""

    def __init__(self, netns: str, workdir: Path, n: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        self.n = n
        self.kubeconfig = workdir / "kubeconfig"
        self.state = workdir / "state"
        self.api_log = workdir / "fakeapi.log"
        self.agent_log = workdir / "agent.log"
        self.api: subprocess.Popen[str] | None = None
        self.agent: subprocess.Popen[str] | None = None
        # an earlier run's files would read as "serving" and "in sync" at once
        self.kubeconfig.unlink(missing_ok=True)
        (self.state / STATUS_FILE).unlink(missing_ok=True)

    def _popen(self, argv: Sequence[str], out: Path) -> subprocess.Popen[str]:
        with out.open("w") as f:
            return subprocess.Popen(["ip", "netns", "exec", self.netns, *argv],
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    text=True, env=_env(), start_new_session=True)

    def close(self) -> None:
        for p, grace in ((self.agent, 60.0), (self.api, 10.0)):
            if p is not None:
                _stop(p, grace)

    def start_api(self) -> float:
        """Seconds until the fake API serves all ``n`` Services."""
        t0 = time.monotonic()
        self.api = self._popen(
            [sys.executable, "-m", "bench.fakeapi", str(self.kubeconfig), "--node", NODE,
             "--pod-cidr", str(POD_CIDR), "--cluster-ip", DNS_IP, "--endpoint", DNS_ENDPOINT,
             "--external-services", str(self.n), "--duration", "900"], self.api_log)
        while not self.kubeconfig.exists():
            if self.api.poll() is not None or time.monotonic() - t0 > AGENT_TIMEOUT:
                raise RuntimeError("fake API server did not start: "
                                   + self.api_log.read_text()[-800:])
            time.sleep(0.1)
        return time.monotonic() - t0

    def start_agent(self) -> float:
        """Start ``dnsguard run``; returns its wall-clock start."""
        t0 = time.time()
        self.agent = self._popen(
            [sys.executable, "-m", "dnsguard", "run", "--proxy-mode", "ipvs", "--mitigation",
             "none", "--external-to-cluster", "--kubeconfig", str(self.kubeconfig),
             "--node-name", NODE, "--backend", AGENT_BACKEND.value, "--state-dir",
             str(self.state), "--lock-file", str(self.state.parent / "agent.lock")],
            self.agent_log)
        return t0

    def log_text(self) -> str:
        return self.agent_log.read_text()

    def status(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.state / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def wait(self, done: Callable[[dict[str, Any]], bool], what: str) -> float:
        """Poll the agent's status file until ``done``; the wall-clock time it was seen."""
        assert self.agent is not None
        deadline = time.monotonic() + AGENT_TIMEOUT
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise RuntimeError(f"agent exited {self.agent.returncode} before {what}: "
                                   + self.log_text()[-1500:])
            if done(self.status()):
                return time.time()
            time.sleep(0.1)
        raise RuntimeError(f"agent: no {what} within {AGENT_TIMEOUT:g}s: "
                           + self.log_text()[-1500:])

    def change(self) -> dict[str, object]:
        """One Service's external IP moves in the API: how long until the kernel has it."""
        assert self.api is not None
        replans = int(self.status().get("replans", 0))
        t0 = time.time()
        os.kill(self.api.pid, signal.SIGUSR1)
        seen = self.wait(lambda d: int(d.get("replans", 0)) > replans and bool(d.get("in_sync"))
                         and float(d.get("updated", 0)) > t0, "sync of the changed Service")
        text = self.log_text()
        saved = subprocess.run(["ip", "netns", "exec", self.netns,
                                f"{_ipt(AGENT_BACKEND)}-save", "-t", NAT], capture_output=True,
                               text=True, check=True, timeout=60).stdout
        return {
            "replanned_seconds": _since(first_log_time(text, "facts changed", t0), t0),
            "applied_seconds": _since(first_log_time(text, "applied", t0), t0),
            "in_sync_seconds": round(seen - t0, 2),
            "kernel_has_new_ip": f"-d {CHANGED_IP}/32 " in saved,
            "kernel_has_old_ip": f"-d {external_ip(self.n // 2)}/32 " in saved,
        }


def measure_agent(n: int, workdir: Path, settle: float, rules: int) -> dict[str, Any]:
    """The agent with ``n`` external Services in the fake API (``rules`` expected): its first
    full sync, its memory once synced, and (n > 0) one Service change."""
    with scratch_netns() as ns:
        run = _AgentRun(ns, workdir, n)
        try:
            out: dict[str, Any] = {"external_services": n, "rules": rules,
                                   "api_ready_seconds": round(run.start_api(), 2)}
            t0 = run.start_agent()
            synced = run.wait(lambda d: bool(d.get("in_sync")) and d.get("rules") == rules,
                              f"first full sync ({rules} rules)")
            assert run.agent is not None
            out["start_to_applied_seconds"] = _since(
                first_log_time(run.log_text(), "applied", t0), t0)
            out["start_to_in_sync_seconds"] = round(synced - t0, 2)
            out["synced"] = footprint.measure_usage(run.agent.pid, settle).to_json()
            if n:
                out["change"] = run.change()
                out["peak_rss_mib_after_change"] = round(
                    footprint.sample(run.agent.pid).hwm / 2**20, 1)
        finally:
            run.close()
        out["exit_code"] = None if run.agent is None else run.agent.returncode
    return out


# ------------------------------------------------------------------ the section


def _loadavg() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages: how busy others kept the 2 cores."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def measure(prof: Profile, workdir: Path) -> dict[str, Any]:
    """The whole section for ``prof``; a backend or the agent failing is recorded, not raised."""
    t0 = time.monotonic()
    n, sample, cap = prof.external_services, prof.external_sample, prof.external_sample_seconds
    w = workload(n, sample)
    log.info("external: %d Services, %d rules (plan %.2fs)", n, w.plan.rule_count,
             w.plan_seconds)
    doc: dict[str, Any] = {**w.to_json(), "sample_services": sample,
                           "sample_seconds_cap": cap, "load_before": _loadavg(), "backends": []}
    for backend in (Backend.IPTABLES_LEGACY, Backend.IPTABLES_NFT, Backend.NFTABLES):
        try:
            with scratch_netns() as ns:
                doc["backends"].append(measure_sync(ns, backend, w, sample, cap).to_json())
        except (NetfilterError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log.error("external, %s: %s", backend.value, exc)
            doc["backends"].append({"backend": backend.value, "failed": str(exc)[:500]})
    agent: dict[str, Any] = {"backend": AGENT_BACKEND.value}
    try:
        agent["without"] = measure_agent(0, workdir / "agent-0", prof.external_settle, 0)
        agent["with"] = measure_agent(n, workdir / f"agent-{n}", prof.external_settle,
                                      w.plan.rule_count)
        rss = ratio(agent["with"]["synced"]["rss_mib"], agent["without"]["synced"]["rss_mib"])
        agent["rss_ratio"] = None if rss is None else round(rss, 2)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log.error("external, agent: %s", exc)
        agent["failed"] = str(exc)[:1500]
    doc["agent"] = agent
    doc["load_after"] = _loadavg()
    doc["seconds"] = round(time.monotonic() - t0, 1)
    return doc
