"""Rendered rules the kernel tools accept, for names the API allows (issue 13, finding 1)."""

from __future__ import annotations

import ipaddress

import pytest
from render_check import kernel_rejections, scratch_netns, unavailable

from dnsguard.config import Settings
from dnsguard.model import (
    ExternalService,
    Family,
    Mitigation,
    NodeFacts,
    Proto,
    ProxyMode,
    ServicePort,
)
from dnsguard.plan import plan

pytestmark = pytest.mark.root
ip = ipaddress.ip_address


def test_a_long_service_name_does_not_break_the_nft_table() -> None:
    """Before the fix nft refused the whole table: "comment too long, 128 characters"."""
    svc = ExternalService("observability/kube-prometheus-stack-alertmanager-external-lb",
                          (ip("198.18.1.20"), ip("fd00:198:18:1::14")),
                          (ServicePort(Proto.TCP, 9093),),
                          (ip("198.19.5.1"), ip("fd00:198:18:5:ffff:ffff:ffff:ffff")))
    facts = NodeFacts(ProxyMode.IPVS, pod_cidrs=(ipaddress.ip_network("198.18.0.0/24"),
                                                 ipaddress.ip_network("fd00:198:18:ffff::/64")),
                      families=frozenset({Family.V4, Family.V6}), external_services=(svc,))
    p = plan(facts, Settings(mitigation=Mitigation.NONE, external_to_cluster=True))
    assert p.rule_count > 0
    if reason := unavailable():
        pytest.skip(reason)
    with scratch_netns() as ns:
        assert kernel_rejections(ns, p) == {}
