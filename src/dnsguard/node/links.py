"""The link the node-local cache listens on: ``dnsguard0``, owned by dnsguard alone.

A ``dummy`` link is what NodeLocal DNSCache uses; kernels built without it (like this project's
CI host) get a port-less ``bridge`` instead, which holds local addresses just as well. Addresses
are added as host routes (/32, /128) with ``nodad`` so they are usable at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from dnsguard.model import IPAddress
from dnsguard.netfilter.errors import NetfilterError
from dnsguard.netfilter.runner import Runner

__all__ = ["LINK", "LinkError", "address_owners", "ensure_link", "remove_link"]

LINK = "dnsguard0"
log = logging.getLogger("dnsguard.links")


class LinkError(NetfilterError):
    reason = "link"


def _ip(runner: Runner, *args: str, check: bool = True) -> str:
    res = runner.run(["ip", *args])
    if check and not res.ok:
        raise LinkError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout if res.ok else ""


def address_owners(runner: Runner) -> dict[str, str]:
    """Every address on the node -> the link holding it."""
    owners: dict[str, str] = {}
    for link in json.loads(_ip(runner, "-j", "addr", "show") or "[]"):
        for a in link.get("addr_info", []):
            owners[a["local"]] = link["ifname"]
    return owners


def ensure_link(runner: Runner, addrs: Iterable[IPAddress]) -> str:
    """Create ``dnsguard0`` if needed and make it hold exactly ``addrs``; return its kind.

    Raises LinkError when an address is already on another link: serving it would steal
    traffic from whoever owns it.
    """
    want = {str(a): a for a in addrs}
    owners = address_owners(runner)
    for text in want:
        owner = owners.get(text)
        if owner is not None and owner != LINK:
            raise LinkError(f"--local-ip {text} is already on link {owner}; pick another address")
    kind = _link_kind(runner)
    if kind is None:
        for kind in ("dummy", "bridge"):
            if runner.run(["ip", "link", "add", LINK, "type", kind]).ok:
                break
        else:
            raise LinkError(f"cannot create link {LINK}: neither dummy nor bridge links work")
        if kind != "dummy":
            log.info("this kernel has no dummy links; %s is a port-less %s", LINK, kind)
    _ip(runner, "link", "set", LINK, "up")
    # the kernel's own IPv6 link-local address is not ours to manage
    have = {a for a, link in address_owners(runner).items()
            if link == LINK and not a.lower().startswith("fe80:")}
    for text in sorted(have - set(want)):
        _ip(runner, "addr", "del", f"{text}/{_plen(text)}", "dev", LINK)
    for text in sorted(set(want) - have):
        extra = ["nodad"] if ":" in text else []
        _ip(runner, "addr", "add", f"{text}/{_plen(text)}", "dev", LINK, *extra)
    return kind


def _plen(text: str) -> int:
    return 128 if ":" in text else 32


def _link_kind(runner: Runner) -> str | None:
    out = _ip(runner, "-j", "-d", "link", "show", LINK, check=False)
    if not out:
        return None
    info = json.loads(out)[0].get("linkinfo", {})
    return str(info.get("info_kind", "unknown"))


def remove_link(runner: Runner) -> bool:
    """Delete ``dnsguard0`` (and with it every address on it); True when it existed."""
    if _link_kind(runner) is None:
        return False
    _ip(runner, "link", "del", LINK)
    return True
