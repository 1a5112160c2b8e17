"""nft partial sync on the real kernel: 200 external Services, then one Service changes.

Everything runs in a network namespace this module creates (``dgnft-<hex>``, deleted even when
a test fails); addresses are from 198.18.0.0/15 and fd00:198:18::/48. The unit tests in
tests/unit/test_nft_partial.py (whose Services and plans these reuse) prove what a transaction
says, against a fake; these prove the real nft accepts it, lists back exactly the plan
afterwards (so the diff reaches a fixpoint), commits it atomically, and leaves the dead man's
switch's elements alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import replace

import pytest

from dnsguard.model import Backend
from dnsguard.netfilter.alive import AliveSwitch
from dnsguard.netfilter.errors import RestoreFailed
from dnsguard.netfilter.nft import NftBackend, parse_table
from dnsguard.netfilter.runner import Completed, SubprocessRunner
from dnsguard.plan import Plan
from tests.support.external import (
    NODELOCAL_EXT,
    chains_of,
    ip,
    make_plan,
    shards_of,
    svc,
)

pytestmark = pytest.mark.root

N = 200
SVCS = [svc(i) for i in range(N)]
CACHE_IP = NODELOCAL_EXT.local_ips[0]


class Recording:
    """The namespace's runner, keeping every ``nft -f`` input; ``poison`` is appended to the
    next one (a line the kernel refuses at commit)."""

    def __init__(self, inner: SubprocessRunner) -> None:
        self.inner = inner
        self.transactions: list[str] = []
        self.poison = ""

    def run(self, argv: Sequence[str], *, stdin: str | None = None,
            timeout: float = 30.0) -> Completed:
        if list(argv) == ["nft", "-f", "-"] and stdin is not None:
            stdin, self.poison = stdin + self.poison, ""
            self.transactions.append(stdin)
        return self.inner.run(argv, stdin=stdin, timeout=timeout)

    def nft(self, *args: str) -> str:
        res = self.inner.run(["nft", *args])
        assert res.ok, res.stderr
        return res.stdout


@pytest.fixture
def ns() -> Iterator[Recording]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft")
    name = f"dgnft-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Recording(SubprocessRunner(("ip", "netns", "exec", name)))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def touched(text: str) -> dict[str, set[str]]:
    """Chains each verb of a transaction names."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        words = line.split()
        out.setdefault(" ".join(words[:2]), set()).add(words[4])
    return out


def in_kernel(rec: Recording, p: Plan) -> None:
    """The table lists back exactly the plan (blocks; nft's chain order is its own)."""
    backend = NftBackend(rec)
    want = backend.desired(p)
    assert want is not None
    assert parse_table(backend.observe() or "") == parse_table(want)
    assert backend.drift(p) == []
    before = len(rec.transactions)
    assert not backend.apply(p)  # the fixpoint: a second apply writes nothing
    assert len(rec.transactions) == before


def test_a_service_change_is_a_partial_transaction_and_the_table_stays_the_plan(
        ns: Recording) -> None:
    backend = NftBackend(ns)
    p = make_plan(SVCS)
    assert backend.apply(p)
    assert ns.transactions[-1].startswith("add table inet dnsguard\ndelete table")
    in_kernel(ns, p)

    # one Service's port changes: its two chains (IPv4, IPv6) and its dispatch shards (all 200
    # Services share one /24 and one /120: the hooked chains' jumps to them stay as they are)
    shards = shards_of(SVCS[0])
    changed = [*SVCS]
    changed[100] = svc(100, port=8080)
    p = make_plan(changed)
    assert backend.apply(p)
    assert touched(ns.transactions[-1]) == {"flush chain": chains_of(SVCS[100]) | shards,
                                            "add rule": chains_of(SVCS[100]) | shards}
    in_kernel(ns, p)

    # a new Service: its chains are created in the same transaction, and listed last by nft
    changed.append(svc(N))
    p = make_plan(changed)
    assert backend.apply(p)
    assert touched(ns.transactions[-1]) == {"add chain": chains_of(svc(N)),
                                            "flush chain": shards,
                                            "add rule": chains_of(svc(N)) | shards}
    in_kernel(ns, p)

    # a Service removed: its chains are deleted, the others stay as they are
    del changed[50]
    p = make_plan(changed)
    assert backend.apply(p)
    assert touched(ns.transactions[-1]) == {"flush chain": chains_of(SVCS[50]) | shards,
                                            "add rule": shards,
                                            "delete chain": chains_of(SVCS[50])}
    chains = ns.nft("list", "chains", "inet")
    assert not any(f"chain {c} " in chains for c in chains_of(SVCS[50]))
    assert all(f"chain {c} " in chains for c in chains_of(SVCS[51]))
    in_kernel(ns, p)

    assert backend.cleanup()
    assert backend.observe() is None


def test_a_rejected_partial_transaction_changes_nothing(ns: Recording) -> None:
    backend = NftBackend(ns)
    assert backend.apply(make_plan(SVCS))
    before = ns.nft("list", "table", "inet", "dnsguard")
    changed = [*SVCS[:10], *SVCS[11:], svc(N)]  # a chain added, one deleted, shards rewritten
    # the kernel refuses the last line (a chain still holding rules and jumped to) at commit
    # time, after every flush and add before it was accepted
    kept = sorted(chains_of(SVCS[0]))[0]
    ns.poison = f"delete chain inet dnsguard {kept}\n"
    with pytest.raises(RestoreFailed) as err:
        backend.apply(make_plan(changed))
    text = ns.transactions[-1]
    assert "add chain" in text and "flush chain" in text and "delete chain inet dnsguard ext" \
        in text
    # the error names the poisoned line (the runner added it, so the context stops short)
    assert f"stdin:{len(text.splitlines())}:" in str(err.value)
    assert "resource busy" in str(err.value)
    assert ns.nft("list", "table", "inet", "dnsguard") == before
    assert backend.apply(make_plan(changed))  # without the poison it goes through
    in_kernel(ns, make_plan(changed))


def test_the_alive_switch_keeps_its_elements_through_a_partial_sync(ns: Recording) -> None:
    backend = NftBackend(ns)
    p = make_plan(SVCS[:20], NODELOCAL_EXT)
    assert backend.apply(p)
    # an element with a long timeout: what a refresh adds, without racing its 2 s expiry
    ns.nft("add", "element", "inet", "dnsguard", "alive4", f"{{ {CACHE_IP} timeout 1h }}")
    p = make_plan([*SVCS[:20], svc(20)], NODELOCAL_EXT)
    assert backend.apply(p)
    assert set(touched(ns.transactions[-1])) == {"add chain", "flush chain", "add rule"}
    assert f"elements = {{ {CACHE_IP} timeout 1h" in ns.nft("list", "set", "inet", "dnsguard",
                                                            "alive4")
    in_kernel(ns, p)
    # the switch works on a partially synced table; once withdrawn, a partial sync does not
    # turn interception back on
    alive = AliveSwitch(ns, Backend.NFTABLES)
    alive.refresh([CACHE_IP])
    alive.withdraw()
    p = make_plan(SVCS[:19], NODELOCAL_EXT)
    assert backend.apply(p)
    assert "elements" not in ns.nft("list", "set", "inet", "dnsguard", "alive4")
    in_kernel(ns, p)
    # a full replace (here: a new set, the cache also listens on IPv6) resets the elements
    ns.nft("add", "element", "inet", "dnsguard", "alive4", f"{{ {CACHE_IP} timeout 1h }}")
    dual = replace(NODELOCAL_EXT, local_ips=(CACHE_IP, ip("fd00:198:18:ff::10")))
    p = make_plan(SVCS[:19], dual)
    assert backend.apply(p)
    assert ns.transactions[-1].startswith("add table inet dnsguard\ndelete table")
    assert "elements" not in ns.nft("list", "set", "inet", "dnsguard", "alive4")
    in_kernel(ns, p)
