"""iptables backends (legacy and nft flavours): read what dnsguard owns, diff, restore atomically.

Design (after kube-proxy's iptables proxier):
- One ``iptables-save`` per family reads the kernel; `parse_save` keeps only what dnsguard owns:
  ``DNSGUARD-*`` chains with their rules, and the rules in built-in chains that jump to them.
- `diff_tables` (pure) compares that to the plan, token by token, and explains every difference.
- A table that differs is rewritten with one ``iptables-restore --noflush`` carrying the full
  content of our chains in that table: declaring a chain flushes it, every jump to our chains
  is deleted and one is inserted first in line, and chains no longer planned are deleted. The
  kernel swaps the table in one step, so packets never see a half-written state, other people's
  chains are untouched, and a rejected restore changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dnsguard.model import CHAIN_PREFIX, Backend, Family, Hook, Table
from dnsguard.netfilter.errors import NetfilterError, restore_error
from dnsguard.netfilter.runner import READ_TIMEOUT, Runner
from dnsguard.plan import Plan
from dnsguard.plan.checks import UnsafeValue
from dnsguard.plan.render import (
    Tokens,
    format_iptables_line,
    iptables_jump,
    iptables_rule,
    parse_iptables_line,
)

__all__ = ["IptablesBackend", "TableState", "desired_tables", "diff_tables", "parse_save"]

#: How long restore waits for the xtables lock before failing with LockHeld.
LOCK_WAIT_SECONDS = 5
_BUILTIN = {h.value for h in Hook}


@dataclass
class TableState:
    """What dnsguard owns in one table of one family."""

    chains: dict[str, tuple[Tokens, ...]] = field(default_factory=dict)
    #: built-in chain -> its rules that jump to one of our chains, with their 1-based positions
    jumps: dict[str, tuple[tuple[int, Tokens], ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.chains and not any(self.jumps.values())


Tables = dict[Table, TableState]


def parse_save(text: str) -> Tables:
    """Parse ``iptables-save`` output, keeping only dnsguard's chains and the jumps to them."""
    tables: Tables = {}
    state: TableState | None = None
    positions: dict[str, int] = {}
    # appended to lists, made tuples at the end: a chain may hold tens of thousands of rules
    rules: dict[tuple[Table, str], list[Tokens]] = {}
    # one object per distinct token ("-m", "comment", a pod range...): at 10k Services the
    # parsed table shrinks from ~45 to ~20 MiB, and it is alive while the agent diffs
    seen: dict[str, str] = {}
    table = Table.FILTER
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            try:
                table = Table(line[1:])
            except ValueError:
                state = None  # mangle, security...: dnsguard writes none of them
                continue
            state = tables.setdefault(table, TableState())
            positions = {}
        elif state is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name.startswith(CHAIN_PREFIX):
                state.chains.setdefault(name, ())
        elif line.startswith("-A "):
            chain = line.split(None, 2)[1]
            if not chain.startswith(CHAIN_PREFIX) and chain not in _BUILTIN:
                continue  # kube-proxy's KUBE-* chains: not ours, not worth tokenizing
            tokens = tuple(seen.setdefault(t, t) for t in parse_iptables_line(line))
            positions[chain] = positions.get(chain, 0) + 1
            if chain.startswith(CHAIN_PREFIX):
                rules.setdefault((table, chain), []).append(tokens)
            elif chain in _BUILTIN and _jump_target(tokens).startswith(CHAIN_PREFIX):
                state.jumps[chain] = (*state.jumps.get(chain, ()), (positions[chain], tokens))
    for (tbl, chain), found in rules.items():
        tables[tbl].chains[chain] = tuple(found)
    return {t: s for t, s in tables.items() if not s.empty}


def _jump_target(tokens: Tokens) -> str:
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "-g"):
            return tokens[i + 1]
    return ""


def desired_tables(plan: Plan, family: Family) -> Tables:
    """The plan for one family, in the same shape `parse_save` returns."""
    out: Tables = {}
    for chain in plan.for_family(family).chains:
        st = out.setdefault(chain.table, TableState())
        st.chains[chain.name] = tuple(iptables_rule(chain.name, r, family) for r in chain.rules)
        if chain.hooked:
            st.jumps[chain.hook.value] = ((1, iptables_jump(chain)),)
    return out


def diff_tables(want: Tables, have: Tables) -> dict[Table, list[str]]:
    """Per table, human-readable reasons why the kernel differs from the plan (empty: in sync)."""
    out: dict[Table, list[str]] = {}
    for table in sorted(set(want) | set(have), key=lambda t: t.value):
        w, h = want.get(table, TableState()), have.get(table, TableState())
        reasons: list[str] = []
        for name in sorted(set(w.chains) | set(h.chains)):
            if name not in h.chains:
                reasons.append(f"chain {name} is missing")
            elif name not in w.chains:
                reasons.append(f"chain {name} is not planned (stale)")
            elif w.chains[name] != h.chains[name]:
                reasons.append(_rules_reason(name, w.chains[name], h.chains[name]))
        for hook in sorted(set(w.jumps) | set(h.jumps)):
            wj, hj = w.jumps.get(hook, ()), h.jumps.get(hook, ())
            if wj == hj:
                continue
            if not hj:
                reasons.append(f"{hook} does not jump to {_jump_target(wj[0][1])}")
            elif not wj:
                reasons.append(f"{hook} still jumps to {_jump_target(hj[0][1])} (stale)")
            elif len(hj) > 1:
                reasons.append(f"{hook} jumps to dnsguard {len(hj)} times")
            else:
                reasons.append(f"{hook}: dnsguard's jump is rule {hj[0][0]}, not first")
        if reasons:
            out[table] = reasons
    return out


def _rules_reason(name: str, want: Sequence[Tokens], have: Sequence[Tokens]) -> str:
    if len(want) != len(have):
        return f"chain {name} has {len(have)} rules, plan has {len(want)}"
    for i, (w, h) in enumerate(zip(want, have, strict=True), start=1):
        if w != h:
            return f"chain {name} rule {i} differs: {format_iptables_line(h)}"
    return f"chain {name} differs"  # pragma: no cover - unreachable when lists differ


def restore_text(table: Table, want: TableState, have: TableState) -> str:
    """One transaction that turns ``have`` into ``want`` for a table, touching nothing else.

    Partial, as kube-proxy's partial syncs: only chains whose rules differ are declared (which
    flushes them) and rewritten, and the jumps from built-in chains only when they differ; a
    chain the kernel already holds as planned is not mentioned, so with ``--noflush`` it stays
    as it is. One Service change among 10k rewrites its own chains, not all of them.
    """
    stale = sorted(set(have.chains) - set(want.chains))
    changed = [name for name, rules in want.chains.items() if have.chains.get(name) != rules]
    rejump = ({h: j for h, j in want.jumps.items() if j}
              != {h: j for h, j in have.jumps.items() if j})
    for name in (*changed, *stale):
        _check_chain_name(name)
    lines = [f"*{table.value}"]
    lines += [f":{name} - [0:0]" for name in (*changed, *stale)]
    if rejump:
        for hook in sorted(have.jumps):
            for _, tokens in have.jumps[hook]:
                lines.append(format_iptables_line(("-D", *tokens[1:])))
    for name in changed:
        lines += [format_iptables_line(r) for r in want.chains[name]]
    if rejump:
        for hook in sorted(want.jumps):
            for _, tokens in want.jumps[hook]:
                lines.append(format_iptables_line(("-I", hook, "1", *tokens[2:])))
    lines += [f"-X {name}" for name in stale]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


#: what a chain name may hold in restore text: no whitespace, quotes or control characters
_CHAIN_NAME = re.compile(r"[!#-&(-\[\]-~]{1,28}")


def _check_chain_name(name: str) -> None:
    """Refuse a chain name that would not stay one token of one restore line.

    Ours are generated (`dnsguard.plan.checks.check_chain`); a stale one comes from the
    kernel's listing, and is written back only to delete it.
    """
    if not _CHAIN_NAME.fullmatch(name):
        raise UnsafeValue(f"chain name unsafe in iptables-restore input: {name!r}")


class IptablesBackend:
    """dnsguard's rules through iptables-legacy or iptables-nft, for one or both families."""

    def __init__(self, runner: Runner, backend: Backend) -> None:
        if not backend.is_iptables:
            raise ValueError(f"{backend.value} is not an iptables backend")
        self.runner = runner
        self.backend = backend
        self._flavour = backend.value.split("-", 1)[1]  # legacy | nft

    def _tool(self, family: Family, verb: str) -> str:
        base = "iptables" if family is Family.V4 else "ip6tables"
        return f"{base}-{self._flavour}-{verb}"

    def observe(self, family: Family) -> Tables:
        tool = self._tool(family, "save")
        res = self.runner.run([tool], timeout=READ_TIMEOUT)
        if not res.ok:
            raise NetfilterError(f"{tool} failed: {res.stderr.strip() or res.returncode}")
        return parse_save(res.stdout)

    def drift(self, plan: Plan, family: Family,
              have: Tables | None = None) -> dict[Table, list[str]]:
        return diff_tables(desired_tables(plan, family),
                           self.observe(family) if have is None else have)

    def apply(self, plan: Plan, family: Family, have: Tables | None = None) -> list[Table]:
        """Make the kernel hold exactly the plan for ``family``; return the tables rewritten."""
        have = self.observe(family) if have is None else have
        want = desired_tables(plan, family)
        changed = list(diff_tables(want, have))
        for table in changed:
            self._restore(family, restore_text(
                table, want.get(table, TableState()), have.get(table, TableState())))
        return changed

    def cleanup(self, families: Iterable[Family]) -> list[tuple[Family, Table]]:
        """Remove every ``DNSGUARD-*`` chain and jump; return what was removed.

        iptables-nft creates built-in chains and tables only when a rule first needs them, so
        after our removal it may hold built-in chains (and tables) that exist only because of
        us. Empty ones with an ACCEPT policy are deleted too, so ``iptables-nft-save`` reads as
        if dnsguard had never run. The deletion is one nft transaction, which the kernel
        refuses if a chain meanwhile got a rule, so nobody else's rule is ever lost.
        """
        removed = [(f, t) for f in families for t in self.apply(Plan(()), f)]
        if self._flavour == "nft":
            for family, table in removed:
                self._drop_empty_builtins(family, table)
        return removed

    def _drop_empty_builtins(self, family: Family, table: Table) -> None:
        """Delete the base chains of ``table`` that hold nothing, and the table if it empties.

        Read from nft itself: iptables-nft-save also prints built-in chains that do not exist.
        """
        fam = family.nft_addr
        res = self.runner.run(["nft", "list", "table", fam, table.value])
        if not res.ok:
            return
        chains: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in res.stdout.splitlines():
            text = line.strip()
            if text.startswith("chain ") and text.endswith("{"):
                current = chains.setdefault(text.split()[1], [])
            elif text == "}":
                current = None
            elif current is not None and text:
                current.append(text)
        empty = [name for name, body in chains.items()
                 if name in _BUILTIN and len(body) == 1 and "policy accept;" in body[0]]
        if not empty:
            return
        text = "".join(f"delete chain {fam} {table.value} {c}\n" for c in empty)
        if len(empty) == len(chains) and " set " not in res.stdout:
            text += f"delete table {fam} {table.value}\n"
        self.runner.run(["nft", "-f", "-"], stdin=text)

    def _restore(self, family: Family, text: str) -> None:
        tool = self._tool(family, "restore")
        # iptables-nft-restore takes ~0.5 ms a rule: a full sync of 10k Services' 40k rules
        # must not time out, so the limit grows with the transaction
        res = self.runner.run([tool, f"--wait={LOCK_WAIT_SECONDS}", "--noflush"], stdin=text,
                              timeout=LOCK_WAIT_SECONDS + 25 + text.count("\n") / 500)
        if not res.ok:
            raise restore_error(tool, res.stderr, text)
