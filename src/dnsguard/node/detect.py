"""Detect kube-proxy's mode and the iptables flavour, saying what evidence was found.

Proxy mode: IPVS first (ipvs mode also creates ``KUBE-SERVICES``), then kube-proxy's nftables
tables, then its iptables chains. Backend: like Kubernetes' iptables-wrapper, the flavour that
holds more rules wins and a tie goes to nft; in nftables mode dnsguard writes native nft.

Detection only reads. ``iptables-legacy-save -t nat`` is not a read: asking the legacy kernel
for a table it does not hold makes it instantiate that table in the namespace (a new, empty
legacy nat table on an nft-only node, which other tools then see). So the legacy tables that
exist are read from ``/proc/net/ip_tables_names`` (``ip6_tables_names``) first, and only those
are saved; `dnsguard plan` and `dnsguard status` leave the node as they found it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from dnsguard.model import Backend, Family, ProxyMode
from dnsguard.netfilter.errors import CommandNotFound
from dnsguard.netfilter.runner import Runner

__all__ = ["Detected", "detect_backend", "detect_proxy_mode", "legacy_tables", "node_families"]


T = TypeVar("T")


@dataclass(frozen=True)
class Detected(Generic[T]):
    value: T
    evidence: str


def _try(runner: Runner, argv: list[str]) -> str:
    try:
        res = runner.run(argv)
    except CommandNotFound:
        return ""
    return res.stdout if res.ok else ""


def legacy_tables(family: Family, proc_root: Path = Path("/proc")) -> frozenset[str]:
    """iptables-legacy tables that exist in this network namespace (none if unreadable)."""
    name = "ip_tables_names" if family is Family.V4 else "ip6_tables_names"
    try:
        return frozenset((proc_root / "net" / name).read_text().split())
    except OSError:
        return frozenset()


def detect_proxy_mode(
    runner: Runner, proc_root: Path = Path("/proc"),
) -> Detected[ProxyMode] | None:
    """kube-proxy's mode from what it leaves on the node, or None when no trace is found."""
    if _try(runner, ["ip", "-o", "link", "show", "kube-ipvs0"]):
        return Detected(ProxyMode.IPVS, "link kube-ipvs0 exists")
    try:
        services = (proc_root / "net/ip_vs").read_text().splitlines()[3:]
    except OSError:
        services = []
    if services:
        return Detected(ProxyMode.IPVS, f"{len(services)} IPVS lines in /proc/net/ip_vs")
    tables = _try(runner, ["nft", "list", "tables"])
    for fam in ("ip", "ip6"):
        if f"table {fam} kube-proxy" in tables.splitlines():
            return Detected(ProxyMode.NFTABLES, f"nft table {fam} kube-proxy exists")
    for flavour in ("nft", "legacy"):
        if flavour == "legacy" and "nat" not in legacy_tables(Family.V4, proc_root):
            continue  # saving it would create it
        if ":KUBE-SERVICES" in _try(runner, [f"iptables-{flavour}-save", "-t", "nat"]):
            return Detected(ProxyMode.IPTABLES, f"chain KUBE-SERVICES in iptables-{flavour} nat")
    return None


def _rule_count(runner: Runner, flavour: str, proc_root: Path) -> int:
    text = ""
    for family, tool in ((Family.V4, "iptables"), (Family.V6, "ip6tables")):
        if flavour == "legacy" and not legacy_tables(family, proc_root):
            continue  # nothing to count, and no reason to load the legacy modules
        text += _try(runner, [f"{tool}-{flavour}-save"])  # all tables: only existing ones
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


def detect_backend(runner: Runner, proxy_mode: ProxyMode,
                   proc_root: Path = Path("/proc")) -> Detected[Backend]:
    if proxy_mode is ProxyMode.NFTABLES:
        return Detected(Backend.NFTABLES, "kube-proxy runs in nftables mode")
    legacy = _rule_count(runner, "legacy", proc_root)
    nft = _rule_count(runner, "nft", proc_root)
    if legacy > nft:
        return Detected(Backend.IPTABLES_LEGACY, f"iptables-legacy holds {legacy} rules, nft {nft}")
    return Detected(Backend.IPTABLES_NFT, f"iptables-nft holds {nft} rules, legacy {legacy}")


def node_families(proc_root: Path = Path("/proc")) -> frozenset[Family]:
    """Families this node can carry; IPv6 only when the kernel has it enabled."""
    if (proc_root / "net/if_inet6").exists():
        return frozenset({Family.V4, Family.V6})
    return frozenset({Family.V4})
