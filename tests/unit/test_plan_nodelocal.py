"""Node-local mode planning: interception per kube-proxy mode, loops refused, unbound config."""

from __future__ import annotations

import ipaddress
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dnsguard.cli import build_parser, main, render_plan
from dnsguard.config import ForwardZone, Settings, settings_from
from dnsguard.model import (
    BYPASS_MARK,
    PROBE_MARK,
    Backend,
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
from dnsguard.plan.cache import render_unbound
from dnsguard.testing.fakes import FakeRunner

GOLDEN = Path(__file__).parent / "golden"
CIP = ipaddress.ip_address("198.18.1.10")
LOCAL = ipaddress.ip_address("169.254.20.10")
EP1, EP2 = ipaddress.ip_address("198.18.0.101"), ipaddress.ip_address("198.18.0.102")


def nl(mode: ProxyMode, upstreams=((EP1, 53), (EP2, 53)), **kw) -> Settings:
    return Settings(mitigation=Mitigation.NODELOCAL, upstreams=tuple(upstreams), **kw)


def facts(mode: ProxyMode, **kw) -> NodeFacts:
    return NodeFacts(proxy_mode=mode, dns_ips=(CIP,), families=frozenset({Family.V4}), **kw)


@pytest.mark.parametrize("mode", list(ProxyMode))
@pytest.mark.parametrize("backend", list(Backend))
def test_nodelocal_plan_matches_golden(mode: ProxyMode, backend: Backend) -> None:
    text = render_plan(plan(facts(mode), nl(mode)), backend)
    assert text == (GOLDEN / f"nodelocal-{mode.value}-{backend.value}.txt").read_text()


@pytest.mark.parametrize("mode", [ProxyMode.IPTABLES, ProxyMode.NFTABLES])
def test_clusterip_is_served_locally_where_kube_proxy_dnats(mode: ProxyMode) -> None:
    p = plan(facts(mode), nl(mode))
    assert p.cache is not None and p.cache.listen == (LOCAL, CIP)
    chains = {(c.table, c.hook) for c in p.for_family(Family.V4).chains}
    assert (Table.NAT, Hook.PREROUTING) not in chains  # fallback is kube-proxy's own DNAT


def test_ipvs_mode_serves_link_local_only_and_falls_back_by_dnat() -> None:
    p = plan(facts(ProxyMode.IPVS), nl(ProxyMode.IPVS, upstreams=()))
    assert p.cache is not None and p.cache.listen == (LOCAL,)
    assert p.cache.cluster_upstreams == ((CIP, 53),)  # the ClusterIP, through IPVS
    nat = [c for c in p.for_family(Family.V4).chains if c.table is Table.NAT]
    assert {c.hook for c in nat} == {Hook.PREROUTING, Hook.OUTPUT}
    assert all(r.verdict is Verdict.DNAT and r.to == (CIP, 53) for c in nat for r in c.rules)


def test_every_intercepting_notrack_is_gated_by_the_dead_mans_switch() -> None:
    p = plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES))
    for chain in p.for_family(Family.V4).chains:
        for rule in chain.rules:
            if rule.verdict is Verdict.NOTRACK and rule.match.dport == 53:
                # the one exception: the agent's own health query, which proves the cache
                # healthy before the switch is turned on
                assert rule.match.alive or rule.match.mark == PROBE_MARK, rule.comment


@pytest.mark.parametrize("mode", list(ProxyMode))
def test_agent_probes_pass_first_in_raw_output_whatever_the_switch(mode: ProxyMode) -> None:
    p = plan(facts(mode), nl(mode, upstreams=() if mode is ProxyMode.IPVS else ((EP1, 53),)))
    assert p.cache is not None and p.cache.cluster_ips == (CIP,)
    out = next(c for c in p.for_family(Family.V4).chains
               if c.table is Table.RAW and c.hook is Hook.OUTPUT)
    marked = [r for r in out.rules if r.match.mark is not None]
    assert list(out.rules[:len(marked)]) == marked  # ahead of every interception rule
    probes = {(r.match.dst, r.verdict) for r in marked if r.match.mark == PROBE_MARK}
    assert probes == {(ipaddress.ip_network(a), Verdict.NOTRACK) for a in p.cache.listen}
    bypass = [(r.match.dst, r.verdict) for r in marked if r.match.mark == BYPASS_MARK]
    # in ipvs mode the ClusterIP is not intercepted: nothing to bypass
    assert bypass == ([] if mode is ProxyMode.IPVS else
                      [(ipaddress.ip_network(CIP), Verdict.RETURN)])
    assert all(r.match.proto is Proto.UDP and r.match.dport == 53 for r in marked)


def test_upstream_that_is_intercepted_is_refused_as_a_loop() -> None:
    with pytest.raises(PlanRefused, match=r"invalid --upstream 198\.18\.1\.10: .*query itself"):
        plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES, upstreams=((CIP, 53),)))


def test_iptables_mode_needs_upstream_endpoints() -> None:
    with pytest.raises(PlanRefused, match="needs --upstream"):
        plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES, upstreams=()))


def test_by_default_every_name_goes_to_the_cluster_dns_over_tcp() -> None:
    """The node's resolvers are ignored: the Corefile's answers hold for every name."""
    f = facts(ProxyMode.IPTABLES, node_nameservers=(ipaddress.ip_address("198.18.9.9"),))
    p = plan(f, nl(ProxyMode.IPTABLES))
    assert p.cache is not None and p.cache.external_upstreams == ()
    zones = _zones(render_unbound(p.cache, Path("/run/dnsguard")))
    assert zones["."] == (True, ["198.18.0.101@53", "198.18.0.102@53"])
    assert all(tcp for tcp, _ in zones.values())
    assert "198.18.9.9" not in render_unbound(p.cache, Path("/run/dnsguard"))


def test_external_via_node_skips_node_nameservers_that_would_loop() -> None:
    f = facts(ProxyMode.IPTABLES, node_nameservers=(CIP, ipaddress.ip_address("198.18.9.9")))
    p = plan(f, nl(ProxyMode.IPTABLES, external_via="node"))
    assert p.cache is not None
    assert p.cache.external_upstreams == ((ipaddress.ip_address("198.18.9.9"), 53),)
    zones = _zones(render_unbound(p.cache, Path("/run/dnsguard")))
    assert zones["."] == (False, ["198.18.9.9@53"])
    assert zones["cluster.local."] == (True, ["198.18.0.101@53", "198.18.0.102@53"])
    assert zones["in-addr.arpa."][1] == ["198.18.0.101@53", "198.18.0.102@53"]


def test_external_via_node_without_a_usable_nameserver_is_refused() -> None:
    f = facts(ProxyMode.IPTABLES, node_nameservers=(CIP,))
    with pytest.raises(PlanRefused, match=r"^--external-via node: no usable nameserver in "
                                          r"/etc/resolv.conf \(found: 198\.18\.1\.10;"):
        plan(f, nl(ProxyMode.IPTABLES, external_via="node"))


def _zones(conf: str) -> dict[str, tuple[bool, list[str]]]:
    """forward-zone name -> (over TCP, forward-addrs), from rendered unbound.conf."""
    out: dict[str, tuple[bool, list[str]]] = {}
    for block in conf.split("forward-zone:")[1:]:
        lines = [ln.strip() for ln in block.strip().splitlines()]
        name = lines[0].split('"')[1]
        assert name not in out, f"zone {name} twice"
        out[name] = ("forward-tcp-upstream: yes" in lines,
                     [ln.split()[1] for ln in lines if ln.startswith("forward-addr:")])
    return out


def _zone(raw: str) -> ForwardZone:
    return settings_from(build_parser().parse_args(["plan", "--forward-zone", raw]),
                         {}).forward_zones[0]


def test_forward_zones_render_after_the_cluster_zones_sorted_udp_unless_tcp() -> None:
    zones = (_zone("corp.example=tcp:198.18.7.1,[fd00:198:18::7]:5353"),
             _zone("a.example=198.18.7.2:5353"))
    s = nl(ProxyMode.IPTABLES, forward_zones=tuple(sorted(zones, key=lambda z: z.name)))
    f = NodeFacts(proxy_mode=ProxyMode.IPTABLES, dns_ips=(CIP,),
                  families=frozenset({Family.V4, Family.V6}))
    p = plan(f, s)
    assert p.cache is not None
    z = _zones(render_unbound(p.cache, Path("/run/dnsguard")))
    assert z["corp.example."] == (True, ["198.18.7.1@53", "fd00:198:18::7@5353"])
    assert z["a.example."] == (False, ["198.18.7.2@5353"])
    assert list(z)[-2:] == ["a.example.", "corp.example."]


@pytest.mark.parametrize(("raw", "needle"), [
    ("x.example=198.18.1.10", "dnsguard intercepts 198.18.1.10 port 53"),
    ("x.example=169.254.20.10:53", "dnsguard intercepts 169.254.20.10 port 53"),
    ("x.example=127.0.0.1:53053", "dnsguard intercepts 127.0.0.1 port 53053"),
    ("svc.cluster.local=198.18.7.1", "the cache answers it itself or from the cluster DNS"),
    ("cluster.local=198.18.7.1", "the cache answers it itself or from the cluster DNS"),
    ("in-addr.arpa=198.18.7.1", "the cache answers it itself or from the cluster DNS"),
    ("dnsguard.invalid=198.18.7.1", "the cache answers it itself or from the cluster DNS"),
    ("x.example=fd00:198:18::7", "server fd00:198:18::7 is IPv6, which is disabled"),
])
def test_forward_zones_that_loop_or_steal_cluster_names_are_refused(raw: str,
                                                                     needle: str) -> None:
    with pytest.raises(PlanRefused) as exc:
        plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES, forward_zones=(_zone(raw),)))
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert str(exc.value).startswith("invalid --forward-zone ")


def test_forwarding_to_the_cluster_ip_is_fine_where_it_is_not_intercepted() -> None:
    """In ipvs mode the ClusterIP is IPVS's, not the cache's: no loop."""
    p = plan(facts(ProxyMode.IPVS),
             nl(ProxyMode.IPVS, forward_zones=(_zone("x.example=198.18.1.10"),)))
    assert p.cache is not None and p.cache.forward_zones[0].addrs == ((CIP, 53),)


def test_cache_flags_render_and_serve_stale_zero_turns_serving_expired_off() -> None:
    s = nl(ProxyMode.IPTABLES, cache_size=3 * (100 << 20) + 2, cache_max_ttl=600.0,
           cache_negative_ttl=0.0, serve_stale=0.0)
    p = plan(facts(ProxyMode.IPTABLES), s)
    assert p.cache is not None
    lines = render_unbound(p.cache, Path("/run/dnsguard")).splitlines()
    assert "    msg-cache-size: 100m" in lines
    assert f"    rrset-cache-size: {(200 << 20) + 2}" in lines
    assert "    cache-max-ttl: 600" in lines
    assert "    cache-max-negative-ttl: 0" in lines
    assert "    serve-expired: no" in lines
    assert not any("serve-expired-ttl" in ln for ln in lines)
    p = plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES, serve_stale=3600.0))
    assert p.cache is not None
    assert "    serve-expired-ttl: 3600" in render_unbound(p.cache, Path("/x")).splitlines()


@pytest.mark.parametrize(("name", "settings_kw", "nameservers"), [
    ("unbound-forward-zones.conf",
     {"forward_zones": ("corp.example=tcp:198.18.7.1,198.18.7.2:5353", "b.example=198.18.7.3")},
     ()),
    ("unbound-external-via-node.conf", {"external_via": "node"}, ("198.18.9.9", "198.18.9.10")),
])
def test_opt_in_configs_match_golden_and_unbound_accepts_them(
        tmp_path: Path, name: str, settings_kw: dict, nameservers: tuple[str, ...]) -> None:
    kw = dict(settings_kw)
    if "forward_zones" in kw:
        kw["forward_zones"] = tuple(sorted((_zone(z) for z in kw["forward_zones"]),
                                           key=lambda z: z.name))
    f = facts(ProxyMode.IPTABLES,
              node_nameservers=tuple(ipaddress.ip_address(n) for n in nameservers))
    p = plan(f, nl(ProxyMode.IPTABLES, **kw))
    assert p.cache is not None
    assert render_unbound(p.cache, Path("/run/dnsguard")) == (GOLDEN / name).read_text()
    _checkconf(tmp_path, render_unbound(p.cache, tmp_path))


def _checkconf(tmp_path: Path, text: str) -> None:
    conf = tmp_path / "unbound.conf"
    conf.write_text(text)
    res = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr


def test_unbound_config_is_deterministic_and_accepted_by_unbound(tmp_path: Path) -> None:
    p = plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES))
    assert p.cache is not None
    text = render_unbound(p.cache, Path("/run/dnsguard"))
    assert text == (GOLDEN / "unbound-iptables.conf").read_text()
    # Rendered again, in processes with other hash seeds: the spec is unpickled there, so any
    # set it holds iterates in another order, and the text must not change (the supervisor
    # tells "changed" from "re-rendered" by comparing it).
    for seed in ("1", "2"):
        again = subprocess.run(
            [sys.executable, "-c", _RENDER_PICKLED], input=pickle.dumps(p.cache),
            capture_output=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert again.stdout.decode() == text
    _checkconf(tmp_path, render_unbound(p.cache, tmp_path))


_RENDER_PICKLED = """
import pickle, sys
from pathlib import Path
from dnsguard.plan.cache import render_unbound
sys.stdout.write(render_unbound(pickle.load(sys.stdin.buffer), Path("/run/dnsguard")))
"""



@pytest.mark.parametrize(("extra", "needle"), [
    (["--forward-zone", "corp.example=169.254.20.10"],
     "dnsguard: error: invalid --forward-zone corp.example: dnsguard intercepts 169.254.20.10"),
    (["--forward-zone", "corp.example=198.18.7.1:99999"],
     "dnsguard: error: invalid --forward-zone '198.18.7.1:99999': not a port number"),
    (["--cache-size", "2x"], "dnsguard: error: invalid --cache-size '2x'"),
    (["--serve-stale", "forever"], "dnsguard: error: invalid --serve-stale 'forever'"),
    (["--external-via", "node"],
     "dnsguard: error: --external-via node: no usable nameserver in"),
])
def test_cli_refuses_with_one_line_and_exit_2(tmp_path: Path, capsys, extra: list[str],
                                              needle: str) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 198.18.1.10\n")  # the ClusterIP: intercepted, skipped
    argv = ["plan", "--mitigation", "nodelocal", "--proxy-mode", "iptables",
            "--backend", "iptables-nft", "--dns-ip", "198.18.1.10", "--upstream", "198.18.0.101",
            "--node-resolv-conf", str(resolv), *extra]
    assert main(argv, runner=FakeRunner()) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if " INFO " not in ln]
    assert len(errors) == 1 and errors[0].startswith(needle), errors
def test_the_cache_answers_pods_the_node_and_private_space_only() -> None:
    pods = ipaddress.ip_network("203.0.113.0/24")  # a pod range in global space
    p = plan(facts(ProxyMode.IPTABLES, pod_cidrs=(pods,)),
             nl(ProxyMode.IPTABLES, cache_client_qps=500))
    assert p.cache is not None and p.cache.pod_cidrs == (pods,)
    text = render_unbound(p.cache, Path("/run/dnsguard"))
    acl = re.findall(r"^    access-control: (\S+) (\w+)$", text, re.M)
    assert acl[:2] == [("0.0.0.0/0", "refuse"), ("::/0", "refuse")]
    allowed = {net for net, verdict in acl if verdict == "allow"}
    assert {"127.0.0.0/8", "::1/128", "169.254.20.10/32", f"{CIP}/32", str(pods),
            "10.0.0.0/8", "fc00::/7"} <= allowed
    assert not any(ipaddress.ip_network(n).overlaps(ipaddress.ip_network("8.8.8.0/24"))
                   for n in allowed)  # global space outside the pod CIDRs stays refused
    assert len(acl) == len(set(acl))
    assert "    ip-ratelimit: 500\n" in text


def test_a_client_rate_limit_of_zero_renders_no_limit() -> None:
    p = plan(facts(ProxyMode.IPTABLES), nl(ProxyMode.IPTABLES, cache_client_qps=0))
    assert p.cache is not None
    assert "ip-ratelimit" not in render_unbound(p.cache, Path("/run/dnsguard"))
