"""--drop-invalid-input: alone (--mitigation none) or with a DNS mitigation; golden text."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from dnsguard.cli import build_parser, render_plan
from dnsguard.config import ConfigError, Settings, settings_from
from dnsguard.model import (
    Backend,
    CtState,
    Family,
    Hook,
    Mitigation,
    NodeFacts,
    Proto,
    ProxyMode,
    Table,
    Verdict,
)
from dnsguard.plan import PlanRefused, plan

GOLDEN = Path(__file__).parent / "golden"
CIP = ipaddress.ip_address("198.18.1.10")
CIDR4 = ipaddress.ip_network("198.18.0.0/24")
EP = ipaddress.ip_address("198.18.0.101")
DUAL = frozenset({Family.V4, Family.V6})


def only_drop(**kw: object) -> Settings:
    return Settings(mitigation=Mitigation.NONE, drop_invalid_input=True, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", list(Backend))
def test_alone_matches_golden(backend: Backend) -> None:
    p = plan(NodeFacts(proxy_mode=ProxyMode.IPTABLES, families=DUAL), only_drop())
    text = render_plan(p, backend)
    assert text == (GOLDEN / f"drop-invalid-dual-{backend.value}.txt").read_text()


@pytest.mark.parametrize("backend", list(Backend))
def test_with_nodelocal_matches_golden(backend: Backend) -> None:
    f = NodeFacts(proxy_mode=ProxyMode.IPTABLES, dns_ips=(CIP,), families=frozenset({Family.V4}))
    s = Settings(mitigation=Mitigation.NODELOCAL, upstreams=((EP, 53),), drop_invalid_input=True)
    text = render_plan(plan(f, s), backend)
    assert text == (GOLDEN / f"drop-invalid-nodelocal-{backend.value}.txt").read_text()


def test_the_drop_is_last_in_dnsguard_input_after_the_cache_accepts() -> None:
    f = NodeFacts(proxy_mode=ProxyMode.IPTABLES, dns_ips=(CIP,), families=frozenset({Family.V4}))
    s = Settings(mitigation=Mitigation.NODELOCAL, upstreams=((EP, 53),), drop_invalid_input=True)
    chains = [c for c in plan(f, s).for_family(Family.V4).chains
              if (c.table, c.hook) == (Table.FILTER, Hook.INPUT)]
    assert len(chains) == 1  # shared with the accepts, not a second chain of the same name
    verdicts = [r.verdict for r in chains[0].rules]
    assert verdicts[-1] is Verdict.DROP and set(verdicts[:-1]) == {Verdict.ACCEPT}
    drop = chains[0].rules[-1].match
    # TCP only: ICMP errors for untracked flows (PMTU) are INVALID too and must pass
    assert drop.ctstate is CtState.INVALID and drop.proto is Proto.TCP
    assert drop.src is None and drop.dst is None


def test_with_notrack_in_ipvs_mode_adds_a_filter_chain() -> None:
    f = NodeFacts(proxy_mode=ProxyMode.IPVS, dns_ips=(CIP,), pod_cidrs=(CIDR4,), families=DUAL)
    p = plan(f, Settings(drop_invalid_input=True))
    v4 = [(c.table, c.hook) for c in p.for_family(Family.V4).chains]
    assert v4 == [(Table.RAW, Hook.PREROUTING), (Table.FILTER, Hook.INPUT)]
    # the node has IPv6, so the drop covers it even with no IPv6 DNS address
    assert [(c.table, c.hook) for c in p.for_family(Family.V6).chains] == [
        (Table.FILTER, Hook.INPUT)]


@pytest.mark.parametrize("mode", [ProxyMode.IPTABLES, ProxyMode.NFTABLES])
def test_notrack_is_still_refused_where_kube_proxy_dnats(mode: ProxyMode) -> None:
    f = NodeFacts(proxy_mode=mode, dns_ips=(CIP,), pod_cidrs=(CIDR4,), families=DUAL)
    with pytest.raises(PlanRefused, match="untracked packets are never NATed"):
        plan(f, Settings(drop_invalid_input=True))


def test_mitigation_none_alone_is_refused() -> None:
    with pytest.raises(PlanRefused, match="nothing to do"):
        plan(NodeFacts(proxy_mode=ProxyMode.IPTABLES), Settings(mitigation=Mitigation.NONE))


def test_only_the_node_families_get_the_drop() -> None:
    p = plan(NodeFacts(proxy_mode=ProxyMode.NFTABLES), only_drop())
    assert [rs.family for rs in p.rulesets] == [Family.V4]
    assert p.rule_count == 1


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    return settings_from(build_parser().parse_args(["plan", *argv]), env)


def test_flag_and_env() -> None:
    assert parse([], {}).drop_invalid_input is False
    assert parse(["--drop-invalid-input"], {}).drop_invalid_input is True
    assert parse([], {"DNSGUARD_DROP_INVALID_INPUT": "yes"}).drop_invalid_input is True
    assert parse([], {"DNSGUARD_DROP_INVALID_INPUT": "0"}).drop_invalid_input is False
    s = parse(["--mitigation", "none"], {"DNSGUARD_DROP_INVALID_INPUT": "true"})
    assert s.mitigation is Mitigation.NONE and s.drop_invalid_input is True
    with pytest.raises(ConfigError, match="invalid DNSGUARD_DROP_INVALID_INPUT 'maybe'"):
        parse([], {"DNSGUARD_DROP_INVALID_INPUT": "maybe"})

