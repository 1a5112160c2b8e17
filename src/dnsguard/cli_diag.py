"""``dnsguard probe`` and ``dnsguard doctor``: the commands that show why DNS is slow.

Wired into ``dnsguard.cli`` with `add_commands` (parsers) and `COMMANDS` (handlers with the
same signature as the core commands: parsed args, settings, runner -> exit code). Flag values
that need more than argparse's types are parsed here once and raise `ConfigError`, which the
CLI turns into exit code 2, like every other bad usage.

``python -m dnsguard.cli_diag probe|doctor ...`` runs the same commands on their own.

Exit codes:

    probe   0 every lookup answered; 3 some timed out or failed; 4 none answered
    doctor  0 nothing warning or critical; 3 worst is a warning; 4 something is critical
    both    1 runtime failure; 2 bad usage (never used for a verdict)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO, cast

from dnsguard.cache.querylog import query_log_enabled, set_query_log
from dnsguard.cache.stats import StatsError, control_command
from dnsguard.config import ConfigError, Settings, add_fact_flags, parse_ip, settings_from
from dnsguard.diagnose import (
    EXIT_CRITICAL,
    EXIT_OK,
    EXIT_WARNING,
    classify,
    exit_code,
    render_table,
    to_json,
)
from dnsguard.diagnose.sampler import Sampler, SamplerConfig
from dnsguard.dnswire import DnsWireError, QType, encode_name
from dnsguard.facts import load_cluster, uses_api
from dnsguard.kube import KubeError
from dnsguard.model import IPAddress
from dnsguard.netfilter.runner import Runner, SubprocessRunner
from dnsguard.node.procnet import read_resolv_conf
from dnsguard.probe import ProbeConfig, ProbeError, ProbeReport, Progress, Via, run_probe

__all__ = ["COMMANDS", "add_commands", "main"]

DEFAULT_NAME = "kubernetes.default.svc.cluster.local"
DEFAULT_PATTERN = "dnsguard-probe-{i}.default.svc.cluster.local"

Command = Callable[[argparse.Namespace, Settings, Runner], int]


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``probe`` and ``doctor`` to the CLI's subparsers."""
    text = "send DNS lookups like glibc and report rate, latency tail, timeouts and rcodes"
    p = subparsers.add_parser("probe", help=text, description=text)
    p.add_argument("--server", metavar="IP",
                   help="DNS server to query (default: --dns-ip / DNSGUARD_DNS_IP, "
                        "else the first nameserver of --resolv-conf)")
    p.add_argument("--port", metavar="PORT", default="53")
    p.add_argument("--name", action="append", metavar="NAME",
                   help=f"name to look up (repeatable; default {DEFAULT_NAME})")
    p.add_argument("--names", metavar="N",
                   help="look up N distinct names made from --name-pattern (defeats caches)")
    p.add_argument("--name-pattern", metavar="PATTERN", default=DEFAULT_PATTERN,
                   help="pattern for --names; {i} is replaced by 0..N-1")
    p.add_argument("--concurrency", metavar="C", default="10", help="lookups in flight")
    p.add_argument("--workers", metavar="N", default="1",
                   help="processes sharing the lookups (wire only); one process drives "
                        "10-18k lookups/s (20-35k queries/s), more use more cores")
    p.add_argument("--duration", metavar="SECONDS", default="10",
                   help="stop starting lookups after this long (default 10)")
    p.add_argument("--count", metavar="N", help="stop after starting N lookups")
    p.add_argument("--rate", metavar="PER_SECOND", help="start at most this many lookups/s")
    p.add_argument("--timeout", metavar="SECONDS", default="5",
                   help="a lookup without every reply by then is a timeout (default 5)")
    p.add_argument("--query-types", metavar="A,AAAA", default="A,AAAA",
                   help="queries per lookup, sent back to back from one socket")
    p.add_argument("--search", action="store_true",
                   help="expand names through --resolv-conf's search list and ndots")
    p.add_argument("--resolv-conf", metavar="PATH", default="/etc/resolv.conf")
    p.add_argument("--via", metavar="wire|getaddrinfo", default="wire",
                   help="wire: our own packets to --server; getaddrinfo: the system resolver")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")

    text = "sample the node for a few seconds and say why DNS is slow, with evidence and fixes"
    d = subparsers.add_parser("doctor", help=text, description=text)
    add_fact_flags(d)
    d.add_argument("--window", metavar="SECONDS", default="5",
                   help="how long to watch the counters (default 5)")
    d.add_argument("--json", action="store_true", help="one JSON document on stdout")
    d.add_argument("--resolv-conf", metavar="PATH", default="/etc/resolv.conf",
                   help="resolv.conf to check for search amplification ('' to skip)")
    d.add_argument("--probe-name", metavar="NAME", default=DEFAULT_NAME,
                   help="name the built-in probe looks up")
    d.add_argument("--no-probe", action="store_true",
                   help="do not send DNS lookups (no dns-slow-lookups/dns-unreachable)")
    d.add_argument("--proc-root", metavar="PATH", default="/proc",
                   help="where the node's procfs is mounted (e.g. /host/proc in a pod)")

    text = "turn the node-local cache's query log on or off now, or show it (no restart)"
    c = subparsers.add_parser("cache-log", help=text, description=text)
    add_fact_flags(c)
    c.add_argument("state", choices=("on", "off", "status"),
                   help="on: one line per answer in unbound.log in --state-dir (bounded in "
                        "size); lasts until the cache restarts, or for good with run "
                        "--log-queries")


# --- value parsing ------------------------------------------------------------------------


def _number(flag: str, raw: str, *, minimum: float, integer: bool = False) -> float:
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"invalid {flag} {raw!r}: not {kind}") from None
    if not value >= minimum or math.isinf(value):
        raise ConfigError(f"invalid {flag} {raw!r}: must be at least {minimum:g}")
    return value


def _names(args: argparse.Namespace) -> tuple[str, ...]:
    if args.names is not None:
        if args.name:
            raise ConfigError("--name and --names exclude each other")
        n = int(_number("--names", args.names, minimum=1, integer=True))
        if "{i}" not in args.name_pattern:
            raise ConfigError(f"invalid --name-pattern {args.name_pattern!r}: needs {{i}}")
        names = tuple(args.name_pattern.replace("{i}", str(i)) for i in range(n))
    else:
        names = tuple(args.name or [DEFAULT_NAME])
    for name in names:
        try:
            encode_name(name)
        except DnsWireError as exc:
            raise ConfigError(f"invalid name: {exc}") from None
    return names


def _qtypes(raw: str) -> tuple[QType, ...]:
    try:
        out = tuple(QType[t.strip().upper()] for t in raw.split(",") if t.strip())
    except KeyError:
        raise ConfigError(f"invalid --query-types {raw!r}: use A, AAAA or A,AAAA") from None
    if not out or any(t not in (QType.A, QType.AAAA) for t in out):
        raise ConfigError(f"invalid --query-types {raw!r}: use A, AAAA or A,AAAA")
    return out


def probe_config(args: argparse.Namespace, settings: Settings) -> ProbeConfig:
    """Flags (and settings for the default server) -> a validated `ProbeConfig`."""
    if args.via not in ("wire", "getaddrinfo"):
        raise ConfigError(f"invalid --via {args.via!r}: expected one of wire, getaddrinfo")
    via = cast(Via, args.via)
    resolv = None
    if args.search or (via == "wire" and args.server is None and not settings.dns_ips):
        resolv = read_resolv_conf(Path(args.resolv_conf))
        if resolv is None:
            raise ConfigError(f"invalid --resolv-conf {args.resolv_conf!r}: cannot read it")
    server: IPAddress | None = None
    if via == "wire":
        if args.server is not None:
            server = parse_ip("--server", args.server)
        elif settings.dns_ips:
            server = settings.dns_ips[0]
        else:
            assert resolv is not None
            if not resolv.nameservers:
                raise ConfigError(f"no --server given and no nameserver in {args.resolv_conf}")
            server = parse_ip(f"nameserver in {args.resolv_conf}", resolv.nameservers[0])
    elif args.server is not None or args.search:
        raise ConfigError("--via getaddrinfo uses the system resolver: "
                          "--server and --search do not apply")
    count = None if args.count is None else int(
        _number("--count", args.count, minimum=1, integer=True))
    rate = None if args.rate is None else _number("--rate", args.rate, minimum=0.001)
    port = int(_number("--port", args.port, minimum=1, integer=True))
    if port > 65535:
        raise ConfigError(f"invalid --port {args.port!r}: must be at most 65535")
    return ProbeConfig(
        server=server, names=_names(args), port=port,
        concurrency=int(_number("--concurrency", args.concurrency, minimum=1, integer=True)),
        duration=_number("--duration", args.duration, minimum=0),
        count=count, timeout=_number("--timeout", args.timeout, minimum=0.001),
        qtypes=_qtypes(args.query_types), via=via,
        resolv=resolv if args.search else None, rate=rate,
    )


# --- probe --------------------------------------------------------------------------------


class _ProgressPrinter:
    """A redrawn bar on a terminal, one plain line per tick otherwise (logs, CI)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, p: Progress) -> None:
        rate = p.finished / p.elapsed if p.elapsed > 0 else 0.0
        total = p.count or p.duration
        frac = min(1.0, (p.started if p.count else p.elapsed) / total if total else 1.0)
        stats = (f"{p.finished} lookups {rate:.0f}/s  slow or unanswered {p.slow}  "
                 f"timeouts {p.timeouts}")
        if self.tty:
            bar = "#" * int(frac * 24)
            self.stream.write(f"\r[{bar:<24}] {p.elapsed:5.1f}s  {stats}\x1b[K")
        else:
            self.stream.write(f"probe: {p.elapsed:.1f}s  {stats}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def probe_exit(report: ProbeReport) -> int:
    if report.lookups and report.answered == 0:
        return EXIT_CRITICAL
    return EXIT_WARNING if report.answered < report.lookups else EXIT_OK


def probe_workers(args: argparse.Namespace, cfg: ProbeConfig) -> int:
    workers = int(_number("--workers", args.workers, minimum=1, integer=True))
    if workers > 1 and cfg.via == "getaddrinfo":
        raise ConfigError("--workers applies to --via wire only (getaddrinfo uses threads)")
    if workers > cfg.concurrency:
        raise ConfigError(f"--workers {workers} needs --concurrency of at least {workers}")
    return workers


def cmd_probe(args: argparse.Namespace, settings: Settings, runner: Runner) -> int:
    cfg = probe_config(args, settings)
    workers = probe_workers(args, cfg)
    printer = _ProgressPrinter(sys.stderr)
    every = 0.2 if printer.tty else 1.0
    try:
        report = run_probe(cfg, progress=printer, progress_every=every, workers=workers)
    except ProbeError as exc:
        print(f"dnsguard: error: {exc}", file=sys.stderr)
        return 1
    finally:
        printer.done()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.render())
    return probe_exit(report)


# --- doctor -------------------------------------------------------------------------------


def sampler_config(args: argparse.Namespace, settings: Settings) -> SamplerConfig:
    return SamplerConfig(
        window=_number("--window", args.window, minimum=0.1),
        proxy_mode=settings.proxy_mode, dns_ips=settings.dns_ips, cache_ips=settings.local_ips,
        resolv_conf=Path(args.resolv_conf) if args.resolv_conf else None,
        probe=not args.no_probe, probe_name=args.probe_name,
    )


def _with_api_facts(settings: Settings) -> Settings:
    """The DNS ClusterIPs from the Kubernetes API when no --dns-ip was given.

    Doctor must work on a sick node: if the API cannot be read, it says so and falls back to
    discovering the ClusterIPs from kube-proxy's rules.
    """
    if settings.dns_ips or not uses_api(settings):
        return settings
    try:
        cluster = load_cluster(settings)
    except KubeError as exc:
        print(f"dnsguard doctor: Kubernetes API unreadable ({exc}); discovering from the node",
              file=sys.stderr)
        return settings
    return replace(settings, dns_ips=cluster.dns_ips) if cluster is not None else settings


def cmd_doctor(args: argparse.Namespace, settings: Settings, runner: Runner) -> int:
    settings = _with_api_facts(settings)
    cfg = sampler_config(args, settings)
    try:
        encode_name(cfg.probe_name)
    except DnsWireError as exc:
        raise ConfigError(f"invalid --probe-name: {exc}") from None
    conf = settings.state_dir / "unbound.conf"
    cache = control_command(f"{settings.unbound}-control", conf) if conf.exists() else None
    samples = Sampler(runner, Path(args.proc_root), cache_control=cache,
                      cache_log=settings.state_dir / "unbound.log").sample(cfg)
    findings = classify(samples)
    rules = samples.rules
    mode = rules.proxy_mode.value if rules and rules.proxy_mode else "unknown"
    ips = [str(ip) for ip in rules.dns_ips] if rules else []
    if args.json:
        print(json.dumps(to_json(
            findings, window_seconds=round(samples.window, 3), kernel=samples.kernel_release,
            proxy_mode=mode, dns_ips=ips, notes=list(samples.notes)), indent=2))
    else:
        print(f"dnsguard doctor: {samples.window:.1f}s window, kernel "
              f"{samples.kernel_release or 'unknown'}, kube-proxy mode {mode}, cluster DNS "
              f"{', '.join(ips) or 'unknown'}\n")
        sys.stdout.write(render_table(findings))
        print("\nchecked:")
        for note in samples.notes:
            print(f"  - {note}")
    return exit_code(findings)


def cmd_cache_log(args: argparse.Namespace, settings: Settings, runner: Runner) -> int:
    """Flip the running cache's query log through its control socket."""
    control = control_command(f"{settings.unbound}-control", settings.state_dir / "unbound.conf")
    try:
        if args.state != "status":
            set_query_log(control, args.state == "on")
        on = query_log_enabled(control)
    except StatsError as exc:
        print(f"dnsguard: error: cannot reach the cache in {settings.state_dir}: {exc}",
              file=sys.stderr)
        return 1
    print(f"query log {'on' if on else 'off'}: {settings.state_dir / 'unbound.log'}")
    return 0


COMMANDS: dict[str, Command] = {"probe": cmd_probe, "doctor": cmd_doctor,
                                "cache-log": cmd_cache_log}


# --- standalone entry point ---------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"dnsguard: error: {message}\n")


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
    """``python -m dnsguard.cli_diag``: the two commands without the rest of the CLI."""
    parser = _Parser(prog="dnsguard")
    add_commands(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args, settings_from(args), runner or SubprocessRunner())
    except ConfigError as exc:
        print(f"dnsguard: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
