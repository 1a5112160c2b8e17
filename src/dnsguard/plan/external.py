"""--external-to-cluster: in-cluster traffic to a Service's external IPs goes to its ClusterIP.

For IPVS mode, where kube-proxy leaves traffic to a LoadBalancer ingress IP or an external IP
to the network: a pod (or the node) talking to it then hairpins through the load balancer, and
with ``externalTrafficPolicy: Local`` reaches a backend only if one runs behind the node the
balancer picked. dnsguard DNATs such traffic, from the pod ranges (nat PREROUTING) and from the
node itself (nat OUTPUT, source address type LOCAL), to the Service's ClusterIP of the same
family on the same port, which IPVS serves on every node. The packet is first marked with
kube-proxy's masquerade bit (0x4000), as kube-proxy marks traffic it must masquerade.

Layout: one dispatch rule per (external IP, port[, pod range]) jumps to a per-Service,
per-family chain ``DNSGUARD-EXT-<hash>`` (not hooked) that marks and DNATs per port. The hash
is of ``namespace/name`` and the family, so a Service keeps its chain name across changes.
Unlike kube-proxy's one KUBE-SERVICES chain, the dispatch rules are sharded by the external
IP's /24 (IPv6: /120), the size of a typical load-balancer pool: ``DNSGUARD-PREROUTING`` /
``DNSGUARD-OUTPUT`` hold one jump per shard to ``DNSGUARD-XPRE-<hash>`` /
``DNSGUARD-XOUT-<hash>``. A change to one Service rewrites its own chain and the shard chains
of its external IPs (at most 256 addresses' rules each), not every Service's dispatch rule,
and a packet walks the shards' jumps and one shard instead of every rule.

With ``--mitigation notrack`` the DNS pods' replies to pods are untracked, so a reply to a
DNATed query could not be un-NATed back to the external IP the pod asked: the cluster DNS
Service's port 53 is then left out (pods reach its external IP the way they did before), and
so is every port 53 when the DNS endpoints are unknown (then any pod's port-53 reply is
untracked).

Every value of a Service is checked before it is planned (`dnsguard.plan.checks`: addresses
without zone IDs, ports 1-65535, a name safe for a comment); a Service that fails is left out
and reported in `Plan.skipped` (the agent logs it once and counts it), so one odd object never
takes the rest of the ruleset down. Comments carry the Service's ``namespace/name`` shortened
to 48 characters with a hash when longer, so the renderers' comment limits (nft: 128 bytes) are
met in the usual case and the rules stay readable.

Claims (CVE-2020-8554, where anyone who may create a Service can capture traffic to any
address): an external IP is claimed only when it is one host that is nobody else's. Never a
node's address (a pod scraping kubelet's :10250 would send its token to the Service), a pod
range, a ClusterIP or DNS endpoint we know, the API server, or a loopback, link-local,
multicast, unspecified or reserved address; with ``--external-cidr``, only inside those ranges.
Two Services claiming one address: a load-balancer ingress IP (assigned by the cloud or the
cluster's LB controller) beats a ``spec.externalIPs`` entry (written by anyone with Service
rights), then the older Service wins (creationTimestamp, then UID, then name): the same facts
give the same winner on every node. Every refused claim is a `Skipped` of its Service, which
keeps its other addresses. ``ipMode: Proxy`` ingress never gets here (`dnsguard.kube.extract`).

Refused in iptables and nftables modes: kube-proxy already short-circuits in-cluster traffic to
external IPs there, and our DNAT would make kube-proxy's own ClusterIP DNAT never run.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from ipaddress import ip_network

from dnsguard.model import (
    DNS_PORT,
    Chain,
    ExternalService,
    Family,
    Hook,
    IPAddress,
    IPNetwork,
    Match,
    NodeFacts,
    Rule,
    Table,
    Verdict,
)
from dnsguard.plan.checks import UnsafeValue, check_addr, check_port, short_label

__all__ = ["MASQ_MARK", "SHARD_PREFIX", "SKIP_REASONS", "Skipped", "checked_services",
           "claimed_services", "external_chains", "refuse_reason", "shard_chain", "shard_of",
           "sub_chain"]

#: kube-proxy's --iptables-masquerade-bit default (14): KUBE-POSTROUTING masquerades it
MASQ_MARK = 0x4000


#: dispatch shard sizes: a /24 (or /120) of external IPs shares one chain per hook
SHARD_PREFIX = {Family.V4: 24, Family.V6: 120}


def _hashed(kind: str, key: str) -> str:
    """``KIND-`` and 12 base32 characters: within iptables' 28-character chain names."""
    digest = hashlib.sha256(key.encode()).digest()
    return f"{kind}-" + base64.b32encode(digest).decode()[:12]


def sub_chain(key: str, family: Family) -> str:
    return _hashed("EXT", f"{key}/ipv{family.value}")


def shard_of(ip: IPAddress) -> IPNetwork:
    return ip_network(ip).supernet(new_prefix=SHARD_PREFIX[Family.of(ip)])


def shard_chain(hook: Hook, shard: IPNetwork) -> str:
    """The dispatch chain of one shard: ``XPRE-`` (pods) or ``XOUT-`` (the node) and a hash."""
    return _hashed("XPRE" if hook is Hook.PREROUTING else "XOUT", str(shard))


#: why a Service (or one of its external IPs) is left out; the metric's label values
SKIP_REASONS = ("invalid", "reserved_ip", "outside_external_cidr", "duplicate_ip")


@dataclass(frozen=True)
class Skipped:
    """A Service, or one external IP of it, left out of the plan: who, why (a `SKIP_REASONS`
    label) and a line for the log."""

    key: str
    reason: str
    detail: str


def _invalid(svc: ExternalService) -> str | None:
    """Why ``svc`` cannot be rendered safely, or None."""
    try:
        for ip in (*svc.cluster_ips, *svc.external_ips):
            check_addr(ip)
        for sp in svc.ports:
            check_port(sp.port)
    except UnsafeValue as exc:
        return str(exc)
    return None


def checked_services(services: Iterable[ExternalService],
                     ) -> tuple[tuple[ExternalService, ...], tuple[Skipped, ...]]:
    """The Services whose every value renders safely, and the others as `Skipped`."""
    kept: list[ExternalService] = []
    skipped: list[Skipped] = []
    for svc in services:
        if (why := _invalid(svc)) is not None:
            skipped.append(Skipped(short_label(svc.key), "invalid", why))
        else:
            kept.append(svc)
    return tuple(kept), tuple(skipped)


def _age(svc: ExternalService) -> tuple[bool, str, str, str]:
    """Sort key, oldest first: undated Services after every dated one."""
    return (not svc.created, svc.created, svc.uid, svc.key)


def _reserved(ip: IPAddress, facts: NodeFacts, taken: set[IPAddress]) -> str | None:
    """Why ``ip`` is nobody's to claim, or None."""
    kind = ("unspecified" if ip.is_unspecified else "loopback" if ip.is_loopback
            else "link-local" if ip.is_link_local else "multicast" if ip.is_multicast
            else "reserved" if ip.is_reserved else None)
    if kind:
        return f"a {kind} address"
    if ip in taken:
        return "a node, API server, DNS or ClusterIP address"
    if any(ip in c for c in facts.pod_cidrs):
        return "in a pod range"
    return None


def claimed_services(facts: NodeFacts, services: Iterable[ExternalService],
                     allowed: tuple[IPNetwork, ...] = ()
                     ) -> tuple[tuple[ExternalService, ...], tuple[Skipped, ...]]:
    """Each Service with only the external IPs it may claim (see the module docstring), and
    every refused claim as a `Skipped`."""
    by_age = sorted(services, key=_age)
    taken: set[IPAddress] = {*facts.node_ips, *facts.api_server_ips, *facts.dns_ips,
                             *facts.dns_endpoints}
    taken.update(ip for s in by_age for ip in s.cluster_ips)
    owner: dict[IPAddress, str] = {}
    skipped: list[Skipped] = []
    # load-balancer ingress IPs claim first, in age order; then spec.externalIPs
    for from_lb in (True, False):
        for svc in by_age:
            lb = set(svc.lb_ips)
            for ip in svc.external_ips:
                if (ip in lb) is not from_lb or owner.get(ip) == svc.key:
                    continue
                what = f"external IP {ip}"
                if (why := _reserved(ip, facts, taken)) is not None:
                    skipped.append(Skipped(short_label(svc.key), "reserved_ip", f"{what}: {why}"))
                elif allowed and not any(ip in c for c in allowed):
                    skipped.append(Skipped(short_label(svc.key), "outside_external_cidr",
                                           f"{what}: outside --external-cidr"))
                elif ip in owner:
                    skipped.append(Skipped(short_label(svc.key), "duplicate_ip",
                                           f"{what}: claimed by {short_label(owner[ip])} first "
                                           "(load-balancer status, then the older Service)"))
                else:
                    owner[ip] = svc.key
    kept = []
    for svc in by_age:
        mine = tuple(ip for ip in svc.external_ips if owner.get(ip) == svc.key)
        if mine:
            kept.append(svc if mine == svc.external_ips else replace(svc, external_ips=mine))
    return tuple(kept), tuple(skipped)


def refuse_reason(facts: NodeFacts) -> str | None:
    if facts.proxy_mode.nats_with_conntrack:
        return (f"refusing --external-to-cluster in kube-proxy {facts.proxy_mode.value} mode: "
                "kube-proxy already sends in-cluster traffic to external IPs to the Service, and "
                "a DNAT to the ClusterIP ahead of it would skip kube-proxy's own DNAT")
    return None


def external_chains(facts: NodeFacts, family: Family, *,
                    untracked_dns: bool = False,
                    services: Iterable[ExternalService] | None = None) -> list[Chain]:
    """nat chains for ``family``: dispatch in PREROUTING and OUTPUT, one chain per Service.

    ``untracked_dns``: DNS replies to pods are NOTRACKed (``--mitigation notrack``).
    ``services``: the Services to plan, already checked (default: ``facts``' Services that
    pass `checked_services`).
    """
    if services is None:
        services = checked_services(facts.external_services)[0]
    pre: dict[IPNetwork, list[Rule]] = {}
    out: dict[IPNetwork, list[Rule]] = {}
    subs: list[Chain] = []
    cidrs = [c for c in facts.pod_cidrs if Family.of(c) is family]
    for svc in sorted(services, key=lambda s: s.key):
        cip = next((ip for ip in svc.cluster_ips if Family.of(ip) is family), None)
        ext = sorted({ip for ip in svc.external_ips if Family.of(ip) is family}, key=int)
        ports = svc.ports
        if untracked_dns and (not facts.dns_endpoints or cip in facts.dns_ips):
            ports = tuple(sp for sp in ports if sp.port != DNS_PORT)
        if cip is None or not ext or not ports:
            continue
        sub = sub_chain(svc.key, family)
        label = short_label(svc.key)
        ext_shards = [(ip, shard_of(ip)) for ip in ext]
        rules = [Rule(Match(), Verdict.MARK, f"dnsguard: {label} mark for masquerade",
                      mark=MASQ_MARK)]
        for sp in ports:
            p = sp.proto.value
            rules.append(Rule(Match(proto=sp.proto, dport=sp.port), Verdict.DNAT,
                              f"dnsguard: {label} {p}/{sp.port} to ClusterIP", to=(cip, sp.port)))
            for ip, shard in ext_shards:
                dst = ip_network(ip)
                what = f"dnsguard: {label} {p}/{sp.port} external IP {ip}"
                for cidr in cidrs:
                    pre.setdefault(shard, []).append(
                        Rule(Match(proto=sp.proto, src=cidr, dst=dst, dport=sp.port),
                             Verdict.JUMP, f"{what} from pods in {cidr}", jump=sub))
                out.setdefault(shard, []).append(
                    Rule(Match(proto=sp.proto, dst=dst, dport=sp.port, src_local=True),
                         Verdict.JUMP, f"{what} from the node", jump=sub))
        subs.append(Chain(Table.NAT, Hook.PREROUTING, tuple(rules), sub=sub))
    if not subs:
        return []
    chains = [*subs]
    for hook, shards in ((Hook.PREROUTING, pre), (Hook.OUTPUT, out)):
        if not shards:
            continue
        jumps = []
        for net in sorted(shards, key=lambda n: int(n.network_address)):
            name = shard_chain(hook, net)
            chains.append(Chain(Table.NAT, hook, tuple(shards[net]), sub=name))
            jumps.append(Rule(Match(dst=net), Verdict.JUMP,
                              f"dnsguard: external IPs in {net}", jump=name))
        chains.append(Chain(Table.NAT, hook, tuple(jumps)))
    return chains
