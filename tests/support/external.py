"""Plans with many --external-to-cluster Services, and the chain names they produce.

Shared by the nft partial-sync tests, unit and kernel (formerly in test_nft_partial.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from dnsguard.config import Settings
from dnsguard.model import (
    ExternalService,
    Family,
    Hook,
    Mitigation,
    NodeFacts,
    Proto,
    ProxyMode,
    ServicePort,
)
from dnsguard.plan import Plan, plan
from dnsguard.plan.external import shard_chain, shard_of, sub_chain

ip = ipaddress.ip_address
CIDRS = (ipaddress.ip_network("198.18.0.0/24"), ipaddress.ip_network("fd00:198:18::/64"))
ONLY_EXT = Settings(mitigation=Mitigation.NONE, external_to_cluster=True)
NODELOCAL_EXT = Settings(mitigation=Mitigation.NODELOCAL, external_to_cluster=True,
                         local_ips=(ip("198.18.255.10"),), upstreams=((ip("198.18.0.101"), 53),))


def svc(i: int, *, port: int = 80, ext: str | None = None) -> ExternalService:
    return ExternalService(
        f"ns{i % 7}/svc{i}", (ip(f"198.18.{128 + i // 256}.{i % 256}"), ip(f"fd00:198:18:1::{i:x}")),
        (ServicePort(Proto.TCP, port),),
        (ip(ext or f"198.19.{i // 256}.{i % 256}"), ip(f"fd00:198:18:2::{i:x}")))


def make_plan(svcs: Sequence[ExternalService], settings: Settings = ONLY_EXT) -> Plan:
    return plan(NodeFacts(proxy_mode=ProxyMode.IPVS, pod_cidrs=CIDRS,
                          families=frozenset({Family.V4, Family.V6}),
                          dns_ips=(ip("198.18.1.10"),), external_services=tuple(svcs)), settings)


def chains_of(s: ExternalService) -> set[str]:
    return {sub_chain(s.key, f).lower() for f in Family}


def shards_of(s: ExternalService) -> set[str]:
    """The dispatch shard chains that hold ``s``'s external IPs (pods' and the node's)."""
    return {shard_chain(h, shard_of(a)).lower() for h in (Hook.PREROUTING, Hook.OUTPUT)
            for a in s.external_ips}
