"""Rule sync cost: dnsguard's one-transaction apply against one iptables exec per rule.

The per-rule baseline is what kakao's network-node-manager and node-cache do: for every rule,
``iptables -C`` (is it there?) and then ``iptables -A`` (add it), each a separate process that
takes the xtables lock and reads the table (and, for iptables-legacy, writes the whole table
back). dnsguard reads once (``iptables-save``), diffs, and writes its chains with one
``iptables-restore --noflush`` (`dnsguard.netfilter.Netfilter.apply`).

Both run in the node namespace of a scratch lab (kube-proxy's few rules live in other tables)
with the same ``ip netns exec`` prefix, on a synthetic `dnsguard.plan.Plan` of N NOTRACK rules
in one raw-table chain, for each iptables flavour. Each measurement starts from a node without
any dnsguard rule and is verified (the kernel holds exactly the plan) before it counts.

One exec per rule at 10k rules takes minutes on iptables-legacy, whose every ``-A`` rewrites
the table. It is capped by time: the rules done by then are timed one by one and the rest is
extrapolated from a linear fit of per-rule time against table size (`extrapolate_total`);
the report says so next to every extrapolated figure.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass

from bench.results import extrapolate_total, ratio
from dnsguard.model import Backend, Chain, Family, Hook, Match, Proto, Rule, Ruleset, Table, Verdict
from dnsguard.netfilter import Netfilter
from dnsguard.netfilter.runner import Runner, SubprocessRunner
from dnsguard.plan import Plan
from dnsguard.plan.render import format_iptables_line, iptables_jump, iptables_rule

__all__ = ["SyncCost", "measure", "synthetic_plan"]

log = logging.getLogger("bench.rulesync")

#: Destinations of the synthetic rules: inside the lab's 198.18.0.0/15, clear of its pod,
#: service and name ranges.
RULE_NET = ipaddress.ip_network("198.18.64.0/18")


def synthetic_plan(n: int) -> Plan:
    """N distinct NOTRACK rules in one raw PREROUTING chain, IPv4."""
    if not 0 < n <= RULE_NET.num_addresses:
        raise ValueError(f"1..{RULE_NET.num_addresses} rules")
    rules = tuple(
        Rule(Match(proto=Proto.UDP, dst=ipaddress.ip_network(RULE_NET.network_address + i),
                   dport=53),
             Verdict.NOTRACK, f"dnsguard: bench rule {i}")
        for i in range(n))
    return Plan((Ruleset(Family.V4, (Chain(Table.RAW, Hook.PREROUTING, rules),)),))


@dataclass(frozen=True)
class SyncCost:
    backend: str
    rules: int
    #: dnsguard: read, diff, one restore (seconds)
    dnsguard_apply: float
    #: dnsguard: a sync that finds nothing to do (read and diff only)
    dnsguard_noop: float
    #: one exec per rule: seconds for all ``rules`` (extrapolated if ``per_rule_done < rules``)
    per_rule: float
    per_rule_done: int
    per_rule_measured: float

    @property
    def extrapolated(self) -> bool:
        return self.per_rule_done < self.rules

    @property
    def speedup(self) -> float | None:
        return ratio(self.per_rule, self.dnsguard_apply)

    def to_json(self) -> dict[str, object]:
        return {
            "backend": self.backend, "rules": self.rules,
            "dnsguard_apply_seconds": round(self.dnsguard_apply, 4),
            "dnsguard_noop_sync_seconds": round(self.dnsguard_noop, 4),
            "per_rule_exec_seconds": round(self.per_rule, 3),
            "per_rule_exec_extrapolated": self.extrapolated,
            "per_rule_exec_rules_timed": self.per_rule_done,
            "per_rule_exec_seconds_timed": round(self.per_rule_measured, 3),
            "speedup": None if self.speedup is None else round(self.speedup, 1),
        }


def _ipt(backend: Backend) -> str:
    return f"iptables-{backend.value.split('-', 1)[1]}"


def _per_rule(runner: Runner, backend: Backend, plan: Plan, cap: float) -> list[float]:
    """kakao-style: create the chain and its jump, then ``-C`` + ``-A`` per rule, timed each."""
    tool = _ipt(backend)
    chain = plan.rulesets[0].chains[0]
    base = [tool, "-w", "5", "-t", chain.table.value]
    if not runner.run([*base, "-L", chain.name, "-n"]).ok:
        runner.run([*base, "-N", chain.name])
    jump = iptables_jump(chain)[2:]
    if not runner.run([*base, "-C", chain.hook.value, *jump]).ok:
        runner.run([*base, "-I", chain.hook.value, "1", *jump])
    times: list[float] = []
    deadline = time.monotonic() + cap
    for rule in chain.rules:
        t0 = time.monotonic()
        spec = iptables_rule(chain.name, rule, Family.V4)[2:]
        if not runner.run([*base, "-C", chain.name, *spec]).ok:
            res = runner.run([*base, "-A", chain.name, *spec])
            if not res.ok:
                raise RuntimeError(f"{tool} -A failed: {res.stderr.strip()} "
                                   f"({format_iptables_line(spec)})")
        times.append(time.monotonic() - t0)
        if time.monotonic() > deadline:
            break
    return times


def _clean(nf: Netfilter) -> None:
    nf.apply(Plan(()))
    if nf.drift(Plan(())):
        raise RuntimeError("could not remove the synthetic rules")


def measure(netns: str, backend: Backend, n: int, cap: float) -> SyncCost:
    """Both ways of writing ``n`` rules into ``netns``, from and back to a clean node."""
    runner = SubprocessRunner(("ip", "netns", "exec", netns))
    nf = Netfilter(runner, backend, [Family.V4])
    plan = synthetic_plan(n)
    _clean(nf)
    t0 = time.monotonic()
    nf.apply(plan)
    apply_s = time.monotonic() - t0
    if nf.drift(plan):
        raise RuntimeError(f"{backend.value}: kernel does not hold the {n}-rule plan")
    t0 = time.monotonic()
    noop = nf.drift(plan)
    noop_s = time.monotonic() - t0
    assert not noop
    _clean(nf)
    times = _per_rule(runner, backend, plan, cap)
    if len(times) == n and nf.drift(plan):
        raise RuntimeError(f"{backend.value}: per-rule adds do not match the plan")
    _clean(nf)
    total = extrapolate_total(times, n)
    log.info("%s %d rules: dnsguard %.3fs, per-rule %.1fs%s", backend.value, n, apply_s, total,
             f" (extrapolated from {len(times)})" if len(times) < n else "")
    return SyncCost(backend.value, n, apply_s, noop_s, total, len(times), sum(times))
