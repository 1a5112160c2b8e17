"""DNS wire format: queries byte for byte, replies with compression, and one error type."""

from __future__ import annotations

import random
import struct

import pytest

from dnsguard.dnswire import (
    DnsWireError,
    QType,
    build_query,
    encode_name,
    parse_header,
    parse_reply,
    query_id,
    rcode_name,
)


def test_query_is_one_question_with_recursion_desired_and_no_edns() -> None:
    wire = build_query("svc-0.default.svc.cluster.local.", QType.AAAA, 0xBEEF)
    assert wire[:12] == bytes.fromhex("beef 0100 0001 0000 0000 0000")
    assert wire[12:] == (b"\x05svc-0\x07default\x03svc\x07cluster\x05local\x00"
                         + struct.pack("!HH", 28, 1))
    # The trailing dot is optional and pre-encoded names give the same bytes.
    assert build_query("svc-0.default.svc.cluster.local", 28, 0xBEEF) == wire
    assert build_query(encode_name("svc-0.default.svc.cluster.local"), 28, 0xBEEF) == wire


def test_query_ids_are_random_16_bit() -> None:
    rng = random.Random(7)
    ids = {query_id(rng) for _ in range(200)}
    assert all(0 <= i <= 0xFFFF for i in ids)
    assert len(ids) > 190  # not a counter, not constant


@pytest.mark.parametrize("name", ["a..b", "x" * 64 + ".com", ".".join(["abcdefghij"] * 26)])
def test_unencodable_names_raise_wire_error(name: str) -> None:
    with pytest.raises(DnsWireError):
        encode_name(name)


def _reply(qid: int, rcode: int, answers: list[tuple[int, bytes]], flags: int = 0x8180) -> bytes:
    """A reply to 'host.example' whose answers point back at the question (0xC00C)."""
    question = encode_name("host.example") + struct.pack("!HH", 1, 1)
    body = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, 30, len(rdata)) + rdata
                    for rtype, rdata in answers)
    header = struct.pack("!HHHHHH", qid, flags | rcode, 1, len(answers), 0, 0)
    return header + question + body


def test_reply_header_question_and_compressed_answers() -> None:
    data = _reply(0x1234, 0, [(1, bytes([198, 18, 0, 5])),
                              (28, bytes.fromhex("fd000198001800000000000000000005"))])
    reply = parse_reply(data)
    assert reply.header.id == 0x1234
    assert reply.header.qr and reply.header.rd and reply.header.ra
    assert reply.rcode == "NOERROR"
    assert reply.header.ancount == 2
    assert reply.questions[0].name == "host.example."
    assert [r.name for r in reply.answers] == ["host.example.", "host.example."]
    assert [r.address for r in reply.answers] == ["198.18.0.5", "fd00:198:18::5"]
    assert reply.answers[0].ttl == 30


def test_rcodes_have_names_and_unknown_ones_a_number() -> None:
    assert parse_reply(_reply(1, 3, [])).rcode == "NXDOMAIN"
    assert parse_reply(_reply(1, 2, [])).rcode == "SERVFAIL"
    assert rcode_name(5) == "REFUSED"
    assert rcode_name(11) == "RCODE11"


@pytest.mark.parametrize("data", [
    b"\x00\x01",                                        # shorter than a header
    _reply(1, 0, [(1, b"\x01\x02\x03\x04")])[:-3],      # record data cut short
    _reply(1, 0, [])[:20],                              # question cut short
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c",  # pointer to itself
])
def test_malformed_replies_raise_wire_error_only(data: bytes) -> None:
    with pytest.raises(DnsWireError):
        parse_reply(data)


def test_header_only_parse_is_enough_to_pair_replies() -> None:
    h = parse_header(_reply(0xABCD, 3, []))
    assert (h.id, h.qr, h.rcode, h.ancount) == (0xABCD, True, 3, 0)
