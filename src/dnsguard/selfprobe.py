"""The agent's low-rate self probe: one glibc-style lookup at a time, for a latency histogram.

A and AAAA go out back to back from one fresh UDP socket (new source port each time), exactly
the pattern that races in conntrack, and the lookup counts as answered when both replies are in.
"""

from __future__ import annotations

import random
import socket
import time

from dnsguard.dnswire import DnsWireError, build_query, parse_header

__all__ = ["lookup"]


def lookup(server: str, name: str, timeout: float = 5.0) -> float | None:
    """Seconds until both answers arrived, or None on timeout or error."""
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    ids = {random.randrange(1 << 16), random.randrange(1 << 16)}
    while len(ids) < 2:
        ids.add(random.randrange(1 << 16))
    qa, qaaaa = sorted(ids)
    start = time.monotonic()
    with socket.socket(fam, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((server, 53))
            sock.send(build_query(name, 1, qa))
            sock.send(build_query(name, 28, qaaaa))
            pending = {qa, qaaaa}
            while pending:
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    return None
                sock.settimeout(left)
                try:
                    pending.discard(parse_header(sock.recv(4096)).id)
                except DnsWireError:
                    continue
        except OSError:
            return None
    return time.monotonic() - start
