"""Native nftables backend: dnsguard owns one table, ``inet dnsguard``, and nothing else.

The table is read with ``nft list table`` and compared to the rendered plan as text (the renderer
writes nft's own listing form). A change replaces the whole table in one ``nft -f`` transaction
(add, delete, define): atomic in the kernel, and a rejected transaction changes nothing.
"""

from __future__ import annotations

from dnsguard.model import NFT_TABLE
from dnsguard.netfilter.errors import NetfilterError, restore_error
from dnsguard.netfilter.runner import Runner
from dnsguard.plan import Plan
from dnsguard.plan.render import nft_table

__all__ = ["NftBackend", "diff_nft"]


def diff_nft(want: str | None, have: str | None) -> list[str]:
    """Reasons the listed table differs from the rendered one (empty: in sync)."""
    if want == have:
        return []
    if have is None:
        return [f"table inet {NFT_TABLE} is missing"]
    if want is None:
        return [f"table inet {NFT_TABLE} is not planned (stale)"]
    w, h = want.splitlines(), have.splitlines()
    for i, (a, b) in enumerate(zip(w, h, strict=False), start=1):
        if a != b:
            return [f"table inet {NFT_TABLE} line {i} differs: {b.strip()!r}, plan {a.strip()!r}"]
    return [f"table inet {NFT_TABLE} has {len(h)} lines, plan has {len(w)}"]


class NftBackend:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def observe(self) -> str | None:
        res = self.runner.run(["nft", "list", "table", "inet", NFT_TABLE])
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
        want = self.desired(plan)
        if want == have:
            return False
        text = f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n" + (want or "")
        res = self.runner.run(["nft", "-f", "-"], stdin=text)
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
