"""Render-time checks: no renderer emits a value it did not validate.

Values reach rule text and unbound.conf from flags, the environment and the Kubernetes API.
`dnsguard.config` and the extractors validate them on the way in, but a renderer writes text
another parser reads (iptables-restore, nft, unbound), where one stray newline or quote turns
data into a directive. So every address, port, name and comment is checked again here, at the
last moment, against what the text format and the kernel accept:

- addresses: no zone ID (Python's `ipaddress` keeps ``fd00::1%<anything>``, newlines included,
  and prints it back), and of the family the rule or table is for;
- ports: 1-65535;
- names and comments: printable ASCII only (no control characters, no quotes or backslashes,
  which both restore formats would have to escape) and within the backend's length limit.
  nft refuses comments over 128 bytes ("comment too long"), and iptables silently truncates
  one over 255 (the kernel's 256-byte field ends in a NUL), which would make the diff see a
  change on every sync. `fit_comment` shortens a long comment deterministically, keeping it
  unique with a hash of the whole text, so one long Service name cannot fail a transaction.

A failed check raises `UnsafeValue`: the planner checks each Service's values with the same
functions first and leaves out a Service that fails, so a renderer that still meets one is a
bug, and refusing the transaction is then the safe outcome.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from dnsguard.model import Family, IPAddress, IPNetwork

__all__ = ["IPTABLES_COMMENT_MAX", "NFT_COMMENT_MAX", "UnsafeValue", "check_addr", "check_chain",
           "check_net", "check_port", "check_text", "fit_comment", "short_label"]

#: bytes of a comment nft accepts (NFTNL_UDATA_COMMENT_MAXLEN)
NFT_COMMENT_MAX = 128
#: bytes of a comment xt_comment keeps (a 256-byte field including its NUL)
IPTABLES_COMMENT_MAX = 255

#: printable ASCII without quotes and backslash: text both restore formats take verbatim
_SAFE_TEXT = re.compile(r"[ !#-&(-\[\]-~]*")
#: a chain name we generate: iptables allows 28 characters
_CHAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,27}")


class UnsafeValue(ValueError):
    """A value that must not reach rule or config text; the message names it (repr)."""


def check_addr(ip: object, family: Family | None = None) -> IPAddress:
    """``ip`` as an address without a zone ID, of ``family`` when given."""
    # exact types and no enum property: called for every address of every rule (~70k a sync
    # at 10k Services)
    if type(ip) is ipaddress.IPv4Address:
        ok = family is not Family.V6
    elif type(ip) is ipaddress.IPv6Address:
        if ip.scope_id is not None:
            raise UnsafeValue(f"address with a zone ID: {str(ip)!r}")
        ok = family is not Family.V4
    else:
        raise UnsafeValue(f"not an IP address: {ip!r}")
    if not ok:
        raise UnsafeValue(f"IPv{ip.version} address {ip} in an IPv{family and family.value} rule")
    return ip


def check_net(net: object, family: Family | None = None) -> IPNetwork:
    """``net`` as a network without a zone ID, of ``family`` when given."""
    if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise UnsafeValue(f"not an IP network: {net!r}")
    check_addr(net.network_address, family)
    return net


def check_port(port: object) -> int:
    # bool is an int; a port is never True
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise UnsafeValue(f"not a port number (1-65535): {port!r}")
    return port


def check_text(text: str, what: str = "text") -> str:
    """``text`` if it is printable ASCII without quotes or backslashes."""
    if not _SAFE_TEXT.fullmatch(text):
        raise UnsafeValue(f"{what} with a control, quote, backslash or non-ASCII character: "
                          f"{text!r}")
    return text


def check_chain(name: str) -> str:
    """A chain name as we generate them: letters, digits, ``-`` and ``_``, up to 28."""
    if not _CHAIN.fullmatch(name):
        raise UnsafeValue(f"not a chain name: {name!r}")
    return name


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def fit_comment(text: str, limit: int) -> str:
    """``text`` checked, cut to ``limit`` bytes if longer: a prefix, ``~`` and a hash of it all.

    Deterministic, so every node and every sync renders the same comment; the hash keeps two
    long comments that share their first ``limit - 9`` bytes apart.
    """
    check_text(text, "comment")
    if len(text) <= limit:  # ASCII: characters are bytes
        return text
    return f"{text[:limit - 9]}~{_digest(text)}"


def short_label(text: str, limit: int = 48) -> str:
    """A user-controlled name for a comment: as is when short and safe, else cut and hashed.

    Safe characters of the name survive (so a long name stays recognisable); the hash is of
    the original, so different names never share a label.
    """
    if len(text) <= limit and _SAFE_TEXT.fullmatch(text):
        return text
    kept = "".join(c if _SAFE_TEXT.fullmatch(c) else "?" for c in text[:limit - 9])
    return f"{kept}~{_digest(text)}"
