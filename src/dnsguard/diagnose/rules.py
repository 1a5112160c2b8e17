"""Classifier: NOTRACK rules that catch DNS to a ClusterIP kube-proxy DNATs with conntrack.

Untracked packets skip NAT. In kube-proxy's iptables and nftables modes the ClusterIP *is* a
conntrack DNAT, so a NOTRACK rule that matches DNS to it sends pods' queries to an address no
one answers on. Anyone may have written the rule (an old dnsguard in IPVS mode before the node
switched modes, a hand-made "DNS fix", another agent), so doctor looks at every rule on the
node, not only dnsguard's:

* ``iptables-save`` dumps (legacy and nft flavours, both families): the ``raw`` table, rules
  with ``-j NOTRACK`` or ``-j CT --notrack`` in chains reachable from ``PREROUTING``/``OUTPUT``.
* ``nft list ruleset``: rules with the ``notrack`` statement in chains reachable from a base
  chain on the prerouting or output hook with a priority before conntrack's (-200); a later
  notrack has no effect. Tables that iptables-nft manages (``ip``/``ip6`` ``raw``, ...) are
  left to the iptables-nft dump so no rule is reported twice.

A rule *can match* when nothing in it excludes the packet: each of protocol, destination and
destination port is absent, matches, or is a named set we cannot see into (counted as a
match). Conditions we do not model (interfaces, marks, the rules that jump to its chain) are
ignored, so this errs on the side of reporting; the evidence shows the rule for a human to
judge.

The DNS ClusterIPs come from ``--dns-ip`` or, failing that, from kube-proxy's own rules
(`discover_dns_ips`): ``KUBE-SERVICES`` rules on port 53 (iptables mode) or the
``service-ips`` map elements on port 53 (nftables mode).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dnsguard.diagnose.findings import Finding, Severity
from dnsguard.diagnose.samples import RulesSample, RuleText
from dnsguard.model import DNS_PORT, IPAddress, IPNetwork

__all__ = [
    "NotrackRule",
    "classify_notrack",
    "discover_dns_ips",
    "nft_notrack_rules",
    "xt_notrack_rules",
]

Ports = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Cond:
    """One match condition: the values, negation, or ``unknown`` (a named set)."""

    negated: bool = False
    values: tuple[object, ...] = ()
    unknown: bool = False

    def admits(self, test: Iterable[bool]) -> bool:
        if self.unknown:
            return True
        return any(test) != self.negated


@dataclass(frozen=True)
class NotrackRule:
    source: str
    chain: str
    text: str
    family: int | None  # 4, 6, or None for both (nft inet)
    proto: Cond | None = None
    dst: Cond | None = None
    dport: Cond | None = None

    def catches(self, ip: IPAddress | None, proto: str, port: int = DNS_PORT) -> bool:
        """Can this rule match ``proto`` to ``ip:port``? ``ip=None``: to *some* address."""
        if ip is not None and self.family is not None and ip.version != self.family:
            return False
        if self.proto is not None and not self.proto.admits(
                p in (proto, "all", "0") for p in self.proto.values):
            return False
        if self.dst is not None:
            if ip is None:
                if not (self.dst.negated or self.dst.unknown):
                    return False  # a specific destination: cannot tell without the ClusterIP
            elif not self.dst.admits(
                    isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network)
                    and n.version == ip.version and ip in n for n in self.dst.values):
                return False
        return self.dport is None or self.dport.admits(
            isinstance(r, tuple) and r[0] <= port <= r[1] for r in self.dport.values)


def _ports(raw: str) -> Ports:
    out = []
    for raw_part in raw.replace("{", "").replace("}", "").split(","):
        part = raw_part.strip()
        if not part:
            continue
        if part == "domain":  # nft -S prints service names
            part = "53"
        lo, _, hi = part.replace("-", ":").partition(":")
        out.append((int(lo), int(hi or lo)))
    return tuple(out)


def _nets(raw: str) -> tuple[IPNetwork, ...]:
    parts = raw.replace("{", "").replace("}", "").split(",")
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in parts if p.strip())


# --- iptables-save ------------------------------------------------------------------------

_BUILTIN_RAW = ("PREROUTING", "OUTPUT")
_XT_TARGETS_TAKING_ARGS = {"-j", "--jump", "-g", "--goto"}


def _xt_tables(text: str) -> dict[str, dict[str, list[str]]]:
    """``iptables-save`` text -> table -> chain -> rule specs (after ``-A CHAIN``)."""
    tables: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], {})
        elif current is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            current.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            current.setdefault(chain, []).append(spec)
    return tables


@dataclass(frozen=True)
class _XtRule:
    tokens: tuple[str, ...]
    spec: str

    def target(self) -> str | None:
        for i, tok in enumerate(self.tokens[:-1]):
            if tok in _XT_TARGETS_TAKING_ARGS:
                return self.tokens[i + 1]
        return None


def _xt_conditions(tokens: Sequence[str]) -> tuple[Cond | None, Cond | None, Cond | None]:
    proto = dst = dport = None
    negate = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        value = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in ("-p", "--protocol"):
            proto = Cond(negate, (value.lower(),))
        elif tok in ("-d", "--destination"):
            dst = Cond(negate, _nets(value))
        elif tok in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            dport = Cond(negate, _ports(value))
        if tok.startswith("-"):
            negate = False
        i += 1
    return proto, dst, dport


def _reachable(chains: dict[str, list[str]], roots: Iterable[str],
               edges: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [r for r in roots if r in chains]
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        todo.extend(t for t in edges.get(c, ()) if t in chains and t not in seen)
    return seen


def xt_notrack_rules(dump: RuleText) -> list[NotrackRule]:
    """NOTRACK rules in the raw table of one ``iptables-save`` dump that can take effect."""
    raw = _xt_tables(dump.text).get("raw", {})
    parsed: dict[str, list[_XtRule]] = {}
    edges: dict[str, set[str]] = {}
    for chain, specs in raw.items():
        for spec in specs:
            try:
                tokens = tuple(shlex.split(spec))
            except ValueError:
                tokens = tuple(spec.split())
            rule = _XtRule(tokens, spec)
            parsed.setdefault(chain, []).append(rule)
            target = rule.target()
            if target is not None:
                edges.setdefault(chain, set()).add(target)
    live = _reachable(raw, _BUILTIN_RAW, edges)
    out = []
    for chain in raw:
        if chain not in live:
            continue
        for rule in parsed.get(chain, []):
            target = rule.target()
            if not (target == "NOTRACK" or (target == "CT" and "--notrack" in rule.tokens)):
                continue
            try:
                proto, dst, dport = _xt_conditions(rule.tokens)
            except ValueError:
                proto = dst = dport = None  # unparsable value: assume it can match
            out.append(NotrackRule(dump.source, f"raw {chain}", f"-A {chain} {rule.spec}",
                                   dump.family, proto, dst, dport))
    return out


# --- nft list ruleset ---------------------------------------------------------------------

#: Tables iptables-nft owns; their rules are read from the iptables-nft-save dumps.
_XT_NFT_TABLES = {("ip", n) for n in ("raw", "mangle", "filter", "nat", "security")} | {
    ("ip6", n) for n in ("raw", "mangle", "filter", "nat", "security")}
_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
               "srcnat": 100}
_CONNTRACK_PRIORITY = -200
_ANON_SET = re.compile(r"\{[^{}]*\}")


@dataclass
class _NftChain:
    family: str
    table: str
    name: str
    hook: str | None = None
    priority: int | None = None
    rules: list[str] | None = None


def _priority(raw: str) -> int | None:
    m = re.match(r"\s*(-?\d+|[a-z]+)\s*(?:([+-])\s*(\d+))?", raw)
    if not m:
        return None
    base = m.group(1)
    value = int(base) if base.lstrip("-").isdigit() else _PRIORITIES.get(base)
    if value is None:
        return None
    if m.group(2):
        value += int(m.group(3)) * (1 if m.group(2) == "+" else -1)
    return value


def _nft_chains(text: str) -> list[_NftChain]:
    chains: list[_NftChain] = []
    family = table = ""
    chain: _NftChain | None = None
    depth = 0
    skip_until: int | None = None  # depth at which a skipped block (set, map...) ends
    for raw in text.splitlines():
        line = raw.strip()
        opens, closes = line.count("{"), line.count("}")
        if skip_until is not None:
            depth += opens - closes
            if depth <= skip_until:
                skip_until = None
            continue
        if depth == 0 and line.startswith("table ") and line.endswith("{"):
            parts = line.split()
            family, table = (parts[1], parts[2]) if len(parts) >= 4 else ("ip", parts[1])
        elif depth == 1 and line.startswith("chain ") and line.endswith("{"):
            chain = _NftChain(family, table, line.split()[1], rules=[])
            chains.append(chain)
        elif depth == 1 and line.endswith("{"):
            skip_until = depth
        elif depth == 2 and chain is not None and line and line != "}":
            if line.startswith("type ") and " hook " in line:
                m = re.search(r"\bhook (\w+)", line)
                chain.hook = m.group(1) if m else None
                m = re.search(r"\bpriority ([^;]+)", line)
                chain.priority = _priority(m.group(1)) if m else None
            elif not line.startswith(("policy ", "comment ", "devices ")):
                assert chain.rules is not None
                chain.rules.append(line)
        depth += opens - closes
        if depth <= 1:
            chain = None
    return chains


def _nft_conditions(rule: str) -> tuple[int | None, Cond | None, Cond | None, Cond | None]:
    tokens = _ANON_SET.sub(lambda m: m.group(0).replace(" ", ""), rule).split()
    family: int | None = None
    proto = dst = dport = None
    i = 0
    while i < len(tokens) - 1:
        a, b = tokens[i], tokens[i + 1]
        rest = tokens[i + 2:]
        neg = bool(rest) and rest[0] == "!="
        value = (rest[1] if neg and len(rest) > 1 else rest[0]) if rest else ""
        unknown = value.startswith("@") or value.startswith("$")
        if a in ("ip", "ip6") and b == "daddr":
            family = 4 if a == "ip" else 6
            dst = Cond(neg, () if unknown else _nets(value), unknown)
        elif a in ("udp", "tcp", "th") and b == "dport":
            if a != "th":
                proto = Cond(False, (a,))
            dport = Cond(neg, () if unknown else _ports(value), unknown)
        elif (a, b) in (("meta", "l4proto"), ("ip", "protocol"), ("ip6", "nexthdr")):
            protos = tuple(p for p in value.strip("{}").split(",") if p)
            proto = Cond(neg, protos, unknown)
        i += 1
    return family, proto, dst, dport


def nft_notrack_rules(dump: RuleText, skip_xt_tables: bool = True) -> list[NotrackRule]:
    """``notrack`` rules in ``nft list ruleset`` that run before conntrack."""
    chains = _nft_chains(dump.text)
    by_table: dict[tuple[str, str], list[_NftChain]] = {}
    for c in chains:
        by_table.setdefault((c.family, c.table), []).append(c)
    out = []
    for (family, table), members in by_table.items():
        if family not in ("ip", "ip6", "inet"):
            continue
        if skip_xt_tables and (family, table) in _XT_NFT_TABLES:
            continue
        named = {c.name: c for c in members}
        edges = {c.name: {m.group(2) for r in c.rules or []
                          for m in re.finditer(r"\b(jump|goto) (\S+)", r)} for c in members}
        roots = [c.name for c in members
                 if c.hook in ("prerouting", "output") and c.priority is not None
                 and c.priority < _CONNTRACK_PRIORITY]
        live = _reachable({n: [] for n in named}, roots, edges)
        table_family = {"ip": 4, "ip6": 6}.get(family)
        for name in sorted(live, key=list(named).index):
            for rule in named[name].rules or []:
                if not re.search(r"(^|\s)notrack(\s|$)", rule):
                    continue
                try:
                    fam, proto, dst, dport = _nft_conditions(rule)
                except ValueError:
                    fam, proto, dst, dport = None, None, None, None
                out.append(NotrackRule(f"{dump.source}: table {family} {table}",
                                       f"chain {name}", rule, table_family or fam,
                                       proto, dst, dport))
    return out


# --- discovery ----------------------------------------------------------------------------

_NFT_SERVICE_53 = re.compile(r"([0-9a-fA-F:.]+) \. (?:udp|tcp) \. 53 : goto")


def discover_dns_ips(iptables: Sequence[RuleText], nft: RuleText | None) -> tuple[IPAddress, ...]:
    """ClusterIPs kube-proxy serves on port 53, from its own rules (any DNS Service)."""
    found: list[IPAddress] = []
    for dump in iptables:
        for spec in _xt_tables(dump.text).get("nat", {}).get("KUBE-SERVICES", []):
            try:
                _, dst, dport = _xt_conditions(shlex.split(spec))
            except ValueError:
                continue
            if (dst is None or dst.negated or dport is None or dport.negated
                    or (DNS_PORT, DNS_PORT) not in dport.values):
                continue
            for net in dst.values:
                if isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network) and (
                        net.num_addresses == 1):
                    found.append(net.network_address)
    if nft is not None:
        for block in re.finditer(r"table (ip6?) kube-proxy \{(.*?)\n\}", nft.text, re.S):
            for m in _NFT_SERVICE_53.finditer(block.group(2)):
                try:
                    found.append(ipaddress.ip_address(m.group(1)))
                except ValueError:
                    continue
    return tuple(dict.fromkeys(found))


# --- the classifier -----------------------------------------------------------------------


def all_notrack_rules(sample: RulesSample) -> list[NotrackRule]:
    rules = [r for dump in sample.iptables for r in xt_notrack_rules(dump)]
    if sample.nft is not None:
        have_xt_nft = any(d.source.startswith("iptables-nft") for d in sample.iptables)
        rules += nft_notrack_rules(sample.nft, skip_xt_tables=have_xt_nft)
    return rules


def classify_notrack(sample: RulesSample | None) -> list[Finding]:
    if sample is None or sample.proxy_mode is None or not sample.proxy_mode.nats_with_conntrack:
        return []
    mode = sample.proxy_mode
    critical: list[str] = []
    maybe: list[str] = []
    # A ClusterIP held by a local link is served on the node (a node-local cache binds it, as
    # NodeLocal DNSCache and dnsguard's cache mode do): untracked packets to it are delivered
    # locally, which is the point. Whether anything answers there is another finding.
    dnatted = [ip for ip in sample.dns_ips if sample.local_link(ip) is None]
    for rule in all_notrack_rules(sample):
        hits = [f"{proto.upper()} {ip}:53" for ip in dnatted for proto in ("udp", "tcp")
                if rule.catches(ip, proto)]
        where = f"{rule.source}, {rule.chain}: {rule.text}"
        if hits:
            critical.append(f"{where}  (catches {', '.join(hits)})")
        elif not sample.dns_ips and any(rule.catches(None, p) for p in ("udp", "tcp")):
            # No destination at all catches every ClusterIP; a negated or opaque one may.
            (critical if rule.dst is None else maybe).append(
                f"{where}  (catches port 53 to {'any' if rule.dst is None else 'some'} "
                "destination; no DNS ClusterIP known)")
    if not critical and not maybe:
        return []
    ips = ", ".join(map(str, sample.dns_ips)) or "unknown (pass --dns-ip)"
    evidence = (f"kube-proxy mode {mode.value}: {sample.proxy_mode_evidence}",
                f"DNS ClusterIP(s): {ips}"
                + (f" (from {sample.dns_ips_source})" if sample.dns_ips_source else ""),
                *critical, *maybe)
    return [Finding(
        "notrack-breaks-dnat", Severity.CRITICAL if critical else Severity.WARNING,
        f"NOTRACK rule(s) catch DNS to the ClusterIP, which kube-proxy {mode.value} mode "
        "DNATs with conntrack: pods' DNS queries are never translated and go unanswered",
        evidence,
        "delete the rule(s) above (dnsguard cleanup removes dnsguard's own); in iptables and "
        "nftables modes keep DNS out of conntrack with a node-local DNS cache "
        "(dnsguard --mitigation nodelocal), never NOTRACK to the ClusterIP",
    )]
