"""Frozen values shared by every layer.

The planner speaks a small, backend-neutral rule vocabulary (`Match`, `Verdict`, `Rule`,
`Chain`, `Ruleset`); renderers in `dnsguard.plan.render` turn it into iptables-restore or nft
text. Keeping the vocabulary tiny is deliberate: every match the planner may emit must render
identically on iptables-legacy, iptables-nft and native nft, and must round-trip through
`iptables-save` so that the diff can compare kernel state to the plan.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Prefix of every iptables chain dnsguard owns; cleanup removes exactly these.
CHAIN_PREFIX = "DNSGUARD-"
#: Name of the native nft table dnsguard owns (family inet).
NFT_TABLE = "dnsguard"
#: The dead man's switch: interception rules match only while the agent keeps refreshing an
#: entry for the intercepted address (an xt_recent list or an nft set element with a timeout).
#: When the agent or the cache dies, entries age out within this many seconds and DNS falls back
#: to kube-proxy's path with no process needed.
ALIVE_SECONDS = 2
#: DNS over UDP and TCP
DNS_PORT = 53
#: Packet marks (SO_MARK) of the agent's own probe sockets, matched exactly (whole mark) in
#: dnsguard's raw OUTPUT chain, where nothing but the socket has set a mark yet. Chosen clear of
#: the bits others are known to use on the packets that leave that chain: kube-proxy's 0x4000
#: (masquerade) and 0x8000 (drop), Calico's default 0xffff0000, Cilium's 0x0f00, Istio's 0x539,
#: AWS VPC CNI's 0x80.
#: `PROBE_MARK`: the health query to each listen address on port 53 is untracked (so it reaches
#: the cache) even while the dead man's switch is off.
PROBE_MARK = 0x1000
#: `BYPASS_MARK`: the query to the DNS ClusterIP through kube-proxy's path skips interception.
BYPASS_MARK = 0x2000


class Family(enum.Enum):
    """IP family; a parameter everywhere instead of a second copy of the code."""

    V4 = 4
    V6 = 6

    @classmethod
    def of(cls, value: IPAddress | IPNetwork) -> Family:
        return cls.V4 if value.version == 4 else cls.V6

    @property
    def nft_addr(self) -> str:
        """The nft payload keyword for addresses of this family."""
        return "ip" if self is Family.V4 else "ip6"

    @property
    def alive_name(self) -> str:
        """Name of this family's dead man's switch (xt_recent list / nft set)."""
        return f"dnsguard-alive{self.value}"

    @property
    def host_mask(self) -> str:
        return "255.255.255.255" if self is Family.V4 else ":".join(["ffff"] * 8)


class ProxyMode(enum.Enum):
    """kube-proxy's mode; decides whether NOTRACK to a ClusterIP is safe."""

    IPTABLES = "iptables"
    IPVS = "ipvs"
    NFTABLES = "nftables"

    @property
    def nats_with_conntrack(self) -> bool:
        """True when Service traffic is DNATed by conntrack, so untracked packets bypass it."""
        return self is not ProxyMode.IPVS


class Backend(enum.Enum):
    """How dnsguard writes its rules."""

    IPTABLES_LEGACY = "iptables-legacy"
    IPTABLES_NFT = "iptables-nft"
    NFTABLES = "nftables"

    @property
    def is_iptables(self) -> bool:
        return self is not Backend.NFTABLES


class Mitigation(enum.Enum):
    NOTRACK = "notrack"
    NODELOCAL = "nodelocal"
    #: no DNS mitigation: only the other features (``--drop-invalid-input``) own rules
    NONE = "none"


class Table(enum.Enum):
    RAW = "raw"
    FILTER = "filter"
    NAT = "nat"


class Hook(enum.Enum):
    """Built-in chain a dnsguard chain is jumped to from (iptables names)."""

    PREROUTING = "PREROUTING"
    INPUT = "INPUT"
    FORWARD = "FORWARD"
    OUTPUT = "OUTPUT"
    POSTROUTING = "POSTROUTING"


class Proto(enum.Enum):
    UDP = "udp"
    TCP = "tcp"


class CtState(enum.Enum):
    """A conntrack state a rule can match (``-m conntrack --ctstate`` / ``ct state``)."""

    INVALID = "invalid"


class Verdict(enum.Enum):
    NOTRACK = "notrack"
    ACCEPT = "accept"
    DROP = "drop"
    RETURN = "return"
    DNAT = "dnat"
    #: go on in another dnsguard chain (`Rule.jump`)
    JUMP = "jump"
    #: OR `Rule.mark` into the packet mark
    MARK = "mark"


@dataclass(frozen=True)
class Match:
    """What a rule matches. Every field is optional; unset means 'any'."""

    proto: Proto | None = None
    src: IPNetwork | None = None
    dst: IPNetwork | None = None
    sport: int | None = None
    dport: int | None = None
    #: match only while the destination address is in the dead man's switch
    alive: bool = False
    #: match only packets in this conntrack state
    ctstate: CtState | None = None
    #: match only packets whose source address is local to the node (addrtype LOCAL)
    src_local: bool = False
    #: match only packets whose mark equals this exactly (`PROBE_MARK`, `BYPASS_MARK`)
    mark: int | None = None


@dataclass(frozen=True)
class Rule:
    match: Match
    verdict: Verdict
    comment: str
    #: DNAT target (address, port); only with Verdict.DNAT
    to: tuple[IPAddress, int] | None = None
    #: the `Chain.sub` of the chain to go on in; only with Verdict.JUMP
    jump: str | None = None
    #: bits to set in the packet mark; only with Verdict.MARK
    mark: int | None = None


@dataclass(frozen=True)
class Chain:
    """One dnsguard chain, hooked from one built-in chain by a single jump, first in line.

    A chain with ``sub`` set is not hooked: only rules of dnsguard's own chains jump to it
    (`Verdict.JUMP`), and ``hook`` then names the traffic it serves. It is owned, diffed,
    rewritten and cleaned up like every other ``DNSGUARD-*`` chain.
    """

    table: Table
    hook: Hook
    rules: tuple[Rule, ...]
    sub: str | None = None

    @property
    def name(self) -> str:
        return f"{CHAIN_PREFIX}{self.sub or self.hook.value}"

    @property
    def hooked(self) -> bool:
        return self.sub is None


@dataclass(frozen=True)
class Ruleset:
    """The full desired state for one family: what dnsguard owns and nothing else."""

    family: Family
    chains: tuple[Chain, ...] = ()

    def tables(self) -> tuple[Table, ...]:
        seen: list[Table] = []
        for chain in self.chains:
            if chain.table not in seen:
                seen.append(chain.table)
        return tuple(seen)

    def chains_in(self, table: Table) -> tuple[Chain, ...]:
        return tuple(c for c in self.chains if c.table is table)

    @property
    def uses_alive(self) -> bool:
        return any(r.match.alive for c in self.chains for r in c.rules)


@dataclass(frozen=True)
class NodeFacts:
    """What the node and the cluster tell us; the planner's only input besides settings."""

    proxy_mode: ProxyMode
    dns_ips: tuple[IPAddress, ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()
    families: frozenset[Family] = field(default_factory=lambda: frozenset({Family.V4}))
    #: nameservers of the node's own resolv.conf, for names outside the cluster domain
    node_nameservers: tuple[IPAddress, ...] = ()
    #: the DNS Service's ready endpoints (pod IPs), when the Kubernetes API told us
    dns_endpoints: tuple[IPAddress, ...] = ()
    #: Services with external IPs or load-balancer ingress IPs (--external-to-cluster)
    external_services: tuple[ExternalService, ...] = ()
    #: every Node's addresses (status.addresses), never claimable as an external IP
    node_ips: tuple[IPAddress, ...] = ()
    #: the API server's addresses (kubeconfig host, the kubernetes Service), never claimable
    api_server_ips: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class ServicePort:
    proto: Proto
    port: int


@dataclass(frozen=True)
class ExternalService:
    """The few fields of a Service that --external-to-cluster plans from."""

    #: ``namespace/name``
    key: str
    cluster_ips: tuple[IPAddress, ...]
    ports: tuple[ServicePort, ...]
    #: spec.externalIPs and status.loadBalancer.ingress[].ip, deduplicated
    external_ips: tuple[IPAddress, ...]
    #: those of ``external_ips`` from status.loadBalancer.ingress: they win a duplicate claim
    lb_ips: tuple[IPAddress, ...] = ()
    #: metadata.creationTimestamp as the API writes it (RFC 3339, UTC): the older Service
    #: wins a duplicate claim; "" when unknown (then it loses to any dated one)
    created: str = ""
    #: metadata.uid: breaks a tie of ``created``
    uid: str = ""
