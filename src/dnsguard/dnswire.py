"""Just enough of the DNS wire format (RFC 1035) for the probe: build a query, read a reply.

Why not a library: the probe must send thousands of queries a second from one Python thread,
and all it needs from a reply is its ID (to pair it with the query, as a stub resolver does),
its rcode, its answer count and that the question echoes ours. Building a query is a single
``struct.pack`` plus pre-encoded name bytes; reading a reply is one ``unpack_from`` of the
12-byte header, with the question and answers decoded only when asked for.

Errors: malformed input raises `DnsWireError` (a `ValueError`), never `struct.error` or
`IndexError`, so callers catch exactly one type at the boundary.
"""

from __future__ import annotations

import enum
import ipaddress
import random
import struct
from dataclasses import dataclass

__all__ = [
    "DnsWireError",
    "Header",
    "QType",
    "Question",
    "Rcode",
    "Record",
    "Reply",
    "build_query",
    "encode_name",
    "parse_header",
    "parse_reply",
    "query_id",
    "rcode_name",
]

_HEADER = struct.Struct("!HHHHHH")
_QTAIL = struct.Struct("!HH")
_RRTAIL = struct.Struct("!HHIH")

#: Query flags: standard query, recursion desired (what every stub resolver sends).
_FLAGS_RD = 0x0100
_CLASS_IN = 1


class DnsWireError(ValueError):
    """The bytes are not a well-formed DNS message (or the name cannot be encoded)."""


class QType(enum.IntEnum):
    A = 1
    CNAME = 5
    AAAA = 28


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


def rcode_name(rcode: int) -> str:
    """``3`` -> ``NXDOMAIN``; codes without a name here print as ``RCODE<n>``."""
    try:
        return Rcode(rcode).name
    except ValueError:
        return f"RCODE{rcode}"


def query_id(rng: random.Random | None = None) -> int:
    """A random 16-bit ID, as stub resolvers pick them (the probe is not a security boundary,
    so the fast Mersenne generator is fine; `secrets` would cost more than the send)."""
    return (rng or random).getrandbits(16)


def encode_name(name: str) -> bytes:
    """``example.com`` (trailing dot optional) -> length-prefixed labels ending in a zero byte."""
    name = name.rstrip(".")
    if not name:
        return b"\x00"
    out = bytearray()
    for label in name.split("."):
        raw = label.encode("idna") if not label.isascii() else label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise DnsWireError(f"bad label {label!r} in {name!r}: must be 1-63 bytes")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise DnsWireError(f"name {name!r} is longer than 255 bytes on the wire")
    return bytes(out)


def build_query(name: str | bytes, qtype: int, qid: int) -> bytes:
    """One question, recursion desired, no EDNS (like glibc's default queries).

    ``name`` may be pre-encoded with `encode_name` so a hot loop encodes each name once.
    """
    wire = name if isinstance(name, bytes) else encode_name(name)
    return _HEADER.pack(qid & 0xFFFF, _FLAGS_RD, 1, 0, 0, 0) + wire + _QTAIL.pack(qtype, _CLASS_IN)


@dataclass(frozen=True)
class Header:
    id: int
    qr: bool
    opcode: int
    aa: bool
    tc: bool
    rd: bool
    ra: bool
    rcode: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int


def parse_header(data: bytes) -> Header:
    if len(data) < _HEADER.size:
        raise DnsWireError(f"message of {len(data)} bytes is shorter than a DNS header")
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    return Header(
        id=qid, qr=bool(flags & 0x8000), opcode=(flags >> 11) & 0xF, aa=bool(flags & 0x0400),
        tc=bool(flags & 0x0200), rd=bool(flags & 0x0100), ra=bool(flags & 0x0080),
        rcode=flags & 0xF, qdcount=qd, ancount=an, nscount=ns, arcount=ar,
    )


@dataclass(frozen=True)
class Question:
    name: str
    qtype: int
    qclass: int


@dataclass(frozen=True)
class Record:
    name: str
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes

    @property
    def address(self) -> str | None:
        """The address of an A or AAAA record, else None."""
        if self.rtype == QType.A and len(self.rdata) == 4:
            return str(ipaddress.IPv4Address(self.rdata))
        if self.rtype == QType.AAAA and len(self.rdata) == 16:
            return str(ipaddress.IPv6Address(self.rdata))
        return None


@dataclass(frozen=True)
class Reply:
    header: Header
    questions: tuple[Question, ...]
    answers: tuple[Record, ...]

    @property
    def rcode(self) -> str:
        return rcode_name(self.header.rcode)


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """Decode a possibly compressed name; return it and the offset just past it in place."""
    labels: list[str] = []
    end: int | None = None
    jumps = 0
    while True:
        if offset >= len(data):
            raise DnsWireError("name runs past the end of the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise DnsWireError("truncated compression pointer")
            jumps += 1
            if jumps > 64:
                raise DnsWireError("compression pointer loop")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length & 0xC0:
            raise DnsWireError(f"unsupported label type 0x{length:02x}")
        offset += 1
        if length == 0:
            break
        if offset + length > len(data):
            raise DnsWireError("label runs past the end of the message")
        labels.append(data[offset:offset + length].decode("ascii", "replace"))
        offset += length
    return ".".join(labels) + ".", (end if end is not None else offset)


def parse_reply(data: bytes) -> Reply:
    """Header, questions and answer records (authority and additional are not read)."""
    header = parse_header(data)
    offset = _HEADER.size
    questions: list[Question] = []
    answers: list[Record] = []
    try:
        for _ in range(header.qdcount):
            name, offset = _read_name(data, offset)
            qtype, qclass = _QTAIL.unpack_from(data, offset)
            offset += _QTAIL.size
            questions.append(Question(name, qtype, qclass))
        for _ in range(header.ancount):
            name, offset = _read_name(data, offset)
            rtype, rclass, ttl, rdlen = _RRTAIL.unpack_from(data, offset)
            offset += _RRTAIL.size
            if offset + rdlen > len(data):
                raise DnsWireError("record data runs past the end of the message")
            answers.append(Record(name, rtype, rclass, ttl, data[offset:offset + rdlen]))
            offset += rdlen
    except struct.error:
        raise DnsWireError("message is truncated inside a question or record") from None
    return Reply(header, tuple(questions), tuple(answers))
