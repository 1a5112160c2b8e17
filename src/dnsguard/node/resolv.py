"""The node's own resolv.conf: where the cache sends names outside the cluster domain."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from dnsguard.model import IPAddress

__all__ = ["nameservers"]


def nameservers(path: Path) -> tuple[IPAddress, ...]:
    """``nameserver`` addresses in order; unreadable files and bad lines give nothing."""
    out: list[IPAddress] = []
    try:
        text = path.read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            if ip not in out:
                out.append(ip)
    return tuple(out)
