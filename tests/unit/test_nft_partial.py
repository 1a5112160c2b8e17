"""nft partial sync: what one transaction writes for a Service change, and when it falls back to
replacing the whole table.

`FakeNft` stands in for nft on our one table the way the kernel behaves where it matters here:
chains are listed in creation order, set elements are live state listed with the set, a
transaction is all or nothing, and a chain that is still referenced or not empty cannot be
deleted. The real-nft round trip (the listing equals the plan after a partial sync) is proved in
tests/integration/test_nft_partial_kernel.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from dnsguard.config import Settings
from dnsguard.model import (
    ExternalService,
)
from dnsguard.netfilter.errors import RestoreFailed
from dnsguard.netfilter.nft import Block, NftBackend, diff_nft, parse_table, sync_text
from dnsguard.netfilter.runner import Completed
from dnsguard.plan.render import nft_table
from dnsguard.testing.fakes import FakeRunner
from tests.support.external import (
    NODELOCAL_EXT,
    ONLY_EXT,
    chains_of,
    ip,
    make_plan,
    shards_of,
    svc,
)

LIST = ("nft", "list", "table", "inet", "dnsguard")
TABLE = "table inet dnsguard"

SVCS = [svc(i) for i in range(40)]
#: the hooked chains: one jump per shard, rewritten only when a shard comes or goes
DISPATCH = {"nat-prerouting", "nat-output"}


class _Reject(Exception):
    def __init__(self, line: int, msg: str) -> None:
        super().__init__(msg)
        self.line = line


class FakeNft:
    """nft on ``inet dnsguard`` only: `list table` and the ``nft -f`` statements we write."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[str, str], Block] | None = None
        self.elements: dict[str, str] = {}  # set -> its elements (live state)
        self.transactions: list[str] = []

    def run(self, argv: Sequence[str], *, stdin: str | None = None,
            timeout: float = 30.0) -> Completed:
        argv = tuple(argv)
        if argv == LIST:
            if self.blocks is None:
                return Completed(argv, 1, "", "Error: No such file or directory\n")
            return Completed(argv, 0, self.listing(), "")
        assert argv == ("nft", "-f", "-"), argv
        self.transactions.append(stdin or "")
        try:
            self.blocks, self.elements = self._apply(stdin or "")
        except _Reject as exc:
            return Completed(argv, 1, "", f"/dev/stdin:{exc.line}:1-5: Error: {exc}\n")
        return Completed(argv, 0, "", "")

    def listing(self) -> str:
        assert self.blocks is not None
        out = [f"{TABLE} {{"]
        ordered = sorted(self.blocks.values(), key=lambda b: b.kind != "set")  # stable
        for i, b in enumerate(ordered):
            out += [""] if i else []
            out.append(f"\t{b.kind} {b.name} {{")
            out += [f"\t\t{ln}" for ln in (*b.head, *b.rules)]
            if b.name in self.elements:
                out.append(f"\t\telements = {{ {self.elements[b.name]} }}")
            out.append("\t}")
        return "\n".join([*out, "}"]) + "\n"

    def _apply(self, text: str) -> tuple[dict[tuple[str, str], Block] | None, dict[str, str]]:
        blocks = None if self.blocks is None else dict(self.blocks)
        elements = dict(self.elements)
        lines = text.splitlines()
        t = "inet dnsguard"
        for n, line in enumerate(lines, start=1):
            if line == f"add table {t}":
                blocks = {} if blocks is None else blocks
            elif line == f"{TABLE} {{":
                if blocks:
                    raise _Reject(n, "the fake defines only a new table")
                defined = parse_table("\n".join(lines[n - 1:]) + "\n")
                assert defined is not None
                return defined, elements
            elif blocks is None:
                raise _Reject(n, "No such file or directory")
            elif line == f"delete table {t}":
                blocks, elements = None, {}
            elif line.startswith(f"add chain {t} "):
                name = line.split()[4]
                blocks.setdefault(("chain", name), Block("chain", name, ()))
            elif line.startswith((f"flush chain {t} ", f"delete chain {t} ")):
                name = line.split()[4]
                b = blocks.get(("chain", name))
                if b is None:
                    raise _Reject(n, "No such file or directory")
                if line.startswith("flush"):
                    blocks[("chain", name)] = replace(b, rules=())
                elif b.rules or any(f"jump {name} " in r for c in blocks.values()
                                    for r in c.rules):
                    raise _Reject(n, "Could not process rule: Device or resource busy")
                else:
                    del blocks[("chain", name)]
            elif line.startswith(f"add rule {t} "):
                name, rule = line.split(" ", 5)[4:]
                b = blocks.get(("chain", name))
                target = rule.split(" jump ", 1)[1].split()[0] if " jump " in rule else None
                if b is None or (target and ("chain", target) not in blocks):
                    raise _Reject(n, "No such file or directory")
                blocks[("chain", name)] = replace(b, rules=(*b.rules, rule))
            else:
                raise _Reject(n, f"the fake does not know {line!r}")
        return blocks, elements


def written(text: str, verb: str) -> list[str]:
    """Chains named by ``verb`` lines (``add rule``: each chain once, in order)."""
    prefix = f"{verb} inet dnsguard "
    return list(dict.fromkeys(ln.split()[4] for ln in text.splitlines()
                              if ln.startswith(prefix)))


def synced(svcs: Sequence[ExternalService], settings: Settings = ONLY_EXT,
           ) -> tuple[FakeNft, NftBackend]:
    nft = FakeNft()
    backend = NftBackend(nft)
    assert backend.apply(make_plan(svcs, settings))
    nft.transactions.clear()
    return nft, backend


def test_a_port_change_rewrites_that_services_chains_and_its_dispatch_shards_only() -> None:
    nft, backend = synced(SVCS)
    changed = [*SVCS]
    changed[7] = svc(7, port=8080)
    p = make_plan(changed)
    assert backend.apply(p)
    [text] = nft.transactions
    touched = chains_of(SVCS[7]) | shards_of(SVCS[7])
    assert set(written(text, "flush chain")) == touched
    assert set(written(text, "add rule")) == touched
    assert written(text, "add chain") == written(text, "delete chain") == []
    assert all(ln.startswith(("flush chain inet dnsguard ext-", "flush chain inet dnsguard x",
                              "add rule inet dnsguard ")) for ln in text.splitlines())
    # the untouched chains' rules, the hooked chains' among them, are not in the transaction
    assert text.count("\n") == sum(len(c.rules) for rs in p.rulesets for c in rs.chains
                                   if c.sub is not None and c.sub.lower() in touched
                                   ) + len(touched)
    assert backend.drift(p) == []
    assert not backend.apply(p)  # a fixpoint: nothing left to write


def test_an_external_ip_change_rewrites_only_the_dispatch_shards_it_leaves_and_joins() -> None:
    nft, backend = synced(SVCS)
    changed = [*SVCS]
    changed[3] = svc(3, ext="198.19.5.3")  # a /24 no Service used: a new shard
    p = make_plan(changed)
    assert backend.apply(p)
    [text] = nft.transactions
    left = shards_of(svc(3)) - shards_of(changed[3])  # IPv4 198.19.0.0/24; IPv6 unchanged
    joined = shards_of(changed[3]) - shards_of(svc(3))
    assert len(left) == len(joined) == 2
    assert set(written(text, "add chain")) == joined
    assert set(written(text, "flush chain")) == left | DISPATCH
    assert set(written(text, "add rule")) == left | joined | DISPATCH
    assert backend.drift(p) == [] and not backend.apply(p)
    # within one shard, only that shard is rewritten
    changed[3] = svc(3, ext="198.19.5.4")
    p = make_plan(changed)
    nft.transactions.clear()
    assert backend.apply(p)
    [text] = nft.transactions
    assert set(written(text, "flush chain")) == set(written(text, "add rule")) == joined


def test_a_new_service_chain_is_added_before_rules_jump_to_it_and_listed_last() -> None:
    nft, backend = synced(SVCS[:10])
    p = make_plan(SVCS[:11])
    assert backend.apply(p)
    [text] = nft.transactions
    new = chains_of(SVCS[10])
    assert set(written(text, "add chain")) == new
    assert set(written(text, "add rule")) == new | shards_of(SVCS[10])
    lines = text.splitlines()
    last_add_chain = max(i for i, ln in enumerate(lines) if ln.startswith("add chain"))
    first_jump = min(i for i, ln in enumerate(lines) if " jump ext-" in ln)
    assert last_add_chain < first_jump
    # nft lists the new chains after the base chains: another order than the rendering's,
    # and still in sync
    listed = nft.listing()
    assert listed != nft_table(p.rulesets)
    assert diff_nft(nft_table(p.rulesets), listed) == []
    assert not backend.apply(p)


def test_a_removed_service_chain_is_flushed_then_deleted_after_the_jumps_are_gone() -> None:
    nft, backend = synced(SVCS[:10])
    p = make_plan([*SVCS[:4], *SVCS[5:10]])
    assert backend.apply(p)
    [text] = nft.transactions
    gone = chains_of(SVCS[4])
    assert set(written(text, "delete chain")) == gone
    assert set(written(text, "flush chain")) == gone | shards_of(SVCS[4])
    assert set(written(text, "add rule")) == shards_of(SVCS[4])
    lines = text.splitlines()
    first_delete = min(i for i, ln in enumerate(lines) if ln.startswith("delete chain"))
    assert all(not ln.startswith(("add", "flush")) for ln in lines[first_delete:])
    assert nft.blocks is not None and not gone & {n for _, n in nft.blocks}
    assert backend.drift(p) == [] and not backend.apply(p)


def test_deleting_a_chain_ahead_of_the_flush_of_its_jumps_is_what_the_fake_rejects() -> None:
    """The order matters: the fake, like the kernel, refuses a chain still jumped to."""
    nft, backend = synced(SVCS[:3])
    name = sorted(chains_of(SVCS[0]))[0]
    res = nft.run(["nft", "-f", "-"], stdin=f"flush chain inet dnsguard {name}\n"
                                            f"delete chain inet dnsguard {name}\n")
    assert not res.ok and "busy" in res.stderr
    assert backend.drift(make_plan(SVCS[:3])) == []  # nothing of it was applied


def test_the_alive_sets_elements_survive_a_partial_sync_and_not_a_full_one() -> None:
    nft, backend = synced(SVCS[:5], NODELOCAL_EXT)
    nft.elements["alive4"] = "198.18.255.10 timeout 2s expires 1s500ms"
    p = make_plan([*SVCS[:5], svc(5)], NODELOCAL_EXT)
    assert backend.apply(p)
    [text] = nft.transactions
    assert "set" not in written(text, "add rule") and "element" not in text
    assert nft.elements == {"alive4": "198.18.255.10 timeout 2s expires 1s500ms"}
    assert backend.drift(p) == []  # elements are live state, never drift
    # a new set (the cache now also listens on IPv6) takes the full replace: the switch resets
    # and interception waits for the cache's next refresh
    dual = replace(NODELOCAL_EXT, local_ips=(ip("198.18.255.10"), ip("fd00:198:18:ff::10")))
    p2 = make_plan([*SVCS[:5], svc(5)], dual)
    assert backend.apply(p2)
    assert nft.transactions[-1].startswith("add table inet dnsguard\ndelete table")
    assert nft.elements == {}
    assert backend.drift(p2) == []


HAVE = nft_table(make_plan(SVCS[:3]).rulesets)


@pytest.mark.parametrize(("have", "why"), [
    (None, "table missing"),
    (HAVE.replace("priority dstnat - 10", "priority dstnat"), "base chain priority"),
    (HAVE.replace("policy accept;", "policy drop;", 1), "base chain policy"),
    (HAVE.replace(f"{TABLE} {{\n", f"{TABLE} {{\n\tflags dormant\n"), "table flags"),
    (HAVE.replace(f"{TABLE} {{\n", f"{TABLE} {{\n\tmap m {{\n\t\ttype ipv4_addr : verdict"
                                   "\n\t}\n\n"), "a map"),
    (HAVE.replace("\tchain nat-output {\n", "\tchain nat-output {\n\t\tcomment \"x\"\n"),
     "chain comment"),
    (HAVE.replace("\t}\n}\n", "\t}\n\n\tchain filter-input {\n\t\ttype filter hook input "
                  "priority filter; policy accept;\n\t}\n}\n"), "base chain not planned"),
    (HAVE.replace("\tchain nat-output {", "\tset alive4 {\n\t\ttype ipv4_addr\n\t}\n\n"
                  "\tchain nat-output {"), "set not planned"),
])
def test_anything_but_rule_changes_in_known_chains_is_a_full_replace(have: str | None,
                                                                      why: str) -> None:
    want = nft_table(make_plan(SVCS[:4]).rulesets)
    text = sync_text(want, have)
    assert text == f"add table inet dnsguard\ndelete table inet dnsguard\n{want}", why


def test_in_sync_whatever_the_listing_order_and_nothing_is_written() -> None:
    want = parse_table(HAVE)
    assert want is not None
    reordered = [f"{TABLE} {{"]
    for b in reversed(want.values()):
        reordered += [f"\t{b.kind} {b.name} {{", *(f"\t\t{ln}" for ln in (*b.head, *b.rules)),
                      "\t}", ""]
    listing = "\n".join([*reordered[:-1], "}"]) + "\n"
    runner = FakeRunner()
    runner.add(LIST, listing)
    backend = NftBackend(runner)
    assert backend.drift(make_plan(SVCS[:3])) == []
    assert not backend.apply(make_plan(SVCS[:3]))
    assert [argv for argv, _ in runner.calls] == [LIST, LIST]  # no nft -f


def test_drift_names_each_differing_block() -> None:
    want = nft_table(make_plan(SVCS[:3]).rulesets)
    have = nft_table(make_plan([*SVCS[:2], svc(2, port=81), svc(9)]).rulesets)
    w, h = parse_table(want), parse_table(have)
    assert w is not None and h is not None
    ported = [f"chain {n} rule 2 differs: {h[('chain', n)].rules[1]!r}, "
              f"plan {w[('chain', n)].rules[1]!r}" for n in sorted(chains_of(SVCS[2]))]
    stale = [f"chain {n} is not planned (stale)" for n in sorted(chains_of(svc(9)))]
    dispatch = [f"chain {n} has {len(h[('chain', n)].rules)} rules, plan has "
                f"{len(w[('chain', n)].rules)}" for n in sorted(shards_of(SVCS[0]))]
    assert sorted(diff_nft(want, have)) == sorted([*ported, *stale, *dispatch])
    assert diff_nft(want, None) == [f"{TABLE} is missing"]
    assert diff_nft(None, want) == [f"{TABLE} is not planned (stale)"]
    assert diff_nft(want, want.replace("policy accept;", "policy drop;", 1)) == [
        "chain nat-output differs: 'type nat hook output priority -110; policy drop;', "
        "plan 'type nat hook output priority -110; policy accept;'"]
    # what the parser does not know is reported by line
    assert diff_nft(want, want.replace("{\n", "{\n\tflags dormant\n", 1)) == [
        f"{TABLE} line 2 differs: 'flags dormant', plan 'chain " + want.split("chain ")[1]
        .split("\n")[0].strip() + "'"]


def test_a_rejected_transaction_raises_with_the_failing_line_and_changes_nothing() -> None:
    nft, backend = synced(SVCS[:3])
    before = nft.listing()
    sick = [*SVCS[:3], svc(3)]

    def failing(argv: Sequence[str], *, stdin: str | None = None,
                timeout: float = 30.0) -> Completed:
        if tuple(argv) == ("nft", "-f", "-"):  # a kernel that refuses the second line
            return Completed(tuple(argv), 1, "",
                             "/dev/stdin:2:24-38: Error: Could not process rule: No space\n")
        return FakeNft.run(nft, argv, stdin=stdin, timeout=timeout)

    backend.runner = type("R", (), {"run": staticmethod(failing)})()
    with pytest.raises(RestoreFailed, match="Could not process rule") as err:
        backend.apply(make_plan(sick))
    assert ">    2  add chain inet dnsguard" in err.value.context
    assert nft.listing() == before


def test_cleanup_deletes_the_table_and_then_owns_nothing() -> None:
    nft, backend = synced(SVCS[:3])
    assert backend.cleanup()
    assert nft.transactions == ["add table inet dnsguard\ndelete table inet dnsguard\n"]
    assert nft.blocks is None and not backend.cleanup()
