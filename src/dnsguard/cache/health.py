"""The health check: one real DNS query that only the cache itself can answer correctly.

The question is a TXT record served from unbound's local data on a loopback port, so a reply
proves the cache process is up and answering, and cannot come from anywhere else (a fallback
path would answer NXDOMAIN or nothing).
"""

from __future__ import annotations

import random
import socket

from dnsguard.dnswire import DnsWireError, Reply, build_query, parse_reply
from dnsguard.plan.cache import HEALTH_NAME, HEALTH_TXT

__all__ = ["check", "check_upstream"]

TXT = 16


def check(port: int, timeout: float = 0.5, host: str = "127.0.0.1") -> str | None:
    """None when the cache itself answers, else a short reason."""
    reply = _ask(HEALTH_NAME, TXT, port, timeout, host)
    if isinstance(reply, str):
        return reply
    if reply.rcode != "NOERROR":
        return f"answered {reply.rcode}"
    if not any(HEALTH_TXT.encode() in r.rdata for r in reply.answers if r.rtype == TXT):
        return "answer without the health record"
    return None


def check_upstream(port: int, domain: str, timeout: float = 2.0,
                   host: str = "127.0.0.1") -> str | None:
    """None when the cache reached its cluster upstreams for a name it cannot have cached."""
    name = f"dnsguard-probe-{random.randrange(1 << 32):08x}.{domain}."
    reply = _ask(name, 1, port, timeout, host)
    if isinstance(reply, str):
        return f"upstream probe: {reply}"
    if reply.rcode in ("SERVFAIL", "REFUSED"):
        return f"upstream probe answered {reply.rcode}: cluster DNS upstreams unreachable"
    return None


def _ask(name: str, qtype: int, port: int, timeout: float, host: str) -> Reply | str:
    qid = random.randrange(1 << 16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(build_query(name, qtype, qid), (host, port))
            while True:
                data = sock.recv(4096)
                try:
                    reply = parse_reply(data)
                except DnsWireError as exc:
                    return f"malformed reply: {exc}"
                if reply.header.id == qid:
                    break
        except TimeoutError:
            return f"no answer within {timeout:g}s"
        except OSError as exc:
            return f"query failed: {exc.strerror or exc}"
    return reply
