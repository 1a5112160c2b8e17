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
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_network

from dnsguard.config import Settings
from dnsguard.model import (
    Chain,
    Family,
    Hook,
    Match,
    Mitigation,
    NodeFacts,
    Proto,
    Rule,
    Ruleset,
    Table,
    Verdict,
)

__all__ = ["DNS_PORT", "Plan", "PlanRefused", "plan"]

DNS_PORT = 53


class PlanRefused(ValueError):
    """The settings would break DNS on this node (or cannot work); one line, says what to do."""


@dataclass(frozen=True)
class Plan:
    """Desired state for every family dnsguard manages; families absent here own nothing."""

    rulesets: tuple[Ruleset, ...]

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
    if settings.mitigation is Mitigation.NOTRACK:
        return _plan_notrack(facts)
    raise PlanRefused(f"--mitigation {settings.mitigation.value} is not available yet")


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
            for cidr in cidrs:
                # Replies to pods only: a reply towards a node address may be a NodePort or
                # LoadBalancer reply that kube-proxy masqueraded and must be un-NATed.
                rules.append(Rule(
                    Match(proto=proto, src=cidr, dst=cidr, sport=DNS_PORT),
                    Verdict.NOTRACK,
                    f"dnsguard: DNS {proto.value} reply from DNS pods in {cidr}",
                ))
        rulesets.append(Ruleset(family, (Chain(Table.RAW, Hook.PREROUTING, tuple(rules)),)))
    return Plan(tuple(rulesets))
