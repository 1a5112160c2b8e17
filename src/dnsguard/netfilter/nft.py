"""Native nftables backend: dnsguard owns one table, ``inet dnsguard``, and nothing else.

The table is read with ``nft list table`` and the plan rendered in nft's own listing form; both
are parsed into blocks (sets, and chains with their header and rules) and compared block by
block: nft lists chains in the order they were created, so after a partial sync the listing's
order differs from the rendered one while holding exactly the plan.

A change is one ``nft -f`` transaction, atomic in the kernel; a rejected one changes nothing.

* Partial, as the iptables backend (and kube-proxy): new chains are added, chains whose rules
  differ are flushed and refilled, and chains no longer planned are flushed and deleted after
  the rules that jumped to them are gone (nft checks references when the transaction commits).
  One Service change among 10k rewrites its own chain and the dispatch chains; sets and chains
  already as planned are not mentioned, so the dead man's switch keeps its elements (a partial
  sync neither turns interception back on nor off).
* Full replace (add, delete, define the table) when the table is missing, a set or a base
  chain's header (type, hook, priority, policy) differs or is added or removed, or the listing
  holds anything the parser does not know. It resets the switch's elements: interception stays
  off until the cache's next health tick refreshes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dnsguard.model import NFT_TABLE
from dnsguard.netfilter.errors import NetfilterError, restore_error
from dnsguard.netfilter.runner import READ_TIMEOUT, Runner
from dnsguard.plan import Plan
from dnsguard.plan.render import nft_table

__all__ = ["Block", "NftBackend", "diff_nft", "parse_table", "sync_text"]

#: nft takes ~0.1 ms a rule; 10k Services' transaction must not time out, so the limit grows
_BASE_TIMEOUT = 30.0
_LINES_PER_SECOND = 2000


@dataclass(frozen=True)
class Block:
    """One set or chain of the table, as listed."""

    kind: str  # "set" | "chain"
    name: str
    #: a set's body; a base chain's ``type ... policy ...;`` line; () for a regular chain
    head: tuple[str, ...]
    rules: tuple[str, ...] = ()


Blocks = dict[tuple[str, str], Block]

_OPEN = re.compile(r"\t(set|chain) (\S+) \{")


def parse_table(text: str) -> Blocks | None:
    """Blocks of a listing (or rendering) of our table; None for anything not understood.

    A chain line that is not a rule (``type ...`` header, a chain ``comment``) counts as its
    header, so a chain someone commented differs in header and takes the full replace.
    """
    lines = text.splitlines()
    if len(lines) < 2 or lines[0] != f"table inet {NFT_TABLE} {{" or lines[-1] != "}":
        return None
    blocks: Blocks = {}
    current: tuple[str, str, list[str]] | None = None
    for line in lines[1:-1]:
        if current is None:
            if not line:
                continue
            m = _OPEN.fullmatch(line)
            if m is None:
                return None  # table flags, maps, flowtables...: not ours to write
            current = (m[1], m[2], [])
        elif line == "\t}":
            kind, name, body = current
            if (kind, name) in blocks:
                return None
            if kind == "set":
                blocks[(kind, name)] = Block(kind, name, tuple(body))
            else:
                n = next((i for i, ln in enumerate(body)
                          if not ln.startswith(("type ", "comment "))), len(body))
                blocks[(kind, name)] = Block(kind, name, tuple(body[:n]), tuple(body[n:]))
            current = None
        elif line.startswith("\t\t") and line[2:3].strip():
            current[2].append(line[2:])
        else:
            return None
    return blocks if current is None else None


def _diff_lines(want: str, have: str) -> list[str]:
    """First differing line, for a listing the parser does not understand."""
    w, h = want.splitlines(), have.splitlines()
    for i, (a, b) in enumerate(zip(w, h, strict=False), start=1):
        if a != b:
            return [f"table inet {NFT_TABLE} line {i} differs: {b.strip()!r}, plan {a.strip()!r}"]
    return [f"table inet {NFT_TABLE} has {len(h)} lines, plan has {len(w)}"]


def diff_nft(want: str | None, have: str | None) -> list[str]:
    """Reasons the listed table differs from the rendered one (empty: in sync)."""
    if want == have:
        return []
    if have is None:
        return [f"table inet {NFT_TABLE} is missing"]
    if want is None:
        return [f"table inet {NFT_TABLE} is not planned (stale)"]
    w, h = parse_table(want), parse_table(have)
    if w is None or h is None:
        return _diff_lines(want, have)
    reasons: list[str] = []
    for key in sorted(w.keys() | h.keys()):
        what = f"{key[0]} {key[1]}"
        wb, hb = w.get(key), h.get(key)
        if hb is None:
            reasons.append(f"{what} is missing")
        elif wb is None:
            reasons.append(f"{what} is not planned (stale)")
        elif wb.head != hb.head:
            reasons.append(f"{what} differs: {'; '.join(hb.head)!r}, "
                           f"plan {'; '.join(wb.head)!r}")
        elif len(wb.rules) != len(hb.rules):
            reasons.append(f"{what} has {len(hb.rules)} rules, plan has {len(wb.rules)}")
        elif wb.rules != hb.rules:
            pairs = enumerate(zip(wb.rules, hb.rules, strict=True), start=1)
            i, a, b = next((i, a, b) for i, (a, b) in pairs if a != b)
            reasons.append(f"{what} rule {i} differs: {b!r}, plan {a!r}")
    return reasons


def _partial(want: Blocks, have: Blocks) -> str | None:
    """The partial transaction (see the module docstring); None when only a full one will do."""
    if {k: b for k, b in want.items() if k[0] == "set"} != \
            {k: b for k, b in have.items() if k[0] == "set"}:
        return None
    for key in want.keys() | have.keys():
        if key[0] == "chain":
            wb, hb = want.get(key), have.get(key)
            if (wb.head if wb else ()) != (hb.head if hb else ()):
                return None  # a base chain added, removed or re-hooked
    chains = sorted(name for kind, name in want.keys() | have.keys() if kind == "chain")
    new = [n for n in chains if ("chain", n) not in have]
    gone = [n for n in chains if ("chain", n) not in want]
    changed = [n for n in chains if ("chain", n) in have and ("chain", n) in want
               and have[("chain", n)].rules != want[("chain", n)].rules]
    t = f"inet {NFT_TABLE}"
    lines = [f"add chain {t} {n}" for n in new]  # before any rule can jump to them
    lines += [f"flush chain {t} {n}" for n in (*changed, *gone)]
    for n in (*new, *changed):
        lines += [f"add rule {t} {n} {r}" for r in want[("chain", n)].rules]
    lines += [f"delete chain {t} {n}" for n in gone]  # no rule jumps to them any more
    return "".join(f"{ln}\n" for ln in lines)


def sync_text(want: str | None, have: str | None) -> str:
    """The ``nft -f`` input that turns ``have`` into ``want``: "" when in sync."""
    if want == have:
        return ""
    if want is not None and have is not None:
        w, h = parse_table(want), parse_table(have)
        if w is not None and h is not None:
            partial = _partial(w, h)
            if partial is not None:
                return partial
    return f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n" + (want or "")


class NftBackend:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def observe(self) -> str | None:
        res = self.runner.run(["nft", "list", "table", "inet", NFT_TABLE], timeout=READ_TIMEOUT)
        if res.ok:
            return _normalize(res.stdout)
        if "No such file or directory" in res.stderr:
            return None
        raise NetfilterError(f"nft list table failed: {res.stderr.strip() or res.returncode}")

    @staticmethod
    def desired(plan: Plan) -> str | None:
        return nft_table(plan.rulesets) if plan.rulesets else None

    def drift(self, plan: Plan, have: str | None = None, *, observed: bool = False) -> list[str]:
        return diff_nft(self.desired(plan), have if observed else self.observe())

    def apply(self, plan: Plan, have: str | None = None, *, observed: bool = False) -> bool:
        """Make the kernel hold exactly the plan; return True when something was written."""
        have = have if observed else self.observe()
        text = sync_text(self.desired(plan), have)
        if not text:
            return False
        res = self.runner.run(["nft", "-f", "-"], stdin=text,
                              timeout=_BASE_TIMEOUT + text.count("\n") / _LINES_PER_SECOND)
        if not res.ok:
            raise restore_error("nft -f", res.stderr, text)
        return True

    def cleanup(self) -> bool:
        return self.apply(Plan(()))


def _normalize(listing: str) -> str:
    """Trailing blanks stripped, set elements dropped: their timeouts are live state."""
    out: list[str] = []
    in_elements = False
    for line in listing.strip("\n").splitlines():
        if line.strip().startswith("elements = {"):
            in_elements = True
        if in_elements:
            in_elements = not line.rstrip().endswith("}")
            continue
        out.append(line.rstrip())
    return "\n".join(out) + "\n"
