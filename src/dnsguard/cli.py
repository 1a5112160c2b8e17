"""Command-line entry points; each command is observe -> plan -> (diff -> apply) -> report.

Exit codes: 0 success (for ``apply`` and ``status``: the kernel holds exactly the plan),
1 a runtime failure or drift, 2 bad usage or a refused plan (nothing was changed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, cast

from prometheus_client import CollectorRegistry

from dnsguard import __version__, cli_diag, selfprobe, watch
from dnsguard.agent import Agent
from dnsguard.cache.querylog import set_query_log
from dnsguard.cache.runtime import HEALTH_INTERVAL, STATE_FILES, CacheRuntime
from dnsguard.cache.stats import StatsPoller, control_command
from dnsguard.cache.unbound import CacheError, Unbound
from dnsguard.config import ConfigError, Settings, add_fact_flags, settings_from
from dnsguard.facts import Observed, kube_source, load_cluster, observe, with_cluster
from dnsguard.kube import KubeApiError, KubeConfigError, KubeError, KubeSource
from dnsguard.logs import setup_logging
from dnsguard.metrics import Metrics, Probe, SkipReport, serve
from dnsguard.model import Backend, Family, ProxyMode
from dnsguard.netfilter import Netfilter, NetfilterError, SubprocessRunner, cleanup, inventory
from dnsguard.netfilter.iptables import TableState, desired_tables, restore_text
from dnsguard.netfilter.nft import NftBackend
from dnsguard.netfilter.runner import Runner
from dnsguard.node.detect import node_families
from dnsguard.node.links import remove_link
from dnsguard.node.lock import Holder, LockHeld, NodeLock
from dnsguard.node.resolv import nameservers
from dnsguard.plan import Plan, PlanRefused, plan
from dnsguard.report import read_status

__all__ = ["main"]

log = logging.getLogger("dnsguard")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
_IPVS_KUBELET_NOTE = (
    "ipvs mode: the ClusterIP stays on kube-ipvs0, so the cache serves only {}; point "
    "kubelet's clusterDNS (--cluster-dns / KubeletConfiguration clusterDNS) at it, and pods "
    "fall back to the ClusterIP through dnsguard's DNAT while the cache is down")
#: where `status --watch` finds the agent when --metrics-address is not given
WATCH_ADDRESS = ("127.0.0.1", 9254)
#: a self-probe lookup that takes longer has failed; the histogram's last bucket
SELF_PROBE_TIMEOUT = 5.0
#: how long `run` waits for the API's first facts before giving up
FIRST_FACTS_TIMEOUT = 60.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"dnsguard: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dnsguard", description="Keep Kubernetes DNS out of conntrack's races.")
    p.add_argument("--version", action="version", version=f"dnsguard {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helps = {
        "plan": "print the rules dnsguard would own; change nothing",
        "apply": "reconcile once and exit; 0 when the kernel holds exactly the plan",
        "run": "the agent: reconcile now and every --sync-interval; SIGTERM cleans up",
        "cleanup": "remove everything dnsguard owns, and nothing else",
        "status": "what is installed, in sync or not, and why",
    }
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text)
        if name in ("apply", "cleanup"):
            sp.add_argument("--force", action="store_true",
                            help="go ahead even while another dnsguard (the agent) holds the "
                                 "node lock; its rules and link are changed under it")
        add_fact_flags(sp)
        if name == "status":
            sp.add_argument("--json", action="store_true", help="machine-readable output")
            sp.add_argument("--watch", action="store_true",
                            help="live view from the running agent's /metrics, every second "
                                 "(--metrics-address; default 127.0.0.1:9254)")
    cli_diag.add_commands(cast("argparse._SubParsersAction[argparse.ArgumentParser]", sub))
    return p


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner = runner or SubprocessRunner()
    try:
        settings = settings_from(args)
        setup_logging(settings.log_format)
        command = {"plan": cmd_plan, "apply": cmd_apply, "run": cmd_run,
                   "cleanup": cmd_cleanup, "status": cmd_status, **cli_diag.COMMANDS}[args.command]
        command = _locked(command)
        return command(args, settings, runner)
    except (ConfigError, PlanRefused, KubeConfigError) as exc:
        # a kubeconfig that cannot be used is bad input, like a bad flag: exit 2
        print(f"dnsguard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (NetfilterError, KubeError) as exc:
        print(f"dnsguard: error: {exc}", file=sys.stderr)
        return EXIT_FAIL


Command = Callable[[argparse.Namespace, Settings, Runner], int]


def _locked(command: Command) -> Command:
    """``command`` under the node lock (`_node_lock`); a refusal is one line and exit 2."""
    def locked(args: argparse.Namespace, settings: Settings, runner: Runner) -> int:
        try:
            with _node_lock(args.command, settings) as go_ahead:
                return command(args, settings, runner) if go_ahead else EXIT_OK
        except LockHeld as exc:
            print(f"dnsguard: error: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return locked


@contextlib.contextmanager
def _node_lock(command: str, settings: Settings) -> Iterator[bool]:
    """One dnsguard changing the node at a time (node/lock.py), taken before anything changes.

    ``run`` waits for the lock and holds it until its teardown is done, so in a maxSurge
    hand-over the new agent starts only after the old one removed what it owned, and the old
    one's teardown cannot remove what the new one set up. SIGTERM while waiting yields False:
    exit 0, nothing touched. ``apply`` and ``cleanup`` refuse (`LockHeld`) unless ``--force``.
    Anything else (plan, status, the diagnostics) only reads and never takes the lock.
    """
    if command not in ("run", "apply", "cleanup"):
        yield True
        return
    lock = NodeLock(settings.lock_file, command)
    try:
        if command == "run":
            go_ahead = _wait_for_lock(lock)
        elif not lock.try_acquire():
            held = LockHeld(lock.path, lock.holder())
            if not settings.force:
                raise held
            log.warning("--force: going ahead although the node lock %s is held by %s",
                        lock.path, held.who)
            go_ahead = True
        else:
            go_ahead = True
    except OSError as exc:
        lock.release()
        raise ConfigError(f"invalid --lock-file {str(settings.lock_file)!r}: "
                          f"{exc.strerror or exc}") from None
    with lock:
        yield go_ahead


def _wait_for_lock(lock: NodeLock) -> bool:
    """Wait for the lock; False when SIGTERM/SIGINT came first. The caller installs its own
    handlers afterwards: until then a signal kills the process, as before the lock existed."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s while waiting for the node lock: exiting, nothing changed",
                 signal.Signals(signum).name)
        stop.set()

    def on_wait(holder: Holder | None) -> None:
        log.info("waiting for the node lock %s, held by %s (one agent per node)", lock.path,
                 LockHeld(lock.path, holder).who)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        started = time.monotonic()
        got = lock.wait(stop, on_wait)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if got and stop.is_set():  # the signal raced the lock: honour the signal
        lock.release()
        return False
    if got:
        log.info("holding the node lock %s (waited %.1fs)", lock.path, time.monotonic() - started)
    return got


def _observe(settings: Settings, runner: Runner) -> Observed:
    obs = observe(settings, runner, node_nameservers=nameservers(settings.node_resolv_conf))
    for note in obs.notes:
        log.info("%s", note)
    return obs


def _observe_and_plan(settings: Settings, runner: Runner) -> tuple[Observed, Plan]:
    """Node facts, plus the API's facts (one list) for whatever the flags did not give."""
    obs = _observe(settings, runner)
    eff, facts = with_cluster(settings, obs, load_cluster(settings))
    p = plan(facts, eff)
    SkipReport()(p.skipped)
    return obs, p


def render_plan(p: Plan, backend: Backend) -> str:
    """The plan as the exact transaction dnsguard would run on an empty node."""
    if backend is Backend.NFTABLES:
        return NftBackend.desired(p) or "# nothing to own\n"
    out: list[str] = []
    for rs in p.rulesets:
        tool = "iptables" if rs.family is Family.V4 else "ip6tables"
        flavour = backend.value.split("-")[1]
        out.append(f"# ipv{rs.family.value}: {tool}-{flavour}-restore --noflush")
        for table, want in desired_tables(p, rs.family).items():
            out.append(restore_text(table, want, TableState()).rstrip("\n"))
    return "\n".join(out) + "\n" if out else "# nothing to own\n"


def cmd_plan(args: argparse.Namespace, settings: Settings, runner: Runner) -> int:
    obs, p = _observe_and_plan(settings, runner)
    print(f"# proxy mode {obs.facts.proxy_mode.value}, backend {obs.backend.value}, "
          f"{p.rule_count} rules")
    sys.stdout.write(render_plan(p, obs.backend))
    return EXIT_OK


def _netfilter(obs: Observed, runner: Runner) -> Netfilter:
    return Netfilter(runner, obs.backend, obs.facts.families)


def cmd_apply(args: argparse.Namespace, settings: Settings, runner: Runner) -> int:
    obs, p = _observe_and_plan(settings, runner)
    nf = _netfilter(obs, runner)
    removed = nf.cleanup_other_backends()
    if removed:
        log.info("removed leftovers of another backend: %s", ", ".join(removed))
    agent = Agent(nf, p, interval=settings.sync_interval)
    if agent.sync():
        print(f"in sync: {p.rule_count} rules on {obs.backend.value}")
        if p.cache is not None:
            print("note: node-local interception stays dormant until `dnsguard run` keeps a "
                  "healthy cache behind it")
        return EXIT_OK
    print(f"dnsguard: error: {agent.state.last_error}", file=sys.stderr)
    return EXIT_FAIL


def cmd_run(args: argparse.Namespace, settings: Settings, runner: Runner) -> int:
    obs = _observe(settings, runner)
    source = kube_source(settings)
    if source is None:
        p = plan(obs.facts, settings)
    else:
        source.start()
        p = _first_plan(source, settings, obs)
    nf = _netfilter(obs, runner)
    cache = None
    if p.cache is not None:
        cache = CacheRuntime(p.cache, settings.state_dir, runner, obs.backend,
                             unbound=Unbound(settings.state_dir, settings.unbound))
        try:
            cache.prepare()
        except (NetfilterError, OSError) as exc:
            _undo_prepare(cache, runner)
            if isinstance(exc, OSError):  # --state-dir unwritable, or a file, not a directory
                raise CacheError(f"cannot write the cache's config in --state-dir "
                                 f"{settings.state_dir}: {exc.strerror or exc}") from None
            raise
    metrics = Metrics(CollectorRegistry())
    skips = SkipReport(metrics.services_skipped)
    skips(p.skipped)
    agent = Agent(nf, p, interval=settings.sync_interval, cache=cache, metrics=metrics,
                  state_dir=settings.state_dir,
                  replan=_replanner(source, settings, obs, skips) if source else None,
                  kube_status=source.status if source else None)
    metrics.watch(agent, runner)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()
        agent.wake()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if cache is not None:
        control = control_command(f"{settings.unbound}-control",
                                  settings.state_dir / "unbound.conf")
        poller = StatsPoller(control, on_new_process=(
            (lambda: set_query_log(control, True)) if settings.log_queries else None))
        metrics.watch_cache_stats(lambda: poller.snapshot)
        poller.start(stop)
    server = None
    if settings.metrics_address is not None:
        server = serve(settings.metrics_address, metrics, lambda: _healthy(agent, settings),
                       lambda: _ready(agent))
    if source is not None:
        _watch_facts(source, agent, stop)
    if settings.probe_interval > 0:
        _self_probe(agent, metrics, settings, stop)
    log.info("agent started: %d rules, sync every %gs", p.rule_count, settings.sync_interval)
    if p.cache is not None and obs.facts.proxy_mode is ProxyMode.IPVS:
        log.info(_IPVS_KUBELET_NOTE.format(", ".join(str(ip) for ip in p.cache.listen)))
    try:
        agent.run(stop)
        agent.shutdown(settings.drain_seconds, settings.skip_teardown,
                       lambda: cleanup(runner, obs.facts.families))
    finally:
        if server is not None:
            server.shutdown()
        if source is not None:
            source.stop()
    return EXIT_OK


def _undo_prepare(cache: CacheRuntime, runner: Runner) -> None:
    """Nothing half-applied: no link, no config left behind (no rules exist yet).

    The file removal can fail where the state directory is not a directory; the link must go
    all the same.
    """
    try:
        cache.teardown()
    except OSError as exc:
        log.debug("state files not removed: %s", exc)
    remove_link(runner)


def _first_plan(source: KubeSource, settings: Settings, obs: Observed) -> Plan:
    """Wait for the API's first complete facts; without them the plan may not be right."""
    deadline = time.monotonic() + FIRST_FACTS_TIMEOUT
    while (cf := source.snapshot()) is None:
        if time.monotonic() > deadline:
            source.stop()
            raise KubeApiError(f"no facts from the Kubernetes API within "
                               f"{FIRST_FACTS_TIMEOUT:g}s: {source.status().get('last_error')}")
        source.wait_changed(1.0)
    eff, facts = with_cluster(settings, obs, cf)
    return plan(facts, eff)


def _replanner(source: KubeSource, settings: Settings, obs: Observed,
               skips: SkipReport | None = None) -> Callable[[], Plan | None]:
    """The agent calls this each loop turn: a new plan when the API's facts changed.

    A refused plan (the DNS Service was deleted, say) keeps the old one: never tear down rules
    because of what the API says for a moment.
    """
    last_refusal = ""

    def replan() -> Plan | None:
        nonlocal last_refusal
        cf = source.snapshot()
        if cf is None:
            return None
        eff, facts = with_cluster(settings, obs, cf)
        try:
            new = plan(facts, eff)
        except PlanRefused as exc:
            if str(exc) != last_refusal:
                log.warning("keeping the current rules: new facts give no valid plan: %s", exc)
                last_refusal = str(exc)
            return None
        if skips is not None:
            skips(new.skipped)
        return new

    return replan


def _watch_facts(source: KubeSource, agent: Agent, stop: threading.Event) -> None:
    """Wake the agent within a second of a fact change."""
    def loop() -> None:
        while not stop.is_set():
            if source.wait_changed(1.0):
                agent.wake()

    threading.Thread(target=loop, daemon=True, name="kube-facts").start()


def _self_probe(agent: Agent, metrics: Metrics, settings: Settings,
                stop: threading.Event) -> None:
    """Low-rate lookups of the cluster DNS (and the node-local cache) for the histogram."""
    name = f"kubernetes.default.svc.{settings.cluster_domain}"

    def loop() -> None:
        while not stop.wait(settings.probe_interval):
            targets: list[tuple[str, str]] = []
            if agent.plan.cache is not None and agent.plan.cache.listen:
                targets.append(("local", str(agent.plan.cache.listen[0])))
            if settings.dns_ips:
                targets.append(("cluster", str(settings.dns_ips[0])))
            for label, server in targets:
                took = selfprobe.lookup(server, name, timeout=SELF_PROBE_TIMEOUT)
                record_probe(metrics, label, took)

    threading.Thread(target=loop, daemon=True, name="self-probe").start()


def record_probe(metrics: Metrics, target: str, took: float | None) -> None:
    """One self-probe result; ``None`` is a failed lookup.

    A failure is observed just past the last bucket: it lands in +Inf like a timeout, yet the
    histogram's ``_sum`` stays finite (an infinite sum stays +Inf forever, and every rate() or
    average over it would be useless after the first failure).
    """
    if took is None:
        metrics.probe_failures.labels(target).inc()
        took = math.nextafter(SELF_PROBE_TIMEOUT, math.inf)
    metrics.probe_duration.labels(target).observe(took)


def _healthy(agent: Agent, settings: Settings) -> Probe:
    """Alive while the loop turns: a hung loop (stuck exec, deadlock) fails liveness."""
    age = time.time() - agent.state.last_loop_wall
    limit = max(3 * settings.sync_interval, 30.0)
    return Probe(age < limit, f"loop turned {age:.1f}s ago (limit {limit:g}s)")


def _ready(agent: Agent) -> Probe:
    """Ready when the rules are in sync and, with a cache, it intercepts DNS."""
    if not agent.state.in_sync:
        return Probe(False, f"rules not in sync: {agent.state.last_error or 'first sync pending'}")
    if agent.cache is not None and not agent.cache.state.intercepting:
        return Probe(False, f"cache not intercepting: {agent.cache.state.reason}")
    if agent.cache is not None and agent.cache.state.upstream == "serving-stale":
        # still ready: failing open would send pods to the same unreachable cluster DNS
        return Probe(True, f"in sync, cache intercepting, {agent.cache.state.reason}")
    return Probe(True, "in sync" + (", cache intercepting" if agent.cache else ""))


def cmd_cleanup(args: argparse.Namespace, settings: Settings, runner: Runner) -> int:
    removed = cleanup(runner, node_families(Path("/proc")))
    if remove_link(runner):
        removed.append("link dnsguard0")
    for name in STATE_FILES:
        path = settings.state_dir / name
        if path.exists() and path != settings.lock_file:  # a lock file is never removed
            path.unlink()
            removed.append(str(path))
    print("removed: " + (", ".join(removed) if removed else "nothing (dnsguard owned nothing)"))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings, runner: Runner) -> int:
    if args.watch:
        return watch.run(settings.metrics_address or WATCH_ADDRESS)
    doc: dict[str, object] = {"installed": inventory(runner, node_families(Path("/proc")))}
    agent: dict[str, Any] = {}
    try:
        obs, p = _observe_and_plan(settings, runner)
    except (ConfigError, PlanRefused, KubeError) as exc:
        doc.update(in_sync=None, reason=str(exc))
        if isinstance(exc, KubeError):
            # the API is out of reach from here: report what the running agent knows
            agent = read_status(settings.state_dir, max_age=3 * settings.sync_interval + 2)
            doc.update(agent=agent["agent"], api_error=str(exc))
            if agent["agent"] == "running":
                doc.update(in_sync=agent.get("in_sync"), reason="as reported by the agent")
    else:
        drift = _netfilter(obs, runner).drift(p)
        doc.update(
            proxy_mode=obs.facts.proxy_mode.value, backend=obs.backend.value,
            notes=list(obs.notes), planned_rules=p.rule_count,
            in_sync=not drift, drift=drift,
        )
        # the loop turns every health tick with a cache, else every sync interval
        turn = HEALTH_INTERVAL if p.cache is not None else settings.sync_interval
        agent = read_status(settings.state_dir, max_age=3 * turn + 2)
        doc["agent"] = agent["agent"]
        if p.cache is not None and obs.facts.proxy_mode is ProxyMode.IPVS:
            doc["kubelet"] = _IPVS_KUBELET_NOTE.format(
                ", ".join(str(ip) for ip in p.cache.listen))
        if p.cache is not None:
            cache = dict(agent.get("cache") or {})
            if agent["agent"] != "running" or not cache:
                cache.update(intercepting=False,
                             reason=f"{agent.get('reason')}: DNS takes kube-proxy's path")
            doc["cache"] = {**cache, "agent": agent["agent"]}
    if agent.get("agent") == "running":
        for key in ("cache", "kube"):
            if key in agent and key not in doc:
                doc[key] = agent[key]
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for key, value in doc.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k}: {v}")
            elif isinstance(value, list):
                print(f"{key}:")
                for item in value or ["(none)"]:
                    print(f"  - {item}")
            else:
                print(f"{key}: {value}")
    return EXIT_OK if doc.get("in_sync") else EXIT_FAIL
