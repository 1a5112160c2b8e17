"""What the sampler hands to the classifiers: plain frozen values, no handles, no I/O.

Counters come in windows (a reading before, one after, and the seconds between), so a
classifier sees deltas and rates, never a lifetime total that might be years old. A missing
source is ``None`` (or an empty tuple), and classifiers draw nothing from it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from dnsguard.cache.stats import Upstream
from dnsguard.model import IPAddress, ProxyMode
from dnsguard.node.conntrack import ConntrackStats
from dnsguard.node.procnet import DnsServer, ResolvConf, UdpCounters
from dnsguard.probe import ProbeReport

__all__ = [
    "NODE_LOCAL_IP",
    "CacheWindow",
    "ConntrackWindow",
    "DnsServerWindow",
    "ProbeSample",
    "ResolvSample",
    "RuleText",
    "RulesSample",
    "Samples",
]


#: The link-local address NodeLocal DNSCache (and dnsguard's cache) listens on by convention.
NODE_LOCAL_IP = ipaddress.ip_address("169.254.20.10")


@dataclass(frozen=True)
class ConntrackWindow:
    before: ConntrackStats
    after: ConntrackStats
    seconds: float

    def delta(self, name: str) -> int | None:
        """How much a counter moved; None when this kernel does not maintain it.

        Per-CPU counters are 32 bits and may wrap; a negative difference is reported as None
        rather than as a huge or negative number.
        """
        a, b = self.before.get(name), self.after.get(name)
        if a is None or b is None or b < a:
            return None
        return b - a

    def rate(self, name: str) -> float | None:
        d = self.delta(name)
        return None if d is None or self.seconds <= 0 else d / self.seconds


@dataclass(frozen=True)
class DnsServerWindow:
    server: DnsServer
    before: UdpCounters
    after: UdpCounters
    seconds: float

    @property
    def rcvbuf_errors(self) -> int:
        return max(0, self.after.rcvbuf_errors - self.before.rcvbuf_errors)

    @property
    def in_datagrams(self) -> int:
        return max(0, self.after.in_datagrams - self.before.in_datagrams)

    @property
    def socket_drops(self) -> int | None:
        a, b = self.before.socket_drops, self.after.socket_drops
        return None if a is None or b is None else max(0, b - a)


@dataclass(frozen=True)
class RuleText:
    """One dump of rules: ``iptables-nft-save`` for one family, or ``nft list ruleset``."""

    source: str  # "iptables-nft (ipv4)", "nft list ruleset", ...
    family: int | None  # 4 or 6 for iptables-save dumps; None for nft (families inline)
    text: str


@dataclass(frozen=True)
class RulesSample:
    proxy_mode: ProxyMode | None
    proxy_mode_evidence: str
    dns_ips: tuple[IPAddress, ...]
    dns_ips_source: str  # "--dns-ip", "kube-proxy rules", or "" when none known
    iptables: tuple[RuleText, ...] = ()
    nft: RuleText | None = None
    #: addresses held by this node's links (address, link): a DNS address among them is
    #: served locally (a node-local cache intercepting it), not DNATed
    local_addresses: tuple[tuple[IPAddress, str], ...] = ()
    #: where a node-local cache would listen (--local-ip; 169.254.20.10 by convention)
    cache_ips: tuple[IPAddress, ...] = (NODE_LOCAL_IP,)

    def local_link(self, ip: IPAddress) -> str | None:
        return next((link for a, link in self.local_addresses if a == ip), None)


@dataclass(frozen=True)
class ProbeSample:
    target: str  # what was probed and why: "cluster DNS 10.96.0.10"
    report: ProbeReport | None
    error: str | None = None
    server: IPAddress | None = None


@dataclass(frozen=True)
class ResolvSample:
    path: str
    conf: ResolvConf


@dataclass(frozen=True)
class CacheWindow:
    """The node-local cache's raw statistics at both ends of the window, its upstreams at the
    end, and the query log lines written in between (empty when the log is off)."""

    before: Mapping[str, float]
    after: Mapping[str, float]
    seconds: float
    upstreams: tuple[Upstream, ...] = ()
    replies: tuple[str, ...] = ()

    def delta(self, key: str) -> float | None:
        """How much a counter moved; None across a statistics reset (restart or reload)."""
        a, b = self.before.get(key, 0.0), self.after.get(key, 0.0)
        reset = self.after.get("total.num.queries", 0.0) < self.before.get(
            "total.num.queries", 0.0)
        return None if reset or b < a else b - a


@dataclass(frozen=True)
class Samples:
    window: float
    kernel_release: str | None = None
    conntrack: ConntrackWindow | None = None
    rules: RulesSample | None = None
    dns_servers: tuple[DnsServerWindow, ...] = ()
    probes: tuple[ProbeSample, ...] = ()
    resolv: ResolvSample | None = None
    #: (address, port) of UDP sockets in the node's namespace; None when unreadable
    udp_listeners: frozenset[tuple[str, int]] | None = None
    notes: tuple[str, ...] = ()
    cache: CacheWindow | None = None
