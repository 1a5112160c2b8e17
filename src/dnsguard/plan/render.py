"""Render a `Ruleset` as iptables rule tokens or as an nft table, in the kernel tools' own form.

The output is written exactly as ``iptables-save`` and ``nft list table`` print it back (match
order, ``/32`` host masks, explicit ``-m udp``), so the diff can compare the kernel's state to the
plan token by token; the integration tests prove the round trip on every backend.

Every value is checked as it is written (`dnsguard.plan.checks`): addresses without zone IDs
and of the rule's family, ports 1-65535, comments printable ASCII within the backend's limit
(nft 128 bytes, iptables 255), shortened deterministically when longer.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence

from dnsguard.model import (
    ALIVE_SECONDS,
    CHAIN_PREFIX,
    NFT_TABLE,
    Chain,
    Family,
    Hook,
    Match,
    Rule,
    Ruleset,
    Table,
    Verdict,
)
from dnsguard.plan.checks import (
    IPTABLES_COMMENT_MAX,
    NFT_COMMENT_MAX,
    UnsafeValue,
    check_addr,
    check_chain,
    check_net,
    check_port,
    fit_comment,
)

__all__ = [
    "format_iptables_line",
    "iptables_jump",
    "iptables_rule",
    "nft_chain_name",
    "nft_table",
]

Tokens = tuple[str, ...]

_IPT_TARGET: dict[Verdict, Tokens] = {
    Verdict.NOTRACK: ("-j", "CT", "--notrack"),
    Verdict.ACCEPT: ("-j", "ACCEPT"),
    Verdict.DROP: ("-j", "DROP"),
    Verdict.RETURN: ("-j", "RETURN"),
}

_NFT_HOOK_PRIORITY: dict[Table, tuple[str, str]] = {
    Table.RAW: ("filter", "raw"),
    Table.FILTER: ("filter", "filter"),
    # ahead of kube-proxy's nat chains (dstnat, -100) so the fallback DNAT is seen first
    Table.NAT: ("nat", "dstnat - 10"),
}


def _nft_priority(table: Table, hook: Hook) -> str:
    """As ``nft list`` prints it: the name ``dstnat`` exists for prerouting only."""
    _, prio = _NFT_HOOK_PRIORITY[table]
    return "-110" if table is Table.NAT and hook is Hook.OUTPUT else prio


def iptables_rule(chain_name: str, rule: Rule, family: Family) -> Tokens:
    """``-A CHAIN ...`` tokens for one rule, in iptables-save's order."""
    m = rule.match
    tokens: list[str] = ["-A", chain_name]
    if m.src is not None:
        tokens += ["-s", str(check_net(m.src, family))]
    if m.dst is not None:
        tokens += ["-d", str(check_net(m.dst, family))]
    if m.proto is not None:
        tokens += ["-p", m.proto.value]
    tokens += ["-m", "comment", "--comment", fit_comment(rule.comment, IPTABLES_COMMENT_MAX)]
    if m.sport is not None or m.dport is not None:
        if m.proto is None:
            raise ValueError(f"rule {rule.comment!r}: ports need a protocol")
        tokens += ["-m", m.proto.value]
        if m.sport is not None:
            tokens += ["--sport", str(check_port(m.sport))]
        if m.dport is not None:
            tokens += ["--dport", str(check_port(m.dport))]
    if m.mark is not None:
        tokens += ["-m", "mark", "--mark", f"{m.mark:#x}"]
    if m.ctstate is not None:
        tokens += ["-m", "conntrack", "--ctstate", m.ctstate.value.upper()]
    if m.src_local:
        tokens += ["-m", "addrtype", "--src-type", "LOCAL"]
    if m.alive:
        tokens += ["-m", "recent", "--rcheck", "--seconds", str(ALIVE_SECONDS),
                   "--name", family.alive_name, "--mask", family.host_mask, "--rdest"]
    if rule.verdict is Verdict.DNAT:
        if rule.to is None:
            raise ValueError(f"rule {rule.comment!r}: DNAT needs a target")
        tokens += ["-j", "DNAT", "--to-destination", _hostport(family, *rule.to)]
    elif rule.verdict is Verdict.JUMP:
        tokens += ["-j", CHAIN_PREFIX + _jump(rule)]
    elif rule.verdict is Verdict.MARK:
        tokens += ["-j", "MARK", "--set-xmark", f"{_mark(rule):#x}/{_mark(rule):#x}"]
    else:
        tokens += _IPT_TARGET[rule.verdict]
    return tuple(tokens)


def _jump(rule: Rule) -> str:
    if rule.jump is None:
        raise ValueError(f"rule {rule.comment!r}: a jump needs a target chain")
    return check_chain(rule.jump)


def _mark(rule: Rule) -> int:
    if rule.mark is None:
        raise ValueError(f"rule {rule.comment!r}: MARK needs a mark")
    return rule.mark


def _hostport(family: Family, ip: object, port: int) -> str:
    text = str(check_addr(ip, family))
    port = check_port(port)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def iptables_jump(chain: Chain) -> Tokens:
    """The one rule in the built-in chain that sends packets into ``chain``."""
    return (
        "-A", chain.hook.value,
        "-m", "comment", "--comment", f"dnsguard: hook {chain.name}",
        "-j", chain.name,
    )


def format_iptables_line(tokens: Sequence[str]) -> str:
    """Join tokens into an iptables-restore line, double-quoting where needed.

    A quote or backslash is escaped as iptables-save does (tokens read back from the kernel
    may hold them); a control character is refused: a newline would end the line and start
    another command of the transaction.
    """
    out = []
    for t in tokens:
        if _CONTROL.search(t):
            raise UnsafeValue(f"control character in an iptables-restore token: {t!r}")
        if t == "" or any(c.isspace() for c in t) or any(c in t for c in "'\\#\""):
            out.append('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            out.append(t)
    return " ".join(out)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


#: a bare word or a double-quoted string: all iptables-save prints without backslashes and
#: single quotes (shlex, for the rest, takes ~100 us a line: seconds at 40k rules)
_TOKEN = re.compile(r'"([^"]*)"(?=\s|$)|([^\s"]+)(?=\s|$)')


def parse_iptables_line(line: str) -> Tokens:
    """Inverse of `format_iptables_line` for lines printed by iptables-save."""
    if "\\" not in line and "'" not in line:
        matches = list(_TOKEN.finditer(line))
        if sum(m.end() - m.start() for m in matches) + len(matches) - 1 == len(line.strip()):
            return tuple(m.group(1) if m.group(1) is not None else m.group(2) for m in matches)
    return tuple(shlex.split(line, comments=False, posix=True))


def nft_chain_name(chain: Chain) -> str:
    if chain.sub is not None:
        return check_chain(chain.sub.lower())
    return f"{chain.table.value}-{chain.hook.value.lower()}"


def _nft_match(family: Family, m: Match) -> list[str]:
    parts: list[str] = []
    if m.src is None and m.dst is None and not m.alive:
        # nothing names an address: say the family, or the inet table matches both with it
        parts += ["meta", "nfproto", f"ipv{family.value}"]
    if m.src is not None:
        parts += [family.nft_addr, "saddr", _nft_addr(family, m.src)]
    if m.dst is not None:
        parts += [family.nft_addr, "daddr", _nft_addr(family, m.dst)]
    if m.alive:
        parts += [family.nft_addr, "daddr", f"@{_nft_set(family)}"]
    if m.proto is not None:
        if m.sport is None and m.dport is None:
            parts += ["meta", "l4proto", m.proto.value]
        else:
            if m.sport is not None:
                parts += [m.proto.value, "sport", str(check_port(m.sport))]
            if m.dport is not None:
                parts += [m.proto.value, "dport", str(check_port(m.dport))]
    if m.mark is not None:
        parts += ["meta", "mark", f"{m.mark:#010x}"]
    if m.ctstate is not None:
        parts += ["ct", "state", m.ctstate.value]
    if m.src_local:
        parts += ["fib", "saddr", "type", "local"]
    return parts


def _nft_addr(family: Family, net: object) -> str:
    text = str(check_net(net, family))
    if text.endswith("/32") or text.endswith("/128"):
        return text.rsplit("/", 1)[0]
    return text


def _nft_set(family: Family) -> str:
    return f"alive{family.value}"


def nft_rule(family: Family, rule: Rule) -> str:
    if rule.verdict is Verdict.DNAT:
        if rule.to is None:
            raise ValueError(f"rule {rule.comment!r}: DNAT needs a target")
        verdict = f"dnat {family.nft_addr} to {_hostport(family, *rule.to)}"
    elif rule.verdict is Verdict.JUMP:
        verdict = f"jump {_jump(rule).lower()}"
    elif rule.verdict is Verdict.MARK:
        verdict = f"meta mark set meta mark | {_mark(rule):#010x}"
    else:
        verdict = rule.verdict.value
    words = [*_nft_match(family, rule.match), verdict]
    return " ".join(words) + f' comment "{fit_comment(rule.comment, NFT_COMMENT_MAX)}"'


def nft_table(rulesets: Iterable[Ruleset]) -> str:
    """The whole ``inet dnsguard`` table as ``nft list table inet dnsguard`` prints it.

    Both families share one ``inet`` table; a chain holds the IPv4 rules, then the IPv6 ones.
    """
    chains: dict[tuple[Table, Hook], list[str]] = {}
    subs: dict[str, list[str]] = {}
    sets: list[Family] = []
    for rs in rulesets:
        if rs.uses_alive:
            sets.append(rs.family)
        for chain in rs.chains:
            if chain.sub is not None:
                lines = subs.setdefault(nft_chain_name(chain), [])
            else:
                lines = chains.setdefault((chain.table, chain.hook), [])
            lines.extend(nft_rule(rs.family, r) for r in chain.rules)
    out = [f"table inet {NFT_TABLE} {{"]
    for i, family in enumerate(sets):
        if i:
            out.append("")
        out += [f"\tset {_nft_set(family)} {{", f"\t\ttype ipv{family.value}_addr",
                "\t\tflags timeout", "\t}"]
    # regular chains first (in name order): a jump may only name a chain already declared,
    # and nft lists chains in the order they were added
    for i, name in enumerate(sorted(subs)):
        if i or sets:
            out.append("")
        out.append(f"\tchain {name} {{")
        out.extend(f"\t\t{r}" for r in subs[name])
        out.append("\t}")
    for i, ((table, hook), rules) in enumerate(sorted(
            chains.items(), key=lambda kv: (kv[0][0].value, kv[0][1].value))):
        if i or sets or subs:
            out.append("")
        ctype, _ = _NFT_HOOK_PRIORITY[table]
        prio = _nft_priority(table, hook)
        name = f"{table.value}-{hook.value.lower()}"
        out.append(f"\tchain {name} {{")
        out.append(f"\t\ttype {ctype} hook {hook.value.lower()} priority {prio}; policy accept;")
        out.extend(f"\t\t{r}" for r in rules)
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"

