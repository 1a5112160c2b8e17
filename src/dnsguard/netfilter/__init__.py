"""The only package that runs iptables, ip6tables and nft.

`Netfilter` puts one backend behind the verbs the agent needs: ``observe`` (one read of the
kernel, shared by the next two), ``drift`` (why the kernel
differs from a plan), ``apply`` (make it hold exactly the plan, one atomic transaction per table
and family) and ``cleanup`` (remove all dnsguard owns, on every backend, and nothing else).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dnsguard.model import NFT_TABLE, Backend, Family
from dnsguard.netfilter.errors import (
    CommandNotFound,
    LockHeld,
    NetfilterError,
    RestoreFailed,
)
from dnsguard.netfilter.iptables import IptablesBackend, Tables
from dnsguard.netfilter.nft import NftBackend
from dnsguard.netfilter.runner import Completed, Runner, SubprocessRunner
from dnsguard.plan import Plan

__all__ = [
    "CommandNotFound",
    "Completed",
    "LockHeld",
    "Netfilter",
    "NetfilterError",
    "RestoreFailed",
    "Runner",
    "Snapshot",
    "SubprocessRunner",
    "cleanup",
    "inventory",
]


def _label(family: Family) -> str:
    return f"ipv{family.value}"


@dataclass(frozen=True)
class Snapshot:
    """What the kernel held when read: nft's table listing, or iptables' tables per family."""

    nft: str | None = None
    ipt: dict[Family, Tables] = field(default_factory=dict)


class Netfilter:
    """dnsguard's rules on one backend for the given families."""

    def __init__(self, runner: Runner, backend: Backend, families: Iterable[Family]) -> None:
        self.runner = runner
        self.backend = backend
        self.families = tuple(sorted(set(families), key=lambda f: f.value))
        self._ipt = IptablesBackend(runner, backend) if backend.is_iptables else None
        self._nft = NftBackend(runner) if backend is Backend.NFTABLES else None

    def observe(self) -> Snapshot:
        """Read what the kernel holds, once, for a ``drift`` and an ``apply`` to share.

        At 10k Services a read is seconds of ``iptables-save``/``nft list`` and tens of MiB of
        parsed rules: a sync reads before it writes and once more to verify, never twice before.
        """
        if self._nft is not None:
            return Snapshot(nft=self._nft.observe())
        assert self._ipt is not None
        return Snapshot(ipt={f: self._ipt.observe(f) for f in self.families})

    def drift(self, plan: Plan, have: Snapshot | None = None) -> list[str]:
        """Why the kernel differs from ``plan``; empty when it holds exactly the plan."""
        have = self.observe() if have is None else have
        if self._nft is not None:
            return self._nft.drift(plan, have.nft, observed=True)
        assert self._ipt is not None
        return [f"{_label(f)}/{table.value}: {reason}"
                for f in self.families
                for table, reasons in self._ipt.drift(plan, f, have.ipt[f]).items()
                for reason in reasons]

    def apply(self, plan: Plan, have: Snapshot | None = None) -> list[str]:
        """Write what differs, one transaction per table and family; return what was written."""
        have = self.observe() if have is None else have
        if self._nft is not None:
            return [f"inet {NFT_TABLE}"] if self._nft.apply(plan, have.nft, observed=True) else []
        assert self._ipt is not None
        return [f"{_label(f)}/{t.value}" for f in self.families
                for t in self._ipt.apply(plan, f, have.ipt[f])]

    def cleanup_other_backends(self) -> list[str]:
        """Remove what an earlier run left on a backend other than ours (backend switched)."""
        return cleanup(self.runner, self.families, skip=self.backend)


def cleanup(runner: Runner, families: Iterable[Family],
            skip: Backend | None = None) -> list[str]:
    """Remove every dnsguard chain, jump and table on every backend; return what was removed.

    A backend whose tools are not installed cannot hold anything of ours and is passed over.
    """
    removed: list[str] = []
    fams = tuple(sorted(set(families), key=lambda f: f.value))
    for backend in Backend:
        if backend is skip:
            continue
        try:
            if backend is Backend.NFTABLES:
                if NftBackend(runner).cleanup():
                    removed.append(f"nftables: table inet {NFT_TABLE}")
            else:
                removed += [f"{backend.value}: {_label(f)}/{t.value}"
                            for f, t in IptablesBackend(runner, backend).cleanup(fams)]
        except CommandNotFound:
            continue
    return removed


def inventory(runner: Runner, families: Iterable[Family]) -> list[str]:
    """What dnsguard owns right now on every backend, one line per chain or table."""
    lines: list[str] = []
    for backend in Backend:
        try:
            if backend is Backend.NFTABLES:
                table = NftBackend(runner).observe()
                if table is not None:
                    rules = sum(1 for ln in table.splitlines() if " comment " in ln)
                    lines.append(f"nftables: table inet {NFT_TABLE} ({rules} rules)")
                continue
            ipt = IptablesBackend(runner, backend)
            for family in families:
                for tbl, st in ipt.observe(family).items():
                    for name, chain_rules in st.chains.items():
                        hooks = [h for h, j in st.jumps.items()
                                 if any(t[-1] == name for _, t in j)]
                        lines.append(
                            f"{backend.value}: {_label(family)}/{tbl.value} {name} "
                            f"({len(chain_rules)} rules, "
                            f"jumped to from {', '.join(hooks) or 'nowhere'})")
        except CommandNotFound:
            continue
    return lines
