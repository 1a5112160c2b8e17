"""The health checks: real DNS queries that only the cache itself can answer correctly.

The door check asks each listen address on port 53, the way a pod reaches it, for a TXT record
served from unbound's local data: a reply proves the cache answers *there* (process up, link up,
address on it, rules letting it through), and cannot come from anywhere else (a fallback path
would answer NXDOMAIN or nothing). Its socket carries `PROBE_MARK`, which dnsguard's raw OUTPUT
rules untrack unconditionally, so the question reaches the cache even while the dead man's
switch is off; otherwise interception, once off, could never be proven healthy again.

The upstream probes ask for a random name in the cluster domain, once through the cache
(loopback health port) and once through kube-proxy's path (the DNS ClusterIP with
`BYPASS_MARK`, which dnsguard's interception lets pass), so the agent can tell "the cache's way
to the cluster DNS is broken" from "the cluster DNS is down".
"""

from __future__ import annotations

import random
import select
import socket
import time
from collections.abc import Sequence

from dnsguard.dnswire import DnsWireError, Reply, build_query, parse_reply
from dnsguard.model import BYPASS_MARK, DNS_PORT, PROBE_MARK, IPAddress
from dnsguard.plan.cache import HEALTH_NAME, HEALTH_TXT

__all__ = ["check", "check_bypass", "check_doors", "check_upstream"]

TXT = 16
A = 1
#: a healthy cache answers local data in well under a millisecond; a beat must stay short
DOOR_TIMEOUT = 0.5


def check(port: int, timeout: float = 0.5, host: str = "127.0.0.1") -> str | None:
    """None when the cache itself answers on ``host:port``, else a short reason."""
    return _health_verdict(_ask(HEALTH_NAME, TXT, host, port, timeout=timeout))


def check_doors(addrs: Sequence[IPAddress], timeout: float = DOOR_TIMEOUT,
                mark: int = PROBE_MARK) -> dict[IPAddress, str | None]:
    """Ask every address on port 53 at once; per address None when the cache answered.

    All questions are in flight together (one socket per family), so a hung cache costs one
    ``timeout`` per beat, not one per address.
    """
    out: dict[IPAddress, str | None] = {a: f"no answer within {timeout:g}s" for a in addrs}
    socks: dict[int, socket.socket] = {}
    pending: dict[tuple[str, int], IPAddress] = {}
    try:
        for addr in addrs:
            sock = socks.get(addr.version)
            if sock is None:
                try:
                    sock = socks[addr.version] = _socket(addr.version, mark)
                except OSError as exc:
                    out[addr] = f"query failed: {exc.strerror or exc}"
                    continue
            qid = random.randrange(1 << 16)
            try:
                sock.sendto(build_query(HEALTH_NAME, TXT, qid), (str(addr), DNS_PORT))
            except OSError as exc:
                out[addr] = f"query failed: {exc.strerror or exc}"
                continue
            pending[(str(addr), qid)] = addr
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(socks.values()), [], [], left)
            for sock in ready:
                try:
                    data, src = sock.recvfrom(4096)
                    reply = parse_reply(data)
                except (OSError, DnsWireError):
                    continue  # an ICMP error or junk: that address stays unanswered
                addr_or_none = pending.pop((src[0], reply.header.id), None)
                if addr_or_none is not None:
                    out[addr_or_none] = _health_verdict(reply)
    finally:
        for sock in socks.values():
            sock.close()
    return out


def check_upstream(port: int, domain: str, timeout: float = 2.0,
                   host: str = "127.0.0.1") -> str | None:
    """None when the cache reached its cluster upstreams for a name it cannot have cached."""
    reply = _ask(_random_name(domain), A, host, port, timeout=timeout)
    if isinstance(reply, str):
        return f"upstream probe: {reply}"
    if reply.rcode in ("SERVFAIL", "REFUSED"):
        return f"upstream probe answered {reply.rcode}: cluster DNS upstreams unreachable"
    return None


def check_bypass(cluster_ip: IPAddress, domain: str, timeout: float = 2.0,
                 mark: int = BYPASS_MARK) -> str | None:
    """None when the cluster DNS answered on ``cluster_ip`` through kube-proxy's path."""
    reply = _ask(_random_name(domain), A, str(cluster_ip), DNS_PORT, timeout=timeout, mark=mark)
    if isinstance(reply, str):
        return reply
    if reply.rcode in ("SERVFAIL", "REFUSED"):
        return f"answered {reply.rcode}"
    return None


def _random_name(domain: str) -> str:
    return f"dnsguard-probe-{random.randrange(1 << 32):08x}.{domain}."


def _health_verdict(reply: Reply | str) -> str | None:
    if isinstance(reply, str):
        return reply
    if reply.rcode != "NOERROR":
        return f"answered {reply.rcode}"
    if not any(HEALTH_TXT.encode() in r.rdata for r in reply.answers if r.rtype == TXT):
        return "answer without the health record"
    return None


def _socket(version: int, mark: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET if version == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    if mark is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        except OSError:
            sock.close()
            raise
    return sock


def _ask(name: str, qtype: int, host: str, port: int, *, timeout: float,
         mark: int | None = None) -> Reply | str:
    qid = random.randrange(1 << 16)
    try:
        sock = _socket(6 if ":" in host else 4, mark)
    except OSError as exc:
        return f"cannot open a probe socket: {exc.strerror or exc}"
    with sock:
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
