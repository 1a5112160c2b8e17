"""The benchmark's one entry point: ``python -m bench [--quick] [--allow-sysctl] [--only PART]``.

Order of a run, and why:

1. Build one simulated node per path (`bench.node.PathNode`), all alive at once, so every
   scenario runs on every path back to back: five paths see the same minutes of this shared
   machine's noise instead of five different ones.
2. Calibrate conntrack entries per lookup on each path, and the load generator's ceiling.
3. Scenarios in order, paths interleaved. Pressure scenarios lower the global conntrack
   limits for the paths' runs only (`bench.sysctl.ConntrackLimits`, refused without
   ``--allow-sysctl``); restart scenarios act on the node-local agents. The conntrack table of
   a node is flushed before each of its runs.
4. Agent footprint, on the node-local agents that went through everything above.
5. Tear the nodes down, then rule sync cost in a scratch lab, then the scale of
   ``--external-to-cluster`` (10k Services) in scratch namespaces, then IPVS mode in the qemu VM.
6. Judge the targets and write ``bench/results/<date>.json``, ``<date>.md`` and the PNGs.

Everything is bounded: loads by duration and count (workers exit by themselves, stragglers are
killed by PID after a grace period), per-rule exec by a time cap, the VM by a timeout. A phase
that fails is recorded as failed with its reason, the rest goes on; teardown always runs
(context managers; SIGTERM and SIGHUP become SystemExit so ``finally`` blocks run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench import external, footprint, plots, realclients, report, rulesync, targets
from bench.ipvs import run_in_vm
from bench.node import ANSWER_TTL, PathNode, Snapshot, worker_env
from bench.results import CT_COUNTERS, WorkerOutput, counter_deltas, summarize_load
from bench.spec import PATHS, Load, Profile, Scenario, lookup_names, profile
from bench.sysctl import ConntrackLimits, SysctlRefused, read_limits
from dnsguard.model import Backend
from dnsguard.testing import vm
from dnsguard.testing.lab import Lab, LabConfig, LabError

__all__ = ["main"]

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"
SERVICES = 16
TIMEOUT = 5.0
#: Tries of a pressure scenario that others' activity refused or cut short.
PRESSURE_ATTEMPTS = 3
#: Seconds to wait for other namespaces to quiet down before another try.
QUIET_WAIT = 90.0
#: Node name the fake Kubernetes API publishes for the footprint's API-driven agent.
API_NODE = "bench-node"
#: The parts of a run that --skip and --only name.
PARTS = ("scenarios", "rulesync", "footprint", "external", "vm", "clients")
TOOLS = ("ip", "dnsmasq", "dig", "conntrack", "nft", "unbound", "iptables-nft-restore",
         "iptables-legacy-restore")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run every scenario on every DNS path of simulated lab nodes (root) and "
                    "write bench/results/<date>.json, <date>.md and PNG plots.")
    p.add_argument("--quick", action="store_true",
                   help="smoke test (~4 min): 3 s loads, one pressure setting, fewer rules")
    p.add_argument("--allow-sysctl", action="store_true",
                   help="let the pressure scenarios lower the GLOBAL nf_conntrack_max and "
                        "buckets (restored afterwards, refused if others hold many entries)")
    p.add_argument("--iptables", choices=("nft", "legacy"), default="nft",
                   help="flavour kube-proxy writes its iptables rules with (default nft)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    p.add_argument("--skip", action="append", default=[], choices=PARTS,
                   help="leave a part out (repeatable)")
    p.add_argument("--only", action="append", default=[], choices=PARTS,
                   help="run only this part (repeatable); results get an -only-PART suffix so "
                        "a full run's files are never overwritten")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-render the markdown and plots of a stored results file")
    p.add_argument("--list", action="store_true", help="print what would run, and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class Bench:
    """One benchmark run; collects the results document as it goes."""

    def __init__(self, prof: Profile, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.prof = prof
        self.args = args
        self.names = lookup_names(SERVICES)
        self.nodes: dict[str, PathNode] = {}
        self.limits: ConntrackLimits | None = None
        self.notes: list[str] = []
        self.doc: dict[str, Any] = {
            "schema": 1,
            "command": "python -m bench " + shlex.join(argv),
            "profile": prof.name,
            "paths": [{"name": p.name, "title": p.title} for p in PATHS],
            "scenarios": [_scenario_json(s) for s in prof.scenarios],
            "runs": [],
            "calibration": [],
            "calibration_lookups": prof.calibration_lookups,
        }

    # ------------------------------------------------------------------ phases

    def build(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        pods = max(s.load.pods for s in self.prof.scenarios)
        for spec in PATHS:
            node = PathNode(spec, pods=pods, services=SERVICES, iptables=self.args.iptables,
                            workdir=workdir)
            stack.callback(node.close)
            log.info("building %s", spec.name)
            node.start()
            self.nodes[spec.name] = node
            log.info("%s ready in %.1fs", spec.name, node.ready_seconds or 0)

    def our_netns(self) -> list[int]:
        inodes = []
        for node in self.nodes.values():
            lab = node.lab
            for ns in (lab.node_netns, *lab.pod_netns, *lab.dns_netns):
                with contextlib.suppress(OSError):
                    inodes.append(os.stat(f"/run/netns/{ns}").st_ino)
        return inodes

    def calibrate(self) -> None:
        load = Load(pods=1, concurrency=2, duration=30.0, count=self.prof.calibration_lookups)
        for name, node in self.nodes.items():
            node.flush_conntrack()
            before = node.snapshot()
            stats = summarize_load(node.run_load(load, self.names, timeout=TIMEOUT))
            after = node.snapshot()
            created = (after.entries or 0) - (before.entries or 0)
            pods = [str(ip) for ip in node.client_ips()]
            from_pods, other = node.conntrack_sources(pods)
            self.doc["calibration"].append({
                "path": name, "lookups": stats.lookups, "entries": created,
                "pod_entries": from_pods, "other_entries": other,
                "per_lookup": round(from_pods / stats.lookups, 4) if stats.lookups else None,
                "unanswered": stats.failed,
            })
            log.info("calibration %s: %d entries (%d from pods' lookups, %d other) for %d "
                     "lookups", name, created, from_pods, other, stats.lookups)

    def ceiling(self) -> None:
        node = self.nodes["reference"]
        stats = summarize_load(node.run_load(self.prof.ceiling, self.names, timeout=TIMEOUT))
        self.doc["ceiling"] = {
            "pods": self.prof.ceiling.pods, "concurrency": self.prof.ceiling.concurrency,
            "duration_seconds": self.prof.ceiling.duration,
            "lookups_per_second": round(stats.rate, 1),
            "generator_cores": round(stats.generator_cores, 3),
            "unanswered": stats.failed,
        }
        log.info("generator ceiling: %.0f lookups/s on %.2f cores", stats.rate,
                 stats.generator_cores)

    def scenarios(self) -> None:
        for sc in self.prof.scenarios:
            entries = self._pressure(sc) if sc.needs_sysctl else self._paths(sc)
            self.doc["runs"].extend(entries)

    def _paths(self, sc: Scenario) -> list[dict[str, Any]]:
        """One scenario on each of its paths, ``sc.rounds`` times round-robin, each path's
        rounds merged into one entry; failures are recorded, not raised."""
        paths = [p for p in sc.paths if p in self.nodes]
        rounds: dict[str, list[_Round]] = {p: [] for p in paths}
        failed: dict[str, str] = {}
        for r in range(sc.rounds):
            for path in paths:
                if path in failed:
                    continue
                try:
                    rounds[path].append(self._run(self.nodes[path], sc, r))
                except (LabError, OSError, ValueError, subprocess.SubprocessError) as exc:
                    log.error("%s on %s failed: %s", sc.name, path, exc)
                    failed[path] = str(exc)
                    self._recover(self.nodes[path])
        return [_entry(p, sc, status="failed", reason=failed[p]) if p in failed
                else self._merge(p, sc, rounds[p]) for p in paths]

    def _merge(self, path: str, sc: Scenario, rounds: list[_Round]) -> dict[str, Any]:
        workers = [w for r in rounds for w in r.workers]
        stats = summarize_load(workers, sc.load.duration * len(rounds))
        status, reason = "ok", ""
        if sc.needs_sysctl and self.limits is not None and self.limits.aborted:
            status, reason = "void", self.limits.aborted
        fields: dict[str, Any] = {
            "stats": stats.to_json(),
            "conntrack": _sum_counts([r.conntrack for r in rounds]),
            "conntrack_entries_end": rounds[-1].after.entries,
            "rcvbuf_errors": _sum_counts([r.rcvbuf for r in rounds]),
            "dnsmasq_tcp_listen_drops": _sum_counts(
                [{"d": r.listen_drops} for r in rounds])["d"],
            "event": rounds[0].event or None,
        }
        if len(rounds) > 1:
            fields["rounds"] = len(rounds)
            fields["round_rates"] = [round(summarize_load(r.workers, sc.load.duration).rate, 1)
                                     for r in rounds]
        return _entry(path, sc, status=status, reason=reason, **fields)

    def _pressure(self, sc: Scenario) -> list[dict[str, Any]]:
        """A scenario under lowered global limits, retried while other people are busy.

        The guard refuses (or, mid-run, undoes) the lowering when other namespaces hold
        entries; then the attempt is dropped, the benchmark waits for them to quiet down and
        tries again, up to `PRESSURE_ATTEMPTS` times. What is finally recorded says why.
        """
        assert self.limits is not None and sc.conntrack_max is not None
        reason = ""
        for attempt in range(1, PRESSURE_ATTEMPTS + 1):
            buckets = sc.bucket_count(read_limits().buckets)
            if attempt > 1 and not self.limits.wait_quiet(sc.conntrack_max, buckets,
                                                          QUIET_WAIT):
                continue
            try:
                set_to = self.limits.set(sc.conntrack_max, buckets)
            except (SysctlRefused, OSError) as exc:
                reason = str(exc)
                log.warning("%s refused (attempt %d): %s", sc.name, attempt, exc)
                continue
            log.info("%s: nf_conntrack_max %d, buckets %d", sc.name, set_to.max, set_to.buckets)
            try:
                entries = self._paths(sc)
            finally:
                self.limits.restore()
            if self.limits.aborted is None:
                return entries
            reason = self.limits.aborted
            log.warning("%s void (attempt %d): %s", sc.name, attempt, reason)
        return [_entry(p, sc, status="skipped", reason=reason) for p in sc.paths]

    def _recover(self, node: PathNode) -> None:
        """After a failed run, put a node-local node back into service for the next ones."""
        if not node.spec.nodelocal:
            return
        with contextlib.suppress(LabError):
            if node.agent is None or node.agent.poll() is not None:
                node.start_agent()
            else:
                node.wait_intercepting(30)

    def _run(self, node: PathNode, sc: Scenario, round_no: int = 0) -> _Round:
        log.info("%s on %s%s", sc.name, node.spec.name,
                 f" (round {round_no + 1}/{sc.rounds})" if sc.rounds > 1 else "")
        # Every node's, not only this one's: the hash table is global, so entries left by the
        # previous path's run would lengthen the chains this run inserts into.
        for other in self.nodes.values():
            other.flush_conntrack()
        time.sleep(0.3)
        event_info: dict[str, object] = {}
        event = self._event(node, sc, event_info)
        before = node.snapshot()
        workers = node.run_load(sc.load, self.names, timeout=TIMEOUT, event=event,
                                event_at=sc.event_at)
        after = node.snapshot()
        stats = summarize_load(workers, sc.load.duration)
        if sc.event != "none":
            t0 = time.monotonic()
            node.wait_intercepting(30)
            event_info["intercepting_again_after_run_seconds"] = round(time.monotonic() - t0, 2)
            start = min(w.started for w in workers)
            for key in [k for k in event_info if k.endswith("_wall")]:
                wall = event_info.pop(key)
                assert isinstance(wall, float)
                event_info[key.removesuffix("_wall") + "_at_seconds"] = round(wall - start, 3)
            event_info["agent_log"] = node.agent_timeline(
                start, start + sc.load.duration + TIMEOUT)
        result = _Round(
            workers=workers, after=after, event=event_info,
            conntrack=counter_deltas(before.conntrack, after.conntrack, CT_COUNTERS),
            rcvbuf={k: v - before.rcvbuf.get(k, 0) for k, v in after.rcvbuf.items()},
            listen_drops=None if after.tcp_listen_drops is None
            or before.tcp_listen_drops is None
            else after.tcp_listen_drops - before.tcp_listen_drops,
        )
        log.info("  %.0f lookups/s, p99 %s, >=1s %d, unanswered %d, ct %s", stats.rate,
                 report.fmt_latency(stats.p99), stats.at_least_1s, stats.failed,
                 result.conntrack)
        return result

    def _event(self, node: PathNode, sc: Scenario,
               info: dict[str, object]) -> Callable[[], None] | None:
        """The scenario's action, to run mid-load; records wall-clock instants as ``*_wall``."""
        if sc.event == "kill-cache":
            pid = node.cache_pid()
            if pid is None:
                raise LabError("no cache PID in dnsguard status")

            def kill() -> None:
                info["kill_wall"] = time.time()
                node.kill_cache(pid)
                info["killed_pid"] = pid
            return kill
        if sc.event == "restart-agent":
            def restart() -> None:
                info["sigterm_wall"] = time.time()
                info["agent_exit_code"] = node.stop_agent()
                info["agent_exited_wall"] = time.time()
                node.start_agent()
                info["intercepting_again_wall"] = time.time()
            return restart
        return None

    def footprint(self) -> None:
        out: dict[str, Any] = {}
        for name, node in self.nodes.items():
            if name not in self.prof.footprint_paths:
                continue
            try:
                out[name] = self._footprint_of(node)
            except (LabError, OSError, ValueError) as exc:
                out[name] = {"skipped": str(exc)}
        self.doc["footprint"] = out

    def _footprint_of(self, node: PathNode) -> dict[str, Any]:
        secs = self.prof.footprint_seconds
        if node.agent is None or node.agent.poll() is not None:
            node.start_agent()
        idle = footprint.measure_usage(node.agent.pid, secs)  # type: ignore[union-attr]
        pid = node.cache_pid()
        unbound_rss = footprint.sample(pid).rss / 2**20 if pid else float("nan")
        node.stop_agent()
        node.start_agent(["--sync-interval", "1"])
        assert node.agent is not None
        flush = _flush_command(node)

        def churn(i: int) -> None:
            if i % 2 == 0:  # samples every 0.5 s: one outside flush per second
                node.node(flush, check=True)

        churned = footprint.measure_usage(node.agent.pid, secs, tick=churn)
        time.sleep(1.5)  # the last flush gets repaired before the log is read
        repairs = node.agent_log(tail=10**7).count("rules changed outside dnsguard")
        node.stop_agent()
        out = {"idle": idle.to_json(), "churn": churned.to_json(), "repairs": repairs,
               "flush_command": shlex.join(flush), "unbound_rss_mib": round(unbound_rss, 1)}
        try:
            out.update(self._api_churn(node, secs))
        finally:
            if node.agent is None or node.agent.poll() is not None:
                node.start_agent()  # leave the node as found (flags, production interval)
        return out

    def _api_churn(self, node: PathNode, secs: float) -> dict[str, Any]:
        """The agent taking its facts from a (fake) Kubernetes API whose DNS endpoints change
        every second: the footprint with the Kubernetes client loaded, and what re-planning
        costs. Each change is a new plan: new upstreams, one unbound reload."""
        kubeconfig = node.state / "kubeconfig"
        kubeconfig.unlink(missing_ok=True)
        lab = node.lab
        argv = [sys.executable, "-m", "bench.fakeapi", str(kubeconfig), "--node", API_NODE,
                "--pod-cidr", str(lab.pod_cidrs[0]), "--cluster-ip", str(lab.dns_ips[0]),
                "--every", "1", "--duration", str(secs + 90)]
        for ep in lab.dns_endpoints:
            argv += ["--endpoint", str(ep)]
        api = lab.popen_in(lab.node_netns, argv, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=worker_env())
        try:
            deadline = time.monotonic() + 30
            while not kubeconfig.exists():
                if api.poll() is not None or time.monotonic() > deadline:
                    raise LabError("fake API server did not start")
                time.sleep(0.1)
            node.start_agent(base=["--mitigation", "nodelocal", "--kubeconfig", str(kubeconfig),
                                   "--node-name", API_NODE, "--state-dir", str(node.state),
                                   "--node-resolv-conf", str(node.resolv)])
            assert node.agent is not None
            start_log = len(node.agent_log(tail=10**7))
            usage = footprint.measure_usage(node.agent.pid, secs)
            reloads = node.agent_log(tail=10**7)[start_log:].count("unbound reloaded")
            node.stop_agent()
        finally:
            if api.poll() is None:
                api.terminate()
                api.wait(timeout=10)
        return {"api_churn": usage.to_json(), "api_reloads": reloads}

    def rule_sync(self, workdir: Path) -> None:
        rows = []
        lab = Lab(LabConfig(pods=1, dns_servers=1, names=1, answer_ttl=ANSWER_TTL),
                  workdir=workdir / "rulesync")
        with lab:
            for backend in (Backend.IPTABLES_LEGACY, Backend.IPTABLES_NFT):
                for n in self.prof.rule_counts:
                    log.info("rule sync: %s, %d rules", backend.value, n)
                    rows.append(rulesync.measure(lab.node_netns, backend, n,
                                                 self.prof.per_rule_cap).to_json())
        self.doc["rule_sync"] = rows

    def external(self, workdir: Path) -> None:
        self.doc["external"] = external.measure(self.prof, workdir / "external")

    def clients(self, workdir: Path) -> None:
        self.doc["clients"] = realclients.measure(workdir / "clients", self.args.iptables,
                                                  self.names)

    def vm(self) -> None:
        reason = "left out of --quick (it alone takes 2-4 minutes)" \
            if self.prof.vm_lookups == 0 else vm.available()
        if reason is not None:
            self.doc["ipvs"] = {"skipped": reason}
            return
        log.info("IPVS mode in the qemu VM (a few minutes)")
        self.doc["ipvs"] = run_in_vm(self.prof.vm_lookups, self.prof.vm_concurrency,
                                     self.args.iptables)


@dataclass
class _Round:
    """One run of a scenario on one path, before rounds are merged."""

    workers: list[WorkerOutput]
    after: Snapshot
    event: dict[str, object]
    conntrack: dict[str, int | None]
    rcvbuf: dict[str, int]
    listen_drops: int | None


def _sum_counts(parts: Sequence[Mapping[str, int | None]]) -> dict[str, int | None]:
    """Per key, the sum over rounds; None if any round could not read it."""
    keys = dict.fromkeys(k for p in parts for k in p)
    out: dict[str, int | None] = {}
    for k in keys:
        values = [p.get(k) for p in parts]
        out[k] = None if any(v is None for v in values) else sum(v for v in values if v)
    return out


def _entry(path: str, sc: Scenario, *, status: str, reason: str = "",
           **fields: Any) -> dict[str, Any]:
    """One run's record in the results document (fields that are None are left out)."""
    entry: dict[str, Any] = {"path": path, "scenario": sc.name, "status": status}
    if reason:
        entry["reason"] = reason
    entry.update({k: v for k, v in fields.items() if v is not None})
    return entry


def _flush_command(node: PathNode) -> list[str]:
    """What an outside actor runs to wipe dnsguard's raw-table rules on this node."""
    if node.agent_backend() is Backend.NFTABLES:
        return ["nft", "flush", "table", "inet", "dnsguard"]
    flavour = node.agent_backend().value.split("-", 1)[1]
    return [f"iptables-{flavour}", "-w", "5", "-t", "raw", "-F", "DNSGUARD-PREROUTING"]


def _scenario_json(s: Scenario) -> dict[str, object]:
    return {"name": s.name, "title": s.title, "pods": s.load.pods,
            "concurrency": s.load.concurrency, "duration_seconds": s.load.duration,
            "conntrack_max": s.conntrack_max, "buckets": s.buckets if s.conntrack_max else None,
            "event": s.event, "event_at_seconds": s.event_at if s.event != "none" else None,
            "paths": list(s.paths)}


def _machine(iptables: str) -> dict[str, object]:
    limits = read_limits()
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "iptables_flavour": iptables,
            "nf_conntrack_max": limits.max, "nf_conntrack_buckets": limits.buckets}


def _preflight(args: argparse.Namespace) -> str | None:
    if os.geteuid() != 0:
        return "the benchmark needs root (network namespaces)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (bash scripts/setup installs them)"
    return None


def write_outputs(doc: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """JSON, markdown and plots; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    doc["targets"] = [t.to_json() for t in targets.evaluate(doc)]
    files = [out / f"{stem}.json", out / f"{stem}.md"]
    files[0].write_text(json.dumps(doc, indent=1) + "\n")
    reason = plots.available()
    if reason is None:
        pngs = plots.write_plots(doc, out, stem)
        doc["plots"] = [p.name for p in pngs]
        files += pngs
    else:
        doc.setdefault("notes", []).append(f"plots skipped: {reason}")
    files[1].write_text(report.render(doc) + realclients.render(doc) + _plot_links(doc))
    files[0].write_text(json.dumps(doc, indent=1) + "\n")
    return files


def _plot_links(doc: dict[str, Any]) -> str:
    pngs = doc.get("plots") or []
    return "" if not pngs else "\n## Plots\n\n" + "".join(f"![{p}]({p})\n\n" for p in pngs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        for f in write_outputs(doc, args.render.parent, args.render.stem):
            print(f)
        return 0
    prof = profile(args.quick)
    if args.list:
        for s in prof.scenarios:
            print(f"{s.name:24} {s.title} on {', '.join(s.paths)}")
        print(f"rule sync: {prof.rule_counts}, per-rule cap {prof.per_rule_cap:g}s; "
              f"footprint {prof.footprint_seconds:g}s; vm {prof.vm_lookups} lookups/pod")
        print(f"external: {prof.external_services} Services, kakao-style samples of up to "
              f"{prof.external_sample} Services or {prof.external_sample_seconds:g}s")
        print(realclients.describe())
        return 0
    if args.only:
        args.skip = [p for p in PARTS if p not in args.only]
    reason = _preflight(args)
    if reason:
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    started = time.monotonic()
    now = dt.datetime.now(dt.UTC)
    bench = Bench(prof, args, argv)
    bench.doc.update(date=now.strftime("%Y-%m-%d"), started=now.isoformat(timespec="seconds"),
                     machine=_machine(args.iptables),
                     load={"description": _load_text(prof), "answer_ttl": ANSWER_TTL,
                           "timeout_seconds": TIMEOUT, "names": list(bench.names[:3])})
    workdir = Path(tempfile.mkdtemp(prefix="dnsguard-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            if "scenarios" not in args.skip or "footprint" not in args.skip:
                bench.limits = stack.enter_context(
                    ConntrackLimits(args.allow_sysctl, bench.our_netns))
                bench.build(workdir, stack)
                _phase(bench, "calibration", bench.calibrate)
                _phase(bench, "ceiling", bench.ceiling)
                if "scenarios" not in args.skip:
                    _phase(bench, "scenarios", bench.scenarios)
                if "footprint" not in args.skip:
                    _phase(bench, "footprint", bench.footprint)
        if "rulesync" not in args.skip:
            _phase(bench, "rule sync", lambda: bench.rule_sync(workdir))
        if "external" not in args.skip:
            _phase(bench, "external", lambda: bench.external(workdir))
        if "vm" not in args.skip:
            _phase(bench, "vm", bench.vm)
        if "clients" not in args.skip:
            _phase(bench, "clients", lambda: bench.clients(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bench.doc["seconds"] = round(time.monotonic() - started, 1)
    if not args.allow_sysctl and "scenarios" not in args.skip:
        bench.notes.append("pressure scenarios skipped: run with --allow-sysctl to lower the "
                           "global conntrack limits (restored afterwards)")
    bench.doc["notes"] = bench.notes + bench.doc.get("notes", [])
    stem = bench.doc["date"] + ("-quick" if args.quick else "") + "".join(
        f"-only-{p}" for p in PARTS if p in args.only)
    for f in write_outputs(bench.doc, args.out, stem):
        print(f)
    return 0


def _phase(bench: Bench, name: str, fn: Callable[[], None]) -> None:
    """Run one phase; a failure is recorded and the run goes on (teardown still happens)."""
    t0 = time.monotonic()
    try:
        fn()
    except (LabError, OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        log.exception("%s failed", name)
        bench.notes.append(f"{name} failed: {exc}")
    bench.doc.setdefault("phase_seconds", {})[name] = round(time.monotonic() - t0, 1)


def _load_text(prof: Profile) -> str:
    steady = prof.scenarios[0].load
    return (f"`bench.worker` (dnsguard's probe loop: A+AAAA from one new UDP socket per lookup "
            f"and per search-list step, like glibc) in each client pod, closed loop; names "
            f"round-robin over {SERVICES} services as `svc-N` (search list, first domain "
            f"answers), `svc-N.default` (one NXDOMAIN step first) and "
            f"`svc-N.default.svc.cluster.local.` (absolute); pods' kubelet resolv.conf "
            f"(ndots:5). Steady and pressure: {steady.pods} pods x {steady.concurrency} in "
            f"flight for {steady.duration:g} s; a lookup is abandoned after {TIMEOUT:g} s and "
            f"never retried (glibc would retry then, so each is a >= 5 s lookup there).")

