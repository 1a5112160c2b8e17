"""The kernel's own parsers as the judge of rendered text, in a scratch network namespace.

``nft -c -f`` and ``iptables-restore --test`` parse and check a transaction without committing
it; they still run against a namespace, so each check gets a fresh one (``dgprop-`` and a
random suffix), removed afterwards even when the check fails. Nothing is applied: the
namespace only gives the tools a kernel to ask about matches and targets.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from dnsguard.model import Backend, Family
from dnsguard.netfilter.iptables import TableState, desired_tables, restore_text
from dnsguard.plan import Plan
from dnsguard.plan.render import nft_table

_TOOLS = ("ip", "nft", "iptables-legacy-restore", "iptables-nft-restore",
          "ip6tables-legacy-restore", "ip6tables-nft-restore")


def unavailable() -> str | None:
    """Why the kernel tools cannot judge here (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "needs root (a network namespace)"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    return f"missing tools: {', '.join(missing)}" if missing else None


@contextmanager
def scratch_netns() -> Iterator[str]:
    name = f"dgprop-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _run(ns: str, argv: list[str], text: str) -> str | None:
    """None when the tool accepts ``text``, else its stderr."""
    res = subprocess.run(["ip", "netns", "exec", ns, *argv], check=False, input=text, text=True,
                         capture_output=True, timeout=60)
    return None if res.returncode == 0 else (res.stderr or f"exit {res.returncode}")


def kernel_rejections(ns: str, p: Plan) -> dict[str, str]:
    """Every backend's verdict on the plan's transaction from an empty node: {what: stderr}."""
    errors: dict[str, str] = {}
    nft = _run(ns, ["nft", "-c", "-f", "-"], nft_table(p.rulesets)) if p.rulesets else None
    if nft is not None:
        errors["nftables"] = nft
    for backend in (Backend.IPTABLES_LEGACY, Backend.IPTABLES_NFT):
        flavour = backend.value.split("-")[1]
        for rs in p.rulesets:
            tool = f"{'iptables' if rs.family is Family.V4 else 'ip6tables'}-{flavour}-restore"
            text = "".join(restore_text(table, want, TableState())
                           for table, want in desired_tables(p, rs.family).items())
            if (err := _run(ns, [tool, "--noflush", "--test"], text)) is not None:
                errors[tool] = err
    return errors
