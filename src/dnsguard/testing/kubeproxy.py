"""kube-proxy's rules for a Service, rendered as text, the way kube-proxy writes them.

The lab needs a node whose netfilter state looks like a real node's, because dnsguard's
whole point is to coexist with kube-proxy: its NOTRACK rules must take effect before
kube-proxy's DNAT, must not disturb kube-proxy's chains, and must be refused where
kube-proxy's mode makes NOTRACK unsafe (IPVS). So these functions mimic kube-proxy's
output closely where it matters to dnsguard:

- chain names are computed exactly as kube-proxy computes them (`KUBE-SVC-` + the first
  16 base32 characters of sha256(port name + protocol), nftables `service-HASH-ns/name/...`
  with an 8-character hash), so the chains a test sees are the chains a node has
  (kube-dns's UDP chain is the well-known `KUBE-SVC-TCOU7JCQXEZGVUNU`);
- the packet path is kube-proxy's: hooks in PREROUTING/OUTPUT -> services dispatch ->
  per-service chain (masquerade mark for off-pod-network sources, random endpoint pick)
  -> per-endpoint DNAT; masquerade on the 0x4000 mark in POSTROUTING; a forward filter
  that drops conntrack-INVALID packets (the drop that turns the conntrack race into 5 s
  DNS timeouts);
- each table of each family is written in one atomic `iptables-restore --noflush` (or one
  `nft -f` transaction), so other owners' rules are never touched.

Everything here is pure: a frozen `Service` value in, restore text out. The lab applies the
text; unit tests and benchmarks can reuse it (to build large realistic rulesets, for
example) without root. Features kube-proxy has but dnsguard never interacts with
(NodePorts, LoadBalancers, session affinity, ipsets) are left out on purpose.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from dnsguard.model import Family, IPAddress, IPNetwork, Proto, Table

__all__ = [
    "KUBE_DNS_PORTS",
    "MASQ_MARK",
    "JumpRule",
    "Service",
    "ServicePort",
    "iptables_jumps",
    "iptables_restore",
    "ipvs_iptables_restore",
    "ipvsadm_restore",
    "kube_dns",
    "nft_endpoint_chain",
    "nft_script",
    "nft_service_chain",
    "sep_chain",
    "svc_chain",
]

#: kube-proxy's default masquerade bit (--iptables-masquerade-bit=14).
MASQ_MARK = "0x4000"

#: Comment kube-proxy puts on the PREROUTING/OUTPUT jumps; tools (and dnsguard's doctor)
#: recognise kube-proxy by it.
SERVICE_PORTALS = "kubernetes service portals"


@dataclass(frozen=True)
class ServicePort:
    """One port of a Service; `name` is part of kube-proxy's chain-name hash."""

    name: str
    proto: Proto
    port: int
    target_port: int


#: CoreDNS's Service ports as shipped by kubeadm: "dns" (UDP) and "dns-tcp" (TCP).
KUBE_DNS_PORTS = (
    ServicePort("dns", Proto.UDP, 53, 53),
    ServicePort("dns-tcp", Proto.TCP, 53, 53),
)


@dataclass(frozen=True)
class Service:
    """One Service in one IP family, as kube-proxy's proxier for that family sees it.

    Dual-stack Services are two values (one per ClusterIP), exactly as kube-proxy runs one
    proxier per family.
    """

    namespace: str
    name: str
    cluster_ip: IPAddress
    ports: tuple[ServicePort, ...]
    endpoints: tuple[IPAddress, ...]

    def __post_init__(self) -> None:
        if any(ep.version != self.cluster_ip.version for ep in self.endpoints):
            raise ValueError(f"{self.namespace}/{self.name}: endpoints of another family")
        if not self.endpoints:
            # kube-proxy renders REJECT rules for endpoint-less Services; the lab never
            # needs them, and an empty `numgen ... mod 0` would not even load.
            raise ValueError(f"{self.namespace}/{self.name}: no endpoints")

    @property
    def family(self) -> Family:
        return Family.of(self.cluster_ip)

    def port_name(self, port: ServicePort) -> str:
        """kube-proxy's ServicePortName string, e.g. ``kube-system/kube-dns:dns``."""
        return f"{self.namespace}/{self.name}:{port.name}"


def kube_dns(cluster_ip: IPAddress, endpoints: Sequence[IPAddress]) -> Service:
    """The kube-system/kube-dns Service (CoreDNS) for one family."""
    return Service("kube-system", "kube-dns", cluster_ip, KUBE_DNS_PORTS, tuple(endpoints))


def _b32sha(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def _hostport(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _host(ip: IPAddress) -> str:
    """An address as iptables-save prints a single-host match."""
    return f"{ip}/{ip.max_prefixlen}"


def svc_chain(service: Service, port: ServicePort) -> str:
    """kube-proxy iptables mode's service chain (portProtoHash)."""
    return "KUBE-SVC-" + _b32sha(service.port_name(port) + port.proto.value)[:16]


def sep_chain(service: Service, port: ServicePort, endpoint: IPAddress) -> str:
    """kube-proxy iptables mode's endpoint chain (servicePortEndpointChainName)."""
    text = service.port_name(port) + port.proto.value + _hostport(endpoint, port.target_port)
    return "KUBE-SEP-" + _b32sha(text)[:16]


def _nft_name(name: str) -> str:
    """kube-proxy nftables' hashAndTruncate: hash prefix keeps names unique and readable."""
    name = _b32sha(name)[:8] + "-" + name
    limit = 128 - 16  # nft's chain-name limit minus the longest prefix kube-proxy uses
    return name if len(name) <= limit else name[: limit - 3] + "..."


def nft_service_chain(service: Service, port: ServicePort) -> str:
    """kube-proxy nftables mode's cluster-policy service chain."""
    base = f"{service.namespace}/{service.name}/{port.proto.value}/{port.name}"
    return "service-" + _nft_name(base)


def nft_endpoint_chain(service: Service, port: ServicePort, endpoint: IPAddress) -> str:
    """kube-proxy nftables mode's endpoint chain (colons are illegal in chain names)."""
    ep = str(endpoint).replace(":", ".")
    base = (
        f"{service.namespace}/{service.name}/{port.proto.value}/{port.name}"
        f"__{ep}/{port.target_port}"
    )
    return "endpoint-" + _nft_name(base)


@dataclass(frozen=True)
class JumpRule:
    """A jump kube-proxy keeps in a built-in chain (rules as data, like node-cache).

    kube-proxy ensures these with ``-C`` and, when missing, inserts them first in the chain
    (``-I chain 1``); the lab does the same when it simulates a kube-proxy resync.
    """

    table: Table
    chain: str
    args: tuple[str, ...]


def iptables_jumps() -> tuple[JumpRule, ...]:
    """kube-proxy's jumps from built-in chains (same in iptables and ipvs modes)."""
    return (
        JumpRule(
            Table.NAT, "PREROUTING", ("-m", "comment", "--comment", SERVICE_PORTALS,
                                      "-j", "KUBE-SERVICES"),
        ),
        JumpRule(
            Table.NAT, "OUTPUT", ("-m", "comment", "--comment", SERVICE_PORTALS,
                                  "-j", "KUBE-SERVICES"),
        ),
        JumpRule(
            Table.NAT, "POSTROUTING", ("-m", "comment", "--comment",
                                       "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING"),
        ),
        JumpRule(
            Table.FILTER, "FORWARD", ("-m", "comment", "--comment",
                                      "kubernetes forwarding rules", "-j", "KUBE-FORWARD"),
        ),
    )


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def _restore_line(chain: str, args: Sequence[str]) -> str:
    return " ".join(["-A", chain, *(_quote(a) for a in args)])


def _comment(text: str) -> list[str]:
    return ["-m", "comment", "--comment", text]


def _table_text(table: Table, chains: Sequence[str], rules: Sequence[str], jumps: bool) -> str:
    lines = [f"*{table.value}"]
    lines += [f":{c} - [0:0]" for c in chains]
    if jumps:
        lines += [_restore_line(j.chain, j.args) for j in iptables_jumps() if j.table is table]
    lines += rules
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _postrouting_rules() -> list[str]:
    return [
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        # --xor-mark clears the bit so a re-entering packet is not masqueraded twice.
        f"-A KUBE-POSTROUTING -j MARK --set-xmark {MASQ_MARK}/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}",
    ]


def _filter_text(jumps: bool) -> str:
    rules = [
        # The rule behind the DNS race's 5 s timeouts: when two UDP packets of one socket
        # race for the same conntrack entry, the loser is INVALID and dropped here.
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules"'
        f" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"'
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    return _table_text(Table.FILTER, ["KUBE-FORWARD"], rules, jumps)


def _check_family(family: Family, services: Sequence[Service], pod_cidr: IPNetwork) -> None:
    if Family.of(pod_cidr) is not family or any(s.family is not family for s in services):
        raise ValueError(f"services and pod CIDR must all be IPv{family.value}")


def iptables_restore(
    family: Family, services: Sequence[Service], pod_cidr: IPNetwork, *, jumps: bool = True
) -> dict[Table, str]:
    """kube-proxy iptables mode: ``iptables-restore --noflush`` input, one text per table.

    With `jumps`, the text also appends kube-proxy's jumps to the built-in chains; that is
    right for a first install into empty built-in chains. A resync passes ``jumps=False``
    and ensures the jumps separately (see `JumpRule`), or they would be duplicated.
    """
    _check_family(family, services, pod_cidr)
    chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    rules = _postrouting_rules()
    for svc in services:
        for port in svc.ports:
            proto = port.proto.value
            svc_name = svc.port_name(port)
            svc_c = svc_chain(svc, port)
            chains.append(svc_c)
            match = ["-d", _host(svc.cluster_ip), "-p", proto]
            dport = ["-m", proto, "--dport", str(port.port)]
            rules.append(
                _restore_line(
                    "KUBE-SERVICES",
                    [*match, *_comment(f"{svc_name} cluster IP"), *dport, "-j", svc_c],
                )
            )
            # Sources outside the pod network (the node itself) get masqueraded so that
            # replies come back through this node.
            rules.append(
                _restore_line(
                    svc_c,
                    ["!", "-s", str(pod_cidr), *match, *_comment(f"{svc_name} cluster IP"),
                     *dport, "-j", "KUBE-MARK-MASQ"],
                )
            )
            n = len(svc.endpoints)
            for i, ep in enumerate(svc.endpoints):
                sep = sep_chain(svc, port, ep)
                chains.append(sep)
                pick = []
                if i < n - 1:
                    # Uniform choice: endpoint i is taken with probability 1/(n-i) among
                    # those not yet skipped. Printed the way iptables-save prints it.
                    pick = ["-m", "statistic", "--mode", "random",
                            "--probability", f"{1 / (n - i):.11f}"]
                target = _hostport(ep, port.target_port)
                rules.append(
                    _restore_line(svc_c, [*_comment(f"{svc_name} -> {target}"), *pick,
                                          "-j", sep])
                )
                # Hairpin: an endpoint reaching its own Service must be masqueraded.
                rules.append(
                    _restore_line(sep, ["-s", _host(ep), *_comment(svc_name),
                                        "-j", "KUBE-MARK-MASQ"])
                )
                rules.append(
                    _restore_line(sep, ["-p", proto, *_comment(svc_name), "-m", proto,
                                        "-j", "DNAT", "--to-destination", target])
                )
    rules.append(
        _restore_line(
            "KUBE-SERVICES",
            [*_comment("kubernetes service nodeports; NOTE: this must be the last rule in "
                       "this chain"),
             "-m", "addrtype", "--dst-type", "LOCAL", "-j", "KUBE-NODEPORTS"],
        )
    )
    return {
        Table.FILTER: _filter_text(jumps),
        Table.NAT: _table_text(Table.NAT, chains, rules, jumps),
    }


def ipvs_iptables_restore(
    family: Family, services: Sequence[Service], pod_cidr: IPNetwork, *, jumps: bool = True
) -> dict[Table, str]:
    """kube-proxy ipvs mode's iptables side, with plain address matches instead of ipsets.

    In ipvs mode the DNAT is done by IPVS, not by conntrack, so NOTRACK would make Service
    traffic skip IPVS's conntrack integration; that is why dnsguard refuses NOTRACK there.
    These rules still make conntrack track the connections (a nat table is in use and
    masquerade depends on the mark), as on a real ipvs-mode node.
    """
    _check_family(family, services, pod_cidr)
    chains = ["KUBE-SERVICES", "KUBE-NODE-PORT", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    rules = _postrouting_rules()
    accepts = []
    for svc in services:
        for port in svc.ports:
            proto = port.proto.value
            match = ["-d", _host(svc.cluster_ip), "-p", proto]
            dport = ["-m", proto, "--dport", str(port.port)]
            # Stands in for `-m set --match-set KUBE-CLUSTER-IP dst,dst`.
            rules.append(
                _restore_line(
                    "KUBE-SERVICES",
                    ["!", "-s", str(pod_cidr), *match,
                     *_comment("Kubernetes service cluster ip + port for masquerade purpose"),
                     *dport, "-j", "KUBE-MARK-MASQ"],
                )
            )
            accepts.append(_restore_line("KUBE-SERVICES", [*match, *dport, "-j", "ACCEPT"]))
    rules.append(
        _restore_line("KUBE-SERVICES",
                      ["-m", "addrtype", "--dst-type", "LOCAL", "-j", "KUBE-NODE-PORT"])
    )
    rules += accepts
    return {
        Table.FILTER: _filter_text(jumps),
        Table.NAT: _table_text(Table.NAT, chains, rules, jumps),
    }


def ipvsadm_restore(services: Sequence[Service]) -> str:
    """``ipvsadm -R`` input: one round-robin virtual server per port, masquerading (NAT)
    forwarding to every endpoint, as kube-proxy's ipvs mode configures it."""
    lines = []
    for svc in services:
        for port in svc.ports:
            flag = "-u" if port.proto is Proto.UDP else "-t"
            vip = _hostport(svc.cluster_ip, port.port)
            lines.append(f"-A {flag} {vip} -s rr")
            lines += [
                f"-a {flag} {vip} -r {_hostport(ep, port.target_port)} -m -w 1"
                for ep in svc.endpoints
            ]
    return "\n".join(lines) + "\n"


def nft_script(family: Family, services: Sequence[Service], pod_cidr: IPNetwork) -> str:
    """kube-proxy nftables mode: an ``nft -f`` transaction for this family's table.

    Written like kube-proxy's full sync (add table/chains, flush them, add rules), so
    applying it again is a resync that replaces the table's content atomically.
    """
    _check_family(family, services, pod_cidr)
    nf = "ip" if family is Family.V4 else "ip6"
    addr_type = "ipv4_addr" if family is Family.V4 else "ipv6_addr"
    t = f"{nf} kube-proxy"
    out = [f'add table {t} {{ comment "rules for kube-proxy" ; }}']

    def chain(name: str, spec: str = "") -> None:
        out.append(f"add chain {t} {name}" + (f" {{ {spec} ; }}" if spec else ""))
        out.append(f"flush chain {t} {name}")

    def rule(name: str, text: str) -> None:
        out.append(f"add rule {t} {name} {text}")

    out.append(f'add set {t} cluster-ips {{ type {addr_type} ; comment "Active ClusterIPs" ; }}')
    out.append(f"flush set {t} cluster-ips")
    out.append(
        f"add map {t} service-ips {{ type {addr_type} . inet_proto . inet_service : verdict ;"
        ' comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }'
    )
    out.append(f"flush map {t} service-ips")

    chain("mark-for-masquerade")
    rule("mark-for-masquerade", f"mark set mark or {MASQ_MARK}")
    chain("masquerading")
    rule("masquerading", f"mark and {MASQ_MARK} == 0 return")
    rule("masquerading", f"mark set mark xor {MASQ_MARK}")
    rule("masquerading", "masquerade fully-random")
    chain("services")
    rule("services", f"{nf} daddr . meta l4proto . th dport vmap @service-ips")
    chain("nat-prerouting", "type nat hook prerouting priority dstnat")
    rule("nat-prerouting", "jump services")
    # nft names "dstnat" only for prerouting; -100 is the same priority on output.
    chain("nat-output", "type nat hook output priority -100")
    rule("nat-output", "jump services")
    chain("nat-postrouting", "type nat hook postrouting priority srcnat")
    rule("nat-postrouting", "jump masquerading")
    chain("filter-forward", "type filter hook forward priority filter")
    # Same role as KUBE-FORWARD's INVALID drop in iptables mode.
    rule("filter-forward", "ct state invalid drop")

    elements: list[str] = []
    cluster_ips: list[str] = []
    for svc in services:
        cluster_ips.append(str(svc.cluster_ip))
        for port in svc.ports:
            proto = port.proto.value
            svc_c = nft_service_chain(svc, port)
            chain(svc_c)
            rule(svc_c, f"{nf} daddr {svc.cluster_ip} {proto} dport {port.port}"
                        f" {nf} saddr != {pod_cidr} jump mark-for-masquerade")
            picks = []
            for i, ep in enumerate(svc.endpoints):
                ep_c = nft_endpoint_chain(svc, port, ep)
                picks.append(f"{i} : goto {ep_c}")
                chain(ep_c)
                rule(ep_c, f"{nf} saddr {ep} jump mark-for-masquerade")
                rule(ep_c, f"meta l4proto {proto} dnat to {_hostport(ep, port.target_port)}")
            rule(svc_c, f"numgen random mod {len(svc.endpoints)} vmap {{ {', '.join(picks)} }}")
            elements.append(f"{svc.cluster_ip} . {proto} . {port.port} : goto {svc_c}")
    # Elements last: a verdict map may only name chains that already exist.
    if cluster_ips:
        out.append(f"add element {t} cluster-ips {{ {', '.join(cluster_ips)} }}")
        out.append(f"add element {t} service-ips {{ {', '.join(elements)} }}")
    return "\n".join(out) + "\n"
