"""The planner: a pure function from node facts and settings to the rules dnsguard must own.

No I/O happens here and nothing here imports `dnsguard.netfilter`, `dnsguard.node` or
`dnsguard.kube`. Refusals are part of the plan's contract: a plan that would break DNS raises
`PlanRefused` before anything touches the kernel, so a refused run changes nothing.

Why NOTRACK is mode-dependent: untracked packets skip every conntrack-based NAT. kube-proxy's
iptables and nftables modes implement a ClusterIP as a conntrack DNAT, so NOTRACK of traffic to
the DNS ClusterIP makes it go nowhere (the bug that made kakao's network-node-manager drop the
feature). IPVS keeps its own connection table and balances untracked packets, so in ipvs mode the
requests to the ClusterIP and the DNS pods' replies can both skip conntrack; both directions are
needed, or the backends' replies still create one entry per query.

Features other than the DNS mitigation (``--drop-invalid-input``) are folded into the same
per-family rulesets afterwards, so every table and family still gets one restore; with
``--mitigation none`` they are all dnsguard owns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import ip_network

from dnsguard.config import Settings
from dnsguard.model import (
    BYPASS_MARK,
    DNS_PORT,
    PROBE_MARK,
    Chain,
    CtState,
    ExternalService,
    Family,
    Hook,
    IPAddress,
    IPNetwork,
    Match,
    Mitigation,
    NodeFacts,
    Proto,
    Rule,
    Ruleset,
    Table,
    Verdict,
)
from dnsguard.plan import external
from dnsguard.plan.cache import CacheSpec

__all__ = ["DNS_PORT", "Plan", "PlanRefused", "plan"]



class PlanRefused(ValueError):
    """The settings would break DNS on this node (or cannot work); one line, says what to do."""


@dataclass(frozen=True)
class Plan:
    """Desired state for every family dnsguard manages; families absent here own nothing."""

    rulesets: tuple[Ruleset, ...]
    #: the node-local cache to run, for --mitigation nodelocal
    cache: CacheSpec | None = None
    #: Services (or external IPs) of the facts left out of the plan, and why
    skipped: tuple[external.Skipped, ...] = ()

    def for_family(self, family: Family) -> Ruleset:
        for rs in self.rulesets:
            if rs.family is family:
                return rs
        return Ruleset(family=family)

    @property
    def rule_count(self) -> int:
        return sum(len(c.rules) for rs in self.rulesets for c in rs.chains)


def plan(facts: NodeFacts, settings: Settings) -> Plan:
    """Compute the rules for ``settings.mitigation`` on a node described by ``facts``."""
    if settings.external_to_cluster and (why := external.refuse_reason(facts)):
        raise PlanRefused(why)
    if settings.mitigation is Mitigation.NOTRACK:
        p = _plan_notrack(facts)
    elif settings.mitigation is Mitigation.NODELOCAL:
        p = _plan_nodelocal(facts, settings)
    elif not (settings.drop_invalid_input or settings.external_to_cluster):
        raise PlanRefused("--mitigation none with no other feature enabled leaves dnsguard "
                          "nothing to do: add --drop-invalid-input or --external-to-cluster, "
                          "or pick a mitigation")
    else:
        p = Plan(())
    services: tuple[ExternalService, ...] = ()
    if settings.external_to_cluster:
        services, invalid = external.checked_services(facts.external_services)
        services, refused = external.claimed_services(facts, services, settings.external_cidrs)
        p = replace(p, skipped=(*invalid, *refused))
    for family in (Family.V4, Family.V6):
        if family not in facts.families:
            continue
        if settings.external_to_cluster:
            untracked = settings.mitigation is Mitigation.NOTRACK
            p = _merge(p, family, external.external_chains(
                facts, family, untracked_dns=untracked, services=services))
        if settings.drop_invalid_input:
            p = _merge(p, family, [Chain(Table.FILTER, Hook.INPUT, (_DROP_INVALID,))])
    return p


#: Last in ``DNSGUARD-INPUT``: the node-local cache's accepts come first. TCP only, by design:
#: the fix is for out-of-window segments that conntrack marks INVALID and the host would answer
#: with a RST, resetting a healthy connection. ICMP errors matching no tracked flow are INVALID
#: too, among them the Packet Too Big / Fragmentation Needed for flows dnsguard itself untracks
#: (NOTRACKed DNS over TCP): dropping those would black-hole path MTU discovery. Untracked
#: packets are in state UNTRACKED, not INVALID, so no NOTRACK rule is undone by this one.
_DROP_INVALID = Rule(Match(proto=Proto.TCP, ctstate=CtState.INVALID), Verdict.DROP,
                     "dnsguard: drop TCP that conntrack finds INVALID (out of window) instead "
                     "of answering it with a RST")


def _merge(p: Plan, family: Family, extra: list[Chain]) -> Plan:
    """Append ``extra``'s rules to the same chains of ``family``, adding chains not there yet."""
    if not extra:
        return p
    chains = {(c.table, c.name): c for c in p.for_family(family).chains}
    for add in extra:  # a dict, not a scan: 10k Services bring 10k chains
        key = (add.table, add.name)
        have = chains.get(key)
        chains[key] = add if have is None else replace(have, rules=(*have.rules, *add.rules))
    rulesets = {rs.family: rs for rs in p.rulesets}
    rulesets[family] = Ruleset(family, tuple(chains.values()))
    return replace(p, rulesets=tuple(rulesets[f] for f in sorted(rulesets, key=lambda f: f.value)))


def _plan_notrack(facts: NodeFacts) -> Plan:
    if not facts.dns_ips:
        raise PlanRefused("--mitigation notrack needs --dns-ip (the cluster DNS Service ClusterIP)")
    if facts.proxy_mode.nats_with_conntrack:
        listed = ", ".join(str(ip) for ip in facts.dns_ips)
        raise PlanRefused(
            f"refusing --mitigation notrack for DNS ClusterIP {listed} in kube-proxy "
            f"{facts.proxy_mode.value} mode: kube-proxy DNATs it with conntrack and untracked "
            "packets are never NATed, so pods' DNS would break; use --mitigation nodelocal instead"
        )
    rulesets = []
    for family in (Family.V4, Family.V6):
        ips = [ip for ip in facts.dns_ips if Family.of(ip) is family]
        if not ips:
            continue
        cidrs = [c for c in facts.pod_cidrs if Family.of(c) is family]
        if not cidrs:
            raise PlanRefused(
                f"--mitigation notrack in ipvs mode needs an IPv{family.value} --pod-cidr for "
                f"DNS ClusterIP {ips[0]}: without it the DNS pods' replies stay tracked and "
                "still create one conntrack entry per query"
            )
        rules: list[Rule] = []
        for proto in (Proto.UDP, Proto.TCP):
            for ip in ips:
                rules.append(Rule(
                    Match(proto=proto, dst=ip_network(ip), dport=DNS_PORT),
                    Verdict.NOTRACK,
                    f"dnsguard: DNS {proto.value} request to cluster DNS {ip}",
                ))
            for src, dst in _reply_pairs(facts, family, cidrs):
                # Replies to pods only: a reply towards a node address may be a NodePort or
                # LoadBalancer reply that kube-proxy masqueraded and must be un-NATed.
                what = f"DNS pod {src.network_address}" if src.prefixlen == src.max_prefixlen \
                    else f"DNS pods in {src}"
                rules.append(Rule(
                    Match(proto=proto, src=src, dst=dst, sport=DNS_PORT),
                    Verdict.NOTRACK,
                    f"dnsguard: DNS {proto.value} reply from {what} to pods in {dst}",
                ))
        rulesets.append(Ruleset(family, (Chain(Table.RAW, Hook.PREROUTING, tuple(rules)),)))
    return Plan(tuple(rulesets))


def _reply_pairs(facts: NodeFacts, family: Family,
                 cidrs: list[IPNetwork]) -> list[tuple[IPNetwork, IPNetwork]]:
    """(source, destination) of the DNS replies to untrack.

    With the DNS endpoints known (Kubernetes API), only replies from those pods count, wherever
    they run; otherwise any pod in the pod ranges is taken to be a DNS pod.
    """
    eps = [ip_network(ip) for ip in facts.dns_endpoints if Family.of(ip) is family]
    return [(src, dst) for src in (eps or cidrs) for dst in cidrs]


def _plan_nodelocal(facts: NodeFacts, settings: Settings) -> Plan:
    """Serve DNS from a cache on this node and steer pods to it without conntrack.

    Intercepted addresses: the ``--local-ip`` addresses always, and in iptables/nftables modes the
    DNS ClusterIPs too (bound locally, so pods keep their resolv.conf). Every NOTRACK that steers
    a query to the cache is gated by the dead man's switch: when the agent stops refreshing it,
    the rules stop matching, queries are tracked again and take kube-proxy's path. In ipvs mode
    clients of the link-local address get a DNAT to the ClusterIP that only tracked (fallen
    back) packets ever see, because untracked packets skip the nat table.
    """
    for ip in settings.local_ips:
        if Family.of(ip) not in facts.families:
            raise PlanRefused(f"invalid --local-ip {ip}: IPv6 is disabled on this node")
    intercepted: list[IPAddress] = list(settings.local_ips)
    if facts.proxy_mode.nats_with_conntrack:
        intercepted += [ip for ip in facts.dns_ips if ip not in intercepted]
    upstreams = settings.upstreams
    if not upstreams:
        if facts.proxy_mode.nats_with_conntrack or not facts.dns_ips:
            raise PlanRefused(
                "--mitigation nodelocal needs --upstream (the cluster DNS endpoints, or an "
                "upstream Service IP): in kube-proxy "
                f"{facts.proxy_mode.value} mode the DNS ClusterIP is served by the cache itself")
        upstreams = tuple((ip, DNS_PORT) for ip in facts.dns_ips)
    for ip, port in upstreams:
        if ip in intercepted and port == DNS_PORT:
            raise PlanRefused(
                f"invalid --upstream {ip}: dnsguard intercepts it on this node, so the cache "
                "would query itself; use the DNS endpoints or an upstream Service IP")
    external = _external_upstreams(facts, settings, intercepted)
    _check_forward_zones(facts, settings, intercepted)

    rulesets = []
    for family in (Family.V4, Family.V6):
        addrs = [ip for ip in intercepted if Family.of(ip) is family]
        if not addrs:
            continue
        raw_pre: list[Rule] = []
        raw_out: list[Rule] = []
        f_in: list[Rule] = []
        f_out: list[Rule] = []
        nat: list[Rule] = []
        fallback = [ip for ip in facts.dns_ips if Family.of(ip) is family]
        # first in raw OUTPUT, never gated by the switch: the agent's own probes (its sockets
        # set the mark). Its query to a ClusterIP with BYPASS_MARK takes kube-proxy's path, to
        # tell a dead cluster DNS from a broken cache path; its health query to each address
        # with PROBE_MARK reaches the cache even while interception is off, so the cache can
        # prove itself healthy before interception starts.
        for ip in addrs:
            if ip in facts.dns_ips:
                raw_out.append(Rule(
                    Match(proto=Proto.UDP, dst=ip_network(ip), dport=DNS_PORT, mark=BYPASS_MARK),
                    Verdict.RETURN, f"dnsguard: agent probe of {ip} takes the kube-proxy path"))
        for ip in addrs:
            raw_out.append(Rule(
                Match(proto=Proto.UDP, dst=ip_network(ip), dport=DNS_PORT, mark=PROBE_MARK),
                Verdict.NOTRACK, f"dnsguard: agent health query to the node-local cache on {ip}"))
        for proto in (Proto.UDP, Proto.TCP):
            p = proto.value
            for ip in addrs:
                host = ip_network(ip)
                to_cache = Match(proto=proto, dst=host, dport=DNS_PORT, alive=True)
                raw_pre.append(Rule(to_cache, Verdict.NOTRACK,
                                    f"dnsguard: {p} DNS to {ip} goes to the node-local cache"))
                raw_out.append(Rule(to_cache, Verdict.NOTRACK,
                                    f"dnsguard: host {p} DNS to {ip} goes to the node-local cache"))
                raw_out.append(Rule(Match(proto=proto, src=host, sport=DNS_PORT), Verdict.NOTRACK,
                                    f"dnsguard: {p} replies of the node-local cache on {ip}"))
                f_in.append(Rule(Match(proto=proto, dst=host, dport=DNS_PORT), Verdict.ACCEPT,
                                 f"dnsguard: accept {p} DNS to the node-local cache on {ip}"))
                f_out.append(Rule(Match(proto=proto, src=host, sport=DNS_PORT), Verdict.ACCEPT,
                                  f"dnsguard: accept {p} replies of the node-local cache on {ip}"))
                if not facts.proxy_mode.nats_with_conntrack and fallback:
                    nat.append(Rule(Match(proto=proto, dst=host, dport=DNS_PORT), Verdict.DNAT,
                                    f"dnsguard: {p} DNS to {ip} falls back to cluster DNS "
                                    f"{fallback[0]} while the cache is down",
                                    to=(fallback[0], DNS_PORT)))
        chains = [
            Chain(Table.RAW, Hook.PREROUTING, tuple(raw_pre)),
            Chain(Table.RAW, Hook.OUTPUT, tuple(raw_out)),
            Chain(Table.FILTER, Hook.INPUT, tuple(f_in)),
            Chain(Table.FILTER, Hook.OUTPUT, tuple(f_out)),
        ]
        if nat:
            chains += [Chain(Table.NAT, Hook.PREROUTING, tuple(nat)),
                       Chain(Table.NAT, Hook.OUTPUT, tuple(nat))]
        rulesets.append(Ruleset(family, tuple(chains)))

    spec = CacheSpec(
        listen=tuple(intercepted),
        health_port=settings.health_port,
        cluster_domain=settings.cluster_domain,
        cluster_upstreams=tuple(upstreams),
        external_upstreams=external,
        ipv6=Family.V6 in facts.families,
        forward_zones=settings.forward_zones,
        cache_size=settings.cache_size,
        cache_max_ttl=int(settings.cache_max_ttl),
        cache_negative_ttl=int(settings.cache_negative_ttl),
        serve_stale=int(settings.serve_stale),
        pod_cidrs=facts.pod_cidrs,
        client_qps=settings.cache_client_qps,
        cluster_ips=tuple(ip for ip in facts.dns_ips if Family.of(ip) in facts.families),
    )
    return Plan(tuple(rulesets), cache=spec)


def _external_upstreams(facts: NodeFacts, settings: Settings,
                        intercepted: list[IPAddress]) -> tuple[tuple[IPAddress, int], ...]:
    """Where names outside the cluster domain go: () for the cluster upstreams (the default).

    With ``--external-via node``, the node's resolv.conf nameservers, less those dnsguard
    intercepts (the cache would ask itself) and those of a family the node does not carry:
    skipped without a word, as before, because resolv.conf is the node's file, not a flag the
    operator typed. If that leaves none, the plan is refused rather than quietly sending the
    names to the cluster DNS after all.
    """
    if settings.external_via != "node":
        return ()
    usable = tuple((ip, DNS_PORT) for ip in facts.node_nameservers
                   if ip not in intercepted and Family.of(ip) in facts.families)
    if not usable:
        listed = ", ".join(str(ip) for ip in facts.node_nameservers) or "none"
        raise PlanRefused(
            f"--external-via node: no usable nameserver in {settings.node_resolv_conf} "
            f"(found: {listed}; those dnsguard intercepts would loop to the cache itself)")
    return usable


#: Zones the cache must keep answering itself or sending to the cluster DNS: a --forward-zone
#: here would take the cluster's own names (or the health check) away from them.
_RESERVED_ZONES = ("in-addr.arpa", "ip6.arpa", "dnsguard.invalid")


def _check_forward_zones(facts: NodeFacts, settings: Settings,
                         intercepted: list[IPAddress]) -> None:
    """Refuse a --forward-zone that would loop into the cache or steal the cluster's names.

    Unlike resolv.conf, these addresses were typed by the operator: one that dnsguard intercepts
    on port 53 (or the cache's own health port) is a mistake to report, not to skip.
    """
    cluster = settings.cluster_domain
    for zone in settings.forward_zones:
        if zone.name == cluster or zone.name.endswith("." + cluster) \
                or zone.name in _RESERVED_ZONES or zone.name.endswith(".dnsguard.invalid"):
            raise PlanRefused(
                f"invalid --forward-zone {zone.name}: the cache answers it itself or from the "
                f"cluster DNS ({cluster}, in-addr.arpa, ip6.arpa); forward a zone outside it")
        for ip, port in zone.addrs:
            if Family.of(ip) not in facts.families:
                raise PlanRefused(f"invalid --forward-zone {zone.name}: server {ip} is IPv6, "
                                  "which is disabled on this node")
            if (ip in intercepted and port == DNS_PORT) or (
                    ip.is_loopback and port == settings.health_port):
                raise PlanRefused(
                    f"invalid --forward-zone {zone.name}: dnsguard intercepts {ip} port {port} "
                    "on this node, so the cache would query itself")
