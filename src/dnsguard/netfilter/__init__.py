"""The only package that runs iptables, ip6tables and nft.

`Netfilter` puts one backend behind three verbs the agent needs: ``drift`` (why the kernel
differs from a plan), ``apply`` (make it hold exactly the plan, one atomic transaction per table
and family) and ``cleanup`` (remove all dnsguard owns, on every backend, and nothing else).
"""

from __future__ import annotations

from collections.abc import Iterable

from dnsguard.model import NFT_TABLE, Backend, Family
from dnsguard.netfilter.errors import (
    CommandNotFound,
    LockHeld,
    NetfilterError,
    RestoreFailed,
)
from dnsguard.netfilter.iptables import IptablesBackend
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
    "SubprocessRunner",
    "cleanup",
    "inventory",
]


def _label(family: Family) -> str:
    return f"ipv{family.value}"


class Netfilter:
    """dnsguard's rules on one backend for the given families."""

    def __init__(self, runner: Runner, backend: Backend, families: Iterable[Family]) -> None:
        self.runner = runner
        self.backend = backend
        self.families = tuple(sorted(set(families), key=lambda f: f.value))
        self._ipt = IptablesBackend(runner, backend) if backend.is_iptables else None
        self._nft = NftBackend(runner) if backend is Backend.NFTABLES else None

    def drift(self, plan: Plan) -> list[str]:
        """Why the kernel differs from ``plan``; empty when it holds exactly the plan."""
        if self._nft is not None:
            return self._nft.drift(plan)
        assert self._ipt is not None
        return [f"{_label(f)}/{table.value}: {reason}"
                for f in self.families
                for table, reasons in self._ipt.drift(plan, f).items()
                for reason in reasons]

    def apply(self, plan: Plan) -> list[str]:
        """Write what differs, one transaction per table and family; return what was written."""
        if self._nft is not None:
            return [f"inet {NFT_TABLE}"] if self._nft.apply(plan) else []
        assert self._ipt is not None
        return [f"{_label(f)}/{t.value}" for f in self.families for t in self._ipt.apply(plan, f)]

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
