"""The doctor's only I/O: read the node twice over a window and hand back `Samples`.

Order of work, and why:

1. Slow-moving state first (kernel release, rules, proxy mode, DNS ClusterIPs, resolv.conf,
   the DNS server processes): read once.
2. First counter reading (conntrack, each DNS server namespace's UDP MIB), then the window:
   the built-in probe runs in a thread during it, so DNS is exercised while we watch the
   counters and the window costs no extra time. The wait is the injected ``sleep``; the
   window length is measured with the injected ``clock``, so unit tests neither sleep nor
   depend on the wall clock.
3. Second counter reading, after the probe finished (bounded: a probe lasts at most its
   duration plus its timeout).

Every external command goes through the `Runner` (the node-local cache's statistics through
its unbound-control, when doctor is given one); files are read under ``proc_root``.
Failures of one source become notes and a missing sample, never an exception: doctor must
report what it can see on a half-broken node.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dnsguard.cache.stats import (
    Control,
    Monotonic,
    StatsError,
    parse_forwards,
    parse_infra,
    parse_stats,
)
from dnsguard.diagnose.rules import discover_dns_ips
from dnsguard.diagnose.samples import (
    NODE_LOCAL_IP,
    CacheWindow,
    ConntrackWindow,
    DnsServerWindow,
    ProbeSample,
    ResolvSample,
    RulesSample,
    RuleText,
    Samples,
)
from dnsguard.model import IPAddress, ProxyMode
from dnsguard.netfilter.errors import CommandNotFound, NetfilterError
from dnsguard.netfilter.runner import Runner
from dnsguard.node.conntrack import kernel_release, read_conntrack
from dnsguard.node.detect import detect_proxy_mode
from dnsguard.node.links import address_owners
from dnsguard.node.procnet import (
    find_dns_servers,
    listening_udp,
    read_resolv_conf,
    read_udp_counters,
)
from dnsguard.probe import ProbeConfig, ProbeReport, run_probe

__all__ = ["Sampler", "SamplerConfig"]

Prober = Callable[[ProbeConfig], ProbeReport]


@dataclass(frozen=True)
class SamplerConfig:
    window: float = 5.0
    proxy_mode: ProxyMode | Literal["auto"] = "auto"
    dns_ips: tuple[IPAddress, ...] = ()
    cache_ips: tuple[IPAddress, ...] = (NODE_LOCAL_IP,)
    resolv_conf: Path | None = Path("/etc/resolv.conf")
    probe: bool = True
    probe_name: str = "kubernetes.default.svc.cluster.local"
    probe_rate: float = 20.0  # lookups/s per target: enough to see a 5% tail, not a load test
    probe_concurrency: int = 4


class Sampler:
    def __init__(self, runner: Runner, proc_root: Path = Path("/proc"), *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 prober: Prober = run_probe, cache_control: Control | None = None,
                 cache_log: Path | None = None) -> None:
        self.runner = runner
        self.proc_root = proc_root
        self.clock = clock
        self.sleep = sleep
        self.prober = prober
        #: dnsguard's node-local cache (unbound-control) and its log, when it runs here
        self.cache_control = cache_control
        self.cache_log = cache_log

    def _cache_stats(self, notes: list[str]) -> dict[str, float] | None:
        if self.cache_control is None:
            return None
        try:
            return parse_stats(self.cache_control(["stats_noreset"]))
        except StatsError as exc:
            notes.append(f"node-local cache statistics unavailable ({exc}): cache findings "
                         "not checked")
            return None

    def _log_size(self) -> int:
        try:
            return self.cache_log.stat().st_size if self.cache_log else 0
        except OSError:
            return 0

    def _window_lines(self, log_at: int) -> tuple[str, ...]:
        """Query log lines written since offset ``log_at``.

        The agent caps the log (cache.unbound: past 1 MiB its tail moves to ``unbound.log.1``
        and the log starts again at 0), and a storm fills a megabyte in seconds. A log now
        shorter than ``log_at`` was cut during the window: the rotated tail is read as well,
        which may hold some lines from before the window, rather than nothing at all.
        """
        if self.cache_log is None:
            return ()
        size, log = self._log_size(), self.cache_log
        data = b""
        if size < log_at:
            with contextlib.suppress(OSError):  # no rotated file: only what follows the cut
                data = log.with_name(log.name + ".1").read_bytes()
            log_at = 0
        if size > log_at:
            with log.open("rb") as f:
                f.seek(log_at)
                data += f.read()
        return tuple(data.decode(errors="replace").splitlines())

    def _cache_window(self, before: dict[str, float], log_at: int, seconds: float,
                      notes: list[str]) -> CacheWindow | None:
        assert self.cache_control is not None
        try:
            after = parse_stats(self.cache_control(["stats_noreset"]))
            upstreams = Monotonic().upstreams(
                parse_forwards(self.cache_control(["list_forwards"])),
                parse_infra(self.cache_control(["dump_infra"])))
        except StatsError as exc:
            notes.append(f"node-local cache statistics unavailable at the end ({exc})")
            return None
        replies = self._window_lines(log_at)
        notes.append(f"node-local cache statistics over the window ({len(upstreams)} "
                     f"upstreams, {len(replies)} query log lines)")
        return CacheWindow(before, after, seconds, upstreams, replies)

    def _dump(self, argv: list[str]) -> str | None:
        try:
            res = self.runner.run(argv, timeout=30.0)
        except (CommandNotFound, NetfilterError):
            return None
        return res.stdout if res.ok else None

    def rules(self, cfg: SamplerConfig, notes: list[str]) -> RulesSample:
        dumps: list[RuleText] = []
        for flavour in ("legacy", "nft"):
            for family, tool in ((4, "iptables"), (6, "ip6tables")):
                text = self._dump([f"{tool}-{flavour}-save"])
                if text is not None:
                    dumps.append(RuleText(f"iptables-{flavour} (ipv{family})", family, text))
        ruleset = self._dump(["nft", "list", "ruleset"])
        nft = RuleText("nft list ruleset", None, ruleset) if ruleset is not None else None
        if not dumps and nft is None:
            notes.append("no iptables-save or nft found: rules not checked")

        if cfg.proxy_mode == "auto":
            detected = detect_proxy_mode(self.runner, self.proc_root)
            mode = detected.value if detected else None
            evidence = detected.evidence if detected else "no kube-proxy rules found"
            notes.append(f"proxy mode {mode.value if mode else 'unknown'}: {evidence}")
        else:
            mode, evidence = cfg.proxy_mode, "given with --proxy-mode"

        if cfg.dns_ips:
            ips, source = cfg.dns_ips, "--dns-ip"
        else:
            ips = discover_dns_ips(dumps, nft)
            source = "kube-proxy rules" if ips else ""
            notes.append(f"DNS ClusterIP(s) from kube-proxy's rules: "
                         f"{', '.join(map(str, ips))}" if ips else
                         "no DNS ClusterIP given or found in kube-proxy's rules (--dns-ip)")
        local: list[tuple[IPAddress, str]] = []
        try:
            for text, link in sorted(address_owners(self.runner).items()):
                local.append((ipaddress.ip_address(text.split("%")[0]), link))
        except (NetfilterError, ValueError, KeyError, TypeError):
            notes.append("ip addr unreadable: local DNS addresses (node-local cache) unknown")
        return RulesSample(mode, evidence, tuple(ips), source, tuple(dumps), nft, tuple(local),
                           cfg.cache_ips)

    def _probe_targets(self, rules: RulesSample,
                       listeners: frozenset[tuple[str, int]]) -> list[tuple[str, IPAddress]]:
        targets = [(f"cluster DNS {ip}", ip) for ip in rules.dns_ips]
        for ip in rules.cache_ips:
            if ip not in rules.dns_ips and (
                    (str(ip), 53) in listeners or rules.local_link(ip) is not None):
                targets.append((f"node-local cache {ip}", ip))
        return targets

    def sample(self, cfg: SamplerConfig) -> Samples:
        notes: list[str] = []
        release = kernel_release(self.proc_root)
        rules = self.rules(cfg, notes)
        resolv = None
        if cfg.resolv_conf is not None:
            conf = read_resolv_conf(cfg.resolv_conf)
            if conf is None:
                notes.append(f"{cfg.resolv_conf} not readable: search expansion not checked")
            else:
                resolv = ResolvSample(str(cfg.resolv_conf), conf)
        servers = find_dns_servers(self.proc_root)
        listeners = frozenset(listening_udp(self.proc_root))
        notes.append("DNS server namespaces: " + (
            "; ".join(s.label for s in servers) or "none found (by /proc/*/comm)"))

        cache0, log_at = self._cache_stats(notes), self._log_size()
        ct0 = read_conntrack(self.runner, self.proc_root)
        udp0 = {s.netns: read_udp_counters(self.proc_root, s.pid) for s in servers}
        t0 = self.clock()

        probes: list[ProbeSample] = []
        threads: list[threading.Thread] = []
        lock = threading.Lock()
        probe_timeout = min(5.0, max(1.0, cfg.window))
        if cfg.probe:
            targets = self._probe_targets(rules, listeners)
            if not targets:
                notes.append("no DNS address to probe: dns-slow-lookups/dns-unreachable not "
                             "checked")
            for label, ip in targets:
                pcfg = ProbeConfig(server=ip, names=(cfg.probe_name,),
                                   concurrency=cfg.probe_concurrency, duration=cfg.window,
                                   timeout=probe_timeout, rate=cfg.probe_rate)
                th = threading.Thread(target=self._run_probe, args=(label, pcfg, probes, lock),
                                      name=f"doctor-probe-{ip}", daemon=True)
                th.start()
                threads.append(th)

        self.sleep(cfg.window)
        for th in threads:  # a probe ends by duration + timeout; the margin is for the join
            th.join(timeout=cfg.window + probe_timeout + 5.0)
        seconds = max(self.clock() - t0, 1e-9)
        ct1 = read_conntrack(self.runner, self.proc_root)
        windows = []
        for s in servers:
            before, after = udp0.get(s.netns), read_udp_counters(self.proc_root, s.pid)
            if before is not None and after is not None:
                windows.append(DnsServerWindow(s, before, after, seconds))
            else:
                notes.append(f"{s.label}: UDP counters not readable (process gone?)")
        conntrack = None
        if ct0 is not None and ct1 is not None:
            conntrack = ConntrackWindow(ct0, ct1, seconds)
            notes.append(f"conntrack statistics from {ct1.source}")
        else:
            notes.append("conntrack statistics unavailable: conntrack findings not checked")
        cache = None if cache0 is None else self._cache_window(cache0, log_at, seconds, notes)
        with lock:
            done = tuple(sorted(probes, key=lambda p: p.target))
        return Samples(window=seconds, kernel_release=release, conntrack=conntrack,
                       rules=rules, dns_servers=tuple(windows), probes=done, resolv=resolv,
                       udp_listeners=listeners, notes=tuple(notes), cache=cache)

    def _run_probe(self, label: str, pcfg: ProbeConfig, out: list[ProbeSample],
                   lock: threading.Lock) -> None:
        try:
            sample = ProbeSample(label, self.prober(pcfg), server=pcfg.server)
        except (OSError, ValueError) as exc:
            sample = ProbeSample(label, None, str(exc), server=pcfg.server)
        with lock:
            out.append(sample)
