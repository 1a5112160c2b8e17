"""Scale of --external-to-cluster: N Services with external IPs, on the real tools, as root.

    .venv/bin/python tests/perf_external.py [--services 10000] [--kakao-sample 500]

Everything runs in a network namespace this script creates (``dgperf-<hex>``) and deletes,
with addresses from 198.18.0.0/15 only. Per backend it times:

* plan: facts -> Plan (pure);
* full sync: an empty node -> every rule, one restore per table and family (nft: one ``nft -f``);
* partial sync: one Service's external IP changes -> only the chains it touches are rewritten;
* no-op sync: observe + diff when nothing changed;
* kakao-style: one ``iptables -C`` then ``iptables -A`` exec per rule (network-node-manager's
  way) for a sample of rules, extrapolated to the full rule count.

Not a pytest module (no ``test_`` prefix): it takes minutes at 10k Services.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import subprocess
import sys
import time
from dataclasses import replace

from dnsguard.config import Settings
from dnsguard.model import (
    Backend,
    ExternalService,
    Family,
    Mitigation,
    NodeFacts,
    Proto,
    ProxyMode,
    ServicePort,
)
from dnsguard.netfilter import Netfilter, NetfilterError, SubprocessRunner
from dnsguard.plan import Plan, plan
from dnsguard.plan.render import iptables_rule

SETTINGS = Settings(mitigation=Mitigation.NONE, external_to_cluster=True)
POD_CIDR = ipaddress.ip_network("198.18.0.0/24")


def services(n: int) -> tuple[ExternalService, ...]:
    base_c = int(ipaddress.ip_address("198.18.128.0"))
    base_e = int(ipaddress.ip_address("198.19.0.0"))
    return tuple(ExternalService(
        f"ns{i % 50}/svc{i}", (ipaddress.ip_address(base_c + i),),
        (ServicePort(Proto.TCP, 80),), (ipaddress.ip_address(base_e + i),),
    ) for i in range(n))


def facts(svcs: tuple[ExternalService, ...]) -> NodeFacts:
    return NodeFacts(proxy_mode=ProxyMode.IPVS, pod_cidrs=(POD_CIDR,),
                     families=frozenset({Family.V4}), external_services=svcs)


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def in_netns() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--services", type=int, default=10_000)
    args.add_argument("--kakao-sample", type=int, default=500)
    opts = args.parse_args(sys.argv[2:])
    svcs = services(opts.services)
    t_plan, p = timed(lambda: plan(facts(svcs), SETTINGS))
    print(f"{opts.services} Services, {p.rule_count} rules; plan {t_plan:.3f}s")
    changed = list(svcs)
    changed[opts.services // 2] = replace(changed[opts.services // 2],
                                          external_ips=(ipaddress.ip_address("198.19.255.254"),))
    p2 = plan(facts(tuple(changed)), SETTINGS)
    runner = SubprocessRunner()
    for backend in Backend:
        nf = Netfilter(runner, backend, (Family.V4,))
        try:
            t_full, _ = timed(lambda: nf.apply(p))  # noqa: B023
            assert nf.drift(p) == [], backend
            t_noop, written = timed(lambda: nf.apply(p))  # noqa: B023
            assert written == []
            t_part, _ = timed(lambda: nf.apply(p2))  # noqa: B023
            assert nf.drift(p2) == [], backend
            print(f"{backend.value:16} full {t_full:6.2f}s  partial (1 Service) "
                  f"{t_part:6.2f}s  no-op {t_noop:6.2f}s")
        except NetfilterError as exc:
            print(f"{backend.value:16} failed: {exc}")
        finally:
            nf.apply(Plan(()))
    # kakao-style: iptables -C, then -A, per rule, on iptables-legacy
    rules = [(c.name, r) for c in p.for_family(Family.V4).chains for r in c.rules]
    sample = rules[:opts.kakao_sample]
    for name in {n for n, _ in sample}:
        subprocess.run(["iptables-legacy", "-t", "nat", "-N", name], check=True)
    start = time.perf_counter()
    for name, rule in sample:
        spec = list(iptables_rule(name, rule, Family.V4))[2:]
        subprocess.run(["iptables-legacy", "-t", "nat", "-C", name, *spec],
                       check=False, capture_output=True)
        subprocess.run(["iptables-legacy", "-t", "nat", "-A", name, *spec], check=True)
    per_rule = (time.perf_counter() - start) / len(sample)
    print(f"kakao-style (iptables-legacy, -C and -A per rule): {per_rule * 1000:.1f} ms/rule "
          f"over {len(sample)} rules -> {per_rule * len(rules):.0f}s for {len(rules)} rules "
          "(grows with the table: each exec reads and writes the whole table)")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--in-netns":
        in_netns()
        return 0
    ns = f"dgperf-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__,
                               "--in-netns", *sys.argv[1:]], check=False, env=os.environ).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
