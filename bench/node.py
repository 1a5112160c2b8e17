"""One benchmark path on one simulated node: the lab, what serves DNS on it, and its counters.

A `PathNode` owns a `dnsguard.testing.lab.Lab` (network namespaces, kube-proxy rules, dnsmasq
pods standing in for CoreDNS) and, depending on the path, one of:

* nothing more: pods resolve through kube-proxy's DNAT of the ClusterIP (iptables or nftables
  mode), the way clusters run today;
* dnsguard's agent in node-local mode, started exactly as the integration tests start it
  (``python -m dnsguard run --mitigation nodelocal ...`` in the node namespace) and handed
  over only once ``dnsguard status --json`` says the cache is intercepting;
* the *reference*: the same unbound configuration, rendered by dnsguard's own planner and
  `dnsguard.plan.cache.render_unbound` from the same flags, listening on the same addresses
  (set up by `dnsguard.node.links.ensure_link`, as the agent does), on a node whose whole
  netfilter ruleset was flushed (``nft flush ruleset``; the lab is built in nftables mode so
  no iptables-legacy table exists). Without any rule the kernel registers no conntrack hooks
  in the namespace, so this is what the machine can do with the same cache and no netfilter.

Counters are read from the host without entering namespaces: ``/proc/PID/net/...`` shows the
namespace of PID. The node namespace of a baseline lab has no process, so each node gets an
idle *anchor* (``sleep``) whose PID names its namespace; the lab ends it with everything else.

The lab's CoreDNS pods answer with `ANSWER_TTL` (``LabConfig.answer_ttl``), CoreDNS's own 5 s:
dnsmasq's default of 0 would make every answer uncacheable for the node-local cache.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import dnsguard
from bench.results import WorkerOutput
from bench.spec import Load, PathSpec
from dnsguard.config import settings_from
from dnsguard.model import Backend, IPAddress
from dnsguard.netfilter.runner import SubprocessRunner
from dnsguard.node.conntrack import parse_proc_stat
from dnsguard.node.links import ensure_link
from dnsguard.node.procnet import parse_snmp, read_udp_counters
from dnsguard.plan import plan
from dnsguard.plan.cache import render_unbound
from dnsguard.testing.lab import (
    IptablesFlavour,
    Lab,
    LabConfig,
    LabError,
    dns_pod_ip,
    pod_ip,
    service_fqdn,
)

__all__ = ["ANSWER_TTL", "PathNode", "Snapshot"]

log = logging.getLogger("bench.node")

#: TTL of the CoreDNS stand-in's answers (CoreDNS kubernetes plugin default).
ANSWER_TTL = 5
REPO = Path(__file__).resolve().parent.parent
SRC = Path(dnsguard.__file__).resolve().parent.parent
#: Seconds given to worker start-up before the agreed start (4 interpreters on 2 cores).
START_LEAD = 2.0


@dataclass(frozen=True)
class Snapshot:
    """Counters of one node at one instant."""

    conntrack: dict[str, int]
    entries: int | None
    #: RcvbufErrors per DNS server group: "dnsmasq" (all CoreDNS pods), "unbound" (the node)
    rcvbuf: dict[str, int]
    at: float
    #: TcpExt ListenDrops of the CoreDNS pods: TCP connections (the cache's upstream queries)
    #: refused because dnsmasq's accept queue was full
    tcp_listen_drops: int | None = None


def parse_log_times(text: str) -> list[tuple[float, str]]:
    """dnsguard's text log lines (``2026-11-22 01:16:59,305 INFO msg``) as (epoch, "INFO msg").

    The agent logs local wall-clock time with milliseconds; lines without a timestamp
    (tracebacks) are skipped.
    """
    out = []
    for line in text.splitlines():
        try:
            at = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        out.append((at, line[24:].strip()))
    return out


def count_by_source(conntrack_list: str, sources: Sequence[str],
                    port: int = 53) -> tuple[int, int]:
    """``conntrack -L`` text -> (entries to ``port`` whose original source is one of
    ``sources``, other entries to ``port``). The first ``src=`` of a line is the original
    direction's."""
    want = set(sources)
    mine = other = 0
    for line in conntrack_list.splitlines():
        fields = line.split()
        if not fields or fields[0] not in ("udp", "tcp"):
            continue
        src = next((f[4:] for f in fields if f.startswith("src=")), None)
        dport = next((f for f in fields if f.startswith("dport=")), None)
        if dport != f"dport={port}":
            continue
        if src in want:
            mine += 1
        else:
            other += 1
    return mine, other


def _pids_in(netns: str) -> list[int]:
    cp = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                        check=False, timeout=10)
    return [int(p) for p in cp.stdout.split() if p.isdigit()]


def last_lines(procs: Sequence[subprocess.Popen[str]], deadline: float,
               what: str) -> tuple[list[str], list[str]]:
    """Wait for load processes (one per pod, in pod order) until the wall-clock ``deadline``:
    (the last stdout line of each that exited 0 with one, problems of the others). One that
    overruns is killed by its Popen, and so is any left running if this is interrupted: loads
    are bounded even when a process is not."""
    lines: list[str] = []
    problems: list[str] = []
    try:
        for i, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                problems.append(f"pod{i}: {what} overran its bounds and was killed")
                continue
            line = out.strip().splitlines()[-1] if out.strip() else ""
            if p.returncode != 0 or not line:
                problems.append(f"pod{i}: {what} exited {p.returncode}: {err.strip()[-400:]}")
                continue
            lines.append(line)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return lines, problems


def worker_env() -> dict[str, str]:
    """Environment for processes started in pods: the repo (bench) and src (dnsguard)."""
    env = dict(os.environ)
    paths = [str(REPO), str(SRC), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


class PathNode:
    """A lab node serving DNS the way `spec` says; a context manager that always tears down."""

    def __init__(self, spec: PathSpec, *, pods: int, services: int, iptables: str,
                 workdir: Path, start_lead: float = START_LEAD) -> None:
        self.spec = spec
        self.start_lead = start_lead
        flavour: IptablesFlavour = "nft" if iptables == "nft" else "legacy"
        self.lab = Lab(LabConfig(proxy_mode=spec.proxy_mode, iptables=flavour, pods=pods,
                                 dns_servers=2, names=services, answer_ttl=ANSWER_TTL),
                       workdir=workdir / spec.name)
        self.workdir = workdir / spec.name
        self.state = self.workdir / "state"
        self.agent: subprocess.Popen[str] | None = None
        self.agent_args: list[str] = []
        self.agent_starts = 0
        self.reference: subprocess.Popen[str] | None = None
        self.anchor: subprocess.Popen[str] | None = None
        self.dnsmasq_pids: list[int] = []
        self.resolv = self.state / "node-resolv.conf"
        self.ready_seconds: float | None = None

    # -------------------------------------------------------------------- lifecycle

    def __enter__(self) -> PathNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        t0 = time.monotonic()
        self.lab.start()
        self.anchor = self.lab.popen_in(self.lab.node_netns, ["sleep", "infinity"])
        self.dnsmasq_pids = [p for ns in self.lab.dns_netns for p in _pids_in(ns)]
        self.state.mkdir(parents=True, exist_ok=True)
        resolv = self.resolv = self.state / "node-resolv.conf"
        # names outside the cluster go to a lab DNS pod, never to the host's resolver
        resolv.write_text(f"nameserver {dns_pod_ip(0)}\n")
        self.agent_args = ["--mitigation", "nodelocal", "--state-dir", str(self.state),
                           "--node-resolv-conf", str(resolv)]
        for ip in self.lab.dns_ips:
            self.agent_args += ["--dns-ip", str(ip)]
        for ep in self.lab.dns_endpoints:
            self.agent_args += ["--upstream", f"[{ep}]:53" if ep.version == 6 else str(ep)]
        if self.spec.nodelocal:
            self.start_agent()
        elif self.spec.reference:
            self._start_reference()
        self.ready_seconds = time.monotonic() - t0

    def close(self) -> None:
        try:
            if self.agent is not None and self.agent.poll() is None:
                self.stop_agent()
        finally:
            self.lab.close()  # ends the reference cache, the anchor and anything left

    # -------------------------------------------------------------------- running things

    def client_ips(self) -> list[IPAddress]:
        """The client pods' addresses (every family)."""
        return [pod_ip(i, f) for i in range(self.lab.config.pods) for f in self.lab.families]

    @property
    def server(self) -> str:
        """What pods query: the DNS Service's ClusterIP (their resolv.conf's nameserver)."""
        return str(self.lab.dns_ips[0])

    def node(self, argv: Sequence[str], timeout: float = 60.0,
             check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.lab.node_run(list(argv), check=check, timeout=timeout)

    def dnsguard(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.node([sys.executable, "-m", "dnsguard", *args], timeout=timeout)

    def flush_conntrack(self) -> None:
        self.lab.flush_conntrack()

    def snapshot(self) -> Snapshot:
        assert self.anchor is not None
        pid = self.anchor.pid
        counters, entries = parse_proc_stat(Path(f"/proc/{pid}/net/stat/nf_conntrack")
                                            .read_text())
        rcvbuf: dict[str, int] = {}
        dnsmasq = [read_udp_counters(Path("/proc"), p) for p in self.dnsmasq_pids]
        if dnsmasq and all(c is not None for c in dnsmasq):
            rcvbuf["dnsmasq"] = sum(c.rcvbuf_errors for c in dnsmasq if c is not None)
        if self.spec.nodelocal or self.spec.reference:
            node = read_udp_counters(Path("/proc"), pid)
            if node is not None:
                rcvbuf["unbound"] = node.rcvbuf_errors
        drops: int | None = 0
        for p in self.dnsmasq_pids:
            try:
                ext = parse_snmp(Path(f"/proc/{p}/net/netstat").read_text(), "TcpExt:")
                drops = None if drops is None else drops + ext["ListenDrops"]
            except (OSError, KeyError, ValueError):
                drops = None
        return Snapshot(counters, entries, rcvbuf, time.time(), drops)

    def run_load(self, load: Load, names: Sequence[str], *, timeout: float = 5.0,
                 event: Callable[[], None] | None = None,
                 event_at: float = 0.0) -> list[WorkerOutput]:
        """Run the worker in ``load.pods`` pods at once; ``event`` runs ``event_at`` seconds in.

        Bounded: workers stop launching after the duration and wait at most ``timeout`` for
        stragglers; anything still running ``30 s`` after that is killed (by its Popen).
        """
        start_at = time.time() + self.start_lead
        procs = []
        for i in range(load.pods):
            argv = [sys.executable, "-m", "bench.worker", "--server", self.server,
                    "--names", ",".join(names), "--concurrency", str(load.concurrency),
                    "--duration", str(load.duration), "--count", str(load.count),
                    "--timeout", str(timeout), "--start-at", f"{start_at:.6f}",
                    "--label", f"pod{i}"]
            procs.append(self.lab.popen_in(self.lab.pod_netns[i], argv, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=worker_env()))
        try:
            if event is not None:
                time.sleep(max(0.0, start_at + event_at - time.time()))
                event()
            lines, problems = last_lines(procs, start_at + load.duration + timeout + 30.0,
                                         "worker")
            outputs = [WorkerOutput.from_json(line) for line in lines]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if problems:
            raise LabError("load failed: " + "; ".join(problems))
        return outputs

    # -------------------------------------------------------------------- the agent

    def start_agent(self, extra: Sequence[str] = (), timeout: float = 30.0,
                    base: Sequence[str] | None = None) -> float:
        """Start ``dnsguard run`` in the node; seconds until status says it intercepts.

        ``base`` replaces the flag-given facts (e.g. ``--kubeconfig`` ones); the state
        directory must stay the same, since status is read from it.
        """
        self.agent_starts += 1
        log_path = self.workdir / f"agent-{self.agent_starts}.log"
        t0 = time.monotonic()
        # the Kubernetes client must reach the fake API on 127.0.0.1, never through a proxy
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        # its own node lock: the default is the machine's /run, shared by every run on it
        with log_path.open("w") as out:
            self.agent = self.lab.popen_in(
                self.lab.node_netns,
                [sys.executable, "-m", "dnsguard", "run",
                 *(self.agent_args if base is None else base), *extra,
                 "--lock-file", str(self.workdir / "agent.lock")],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        self.wait_intercepting(timeout)
        return time.monotonic() - t0

    def cache_status(self) -> dict[str, object]:
        res = self.dnsguard("status", "--json", *self.agent_args, timeout=30)
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            return {}
        cache = doc.get("cache") if isinstance(doc, dict) else None
        return cache if isinstance(cache, dict) else {}

    def wait_intercepting(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.agent is not None and self.agent.poll() is not None:
                raise LabError(f"agent exited {self.agent.returncode}:\n{self.agent_log()}")
            if self.cache_status().get("intercepting") is True:
                return
            time.sleep(0.2)
        raise LabError(f"agent not intercepting after {timeout:g}s:\n{self.agent_log()}")

    def agent_log(self, tail: int = 3000) -> str:
        path = self.workdir / f"agent-{self.agent_starts}.log"
        return path.read_text()[-tail:] if path.exists() else ""

    def stop_agent(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful hand-over and teardown); returns the exit code."""
        assert self.agent is not None
        self.agent.terminate()
        try:
            return self.agent.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
            raise LabError(f"agent ignored SIGTERM for {timeout:g}s") from None

    def kill_cache(self, pid: int) -> None:
        """kill -9 of the agent's unbound (a child of the agent we started), by PID.

        The PID is looked up by the caller beforehand: ``dnsguard status`` takes a second or
        more on a loaded machine, which would move the kill away from its planned instant.
        """
        os.kill(pid, signal.SIGKILL)

    def agent_timeline(self, since: float, until: float) -> list[list[object]]:
        """The agents' log lines between two wall-clock instants, as [offset from since, text]."""
        out: list[list[object]] = []
        for n in range(1, self.agent_starts + 1):
            path = self.workdir / f"agent-{n}.log"
            if not path.exists():
                continue
            for at, text in parse_log_times(path.read_text()):
                if since - 0.5 <= at <= until:
                    out.append([round(at - since, 3), f"agent {n}: {text}"])
        return sorted(out, key=lambda e: float(str(e[0])))

    def conntrack_sources(self, sources: Sequence[str]) -> tuple[int, int]:
        """Entries to port 53 on the node: (from ``sources``, from anything else)."""
        text = "".join(self.node(["conntrack", "-L", "-f", fam]).stdout
                       for fam in ("ipv4", "ipv6"))
        return count_by_source(text, sources)

    def agent_backend(self) -> Backend:
        return self.lab.kube_proxy_backend

    # -------------------------------------------------------------------- reference cache

    def _start_reference(self) -> None:
        """The agent's own unbound config, served with no netfilter rule on the node."""
        # the CLI imports the Kubernetes client (~1 s, ~15 s under qemu): only when needed
        from dnsguard.cli import build_parser  # noqa: PLC0415

        self.node(["nft", "flush", "ruleset"], check=True)
        leftover = [ln for ln in self.lab.save_rules().splitlines()
                    if ln.startswith("-A") or ln.strip().startswith(("chain ", "table "))]
        if leftover:
            raise LabError(f"reference node still has rules: {leftover[:5]}")
        settings = settings_from(build_parser().parse_args(["run", *self.agent_args]))
        facts = dataclasses.replace(self.lab.facts, node_nameservers=(dns_pod_ip(0),))
        spec = plan(facts, settings).cache
        assert spec is not None
        runner = SubprocessRunner(("ip", "netns", "exec", self.lab.node_netns))
        ensure_link(runner, spec.listen)
        conf = self.state / "unbound.conf"
        conf.write_text(render_unbound(spec, self.state))
        log_file: IO[str]
        with (self.state / "unbound.log").open("w") as log_file:
            self.reference = self.lab.popen_in(self.lab.node_netns,
                                               ["unbound", "-d", "-c", str(conf)],
                                               stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            cp = self.lab.pod_run(0, ["dig", "+short", "+time=1", "+tries=1", f"@{self.server}",
                                      f"{service_fqdn(0)}.", "A"], check=False, timeout=5)
            if cp.returncode == 0 and cp.stdout.strip():
                return
            if self.reference.poll() is not None or time.monotonic() > deadline:
                raise LabError("reference unbound not answering: "
                               + (self.state / "unbound.log").read_text()[-1500:])
            time.sleep(0.2)

    def cache_pid(self) -> int | None:
        """PID of whichever unbound serves this node (agent's or reference), if any."""
        if self.reference is not None:
            return self.reference.pid
        pid = self.cache_status().get("pid") if self.spec.nodelocal else None
        return pid if isinstance(pid, int) else None
