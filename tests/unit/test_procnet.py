"""/proc readers: DNS server processes by comm and namespace, UDP MIBs, sockets, resolv.conf."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dnsguard.node.procnet import (
    decode_proc_addr,
    find_dns_servers,
    listening_udp,
    parse_resolv_conf,
    parse_snmp,
    parse_udp_sockets,
    read_udp_counters,
)

SNMP = """\
Ip: Forwarding DefaultTTL
Ip: 1 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 1000 3 25 990 20 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 7 0 0 0 0
"""
SNMP6 = "Udp6InDatagrams                 \t50\nUdp6InErrors  4\nUdp6RcvbufErrors 4\n"


def _udp_line(hexaddr: str, port: int, drops: int) -> str:
    return (f"  1: {hexaddr}:{port:04X} 00000000:0000 07 00000000:00000000 00:00000000 "
            f"00000000     0        0 1234 2 0000000000000000 {drops}")


UDP_HEADER = ("   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   "
              "uid  timeout inode ref pointer drops")


def _hex4(addr: bytes) -> str:
    """How the kernel prints an IPv4 address: one host-order 32-bit word."""
    return f"{int.from_bytes(addr, sys.byteorder):08X}"


def test_snmp_reads_udp_and_not_udplite() -> None:
    udp = parse_snmp(SNMP)
    assert udp["RcvbufErrors"] == 20 and udp["InDatagrams"] == 1000


def test_proc_addresses_decode_on_this_machine() -> None:
    assert decode_proc_addr(_hex4(bytes([169, 254, 20, 10]))) == "169.254.20.10"
    words = bytes.fromhex("fd000198001800000000000000000101")
    hexaddr = "".join(f"{int.from_bytes(words[i:i + 4], sys.byteorder):08X}"
                      for i in range(0, 16, 4))
    assert decode_proc_addr(hexaddr) == "fd00:198:18::101"


def make_proc(root: Path, procs: dict[int, tuple[str, str]]) -> None:
    for pid, (comm, netns) in procs.items():
        d = root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "net").mkdir()
        (d / "comm").write_text(comm + "\n")
        (d / "ns/net").symlink_to(netns)


def test_dns_servers_found_by_comm_and_grouped_by_namespace(tmp_path: Path) -> None:
    make_proc(tmp_path, {
        300: ("coredns", "net:[4026532100]"),
        301: ("coredns", "net:[4026532100]"),
        200: ("dnsmasq", "net:[4026532200]"),
        250: ("node-cache", "net:[4026531840]"),
        1: ("systemd", "net:[4026531840]"),
        400: ("corednsx", "net:[4026532300]"),
    })
    (tmp_path / "self").mkdir()
    servers = find_dns_servers(tmp_path)
    assert [(s.pids, s.comms) for s in servers] == [
        ((200,), ("dnsmasq",)), ((250,), ("node-cache",)), ((300, 301), ("coredns",))]
    assert servers[0].label == "dnsmasq (pid 200, net:[4026532200])"


def test_udp_counters_of_a_process_namespace(tmp_path: Path) -> None:
    make_proc(tmp_path, {200: ("dnsmasq", "net:[1]")})
    net = tmp_path / "200/net"
    (net / "snmp").write_text(SNMP)
    (net / "snmp6").write_text(SNMP6)
    (net / "udp").write_text("\n".join([
        UDP_HEADER, _udp_line(_hex4(bytes([198, 18, 0, 101])), 53, 17),
        _udp_line(_hex4(bytes([198, 18, 0, 101])), 5353, 99)]) + "\n")
    c = read_udp_counters(tmp_path, 200)
    assert c is not None
    assert (c.rcvbuf_errors, c.in_errors, c.in_datagrams, c.socket_drops) == (24, 29, 1050, 17)
    assert read_udp_counters(tmp_path, 999) is None


def test_listening_sockets_of_our_namespace(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net/udp").write_text(
        UDP_HEADER + "\n" + _udp_line(_hex4(bytes([169, 254, 20, 10])), 53, 0) + "\n")
    assert listening_udp(tmp_path) == {("169.254.20.10", 53)}
    assert parse_udp_sockets("header only\n") == []


def test_resolv_conf_like_glibc() -> None:
    conf = parse_resolv_conf(
        "# kubelet\nnameserver 10.96.0.10\nnameserver fd00::a ; second\n"
        "domain old.example\nsearch default.svc.cluster.local svc.cluster.local. cluster.local\n"
        "options ndots:50 timeout:2 attempts:3 rotate\n")
    assert conf.nameservers == ("10.96.0.10", "fd00::a")
    assert conf.search == ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert (conf.ndots, conf.timeout, conf.attempts) == (15, 2.0, 3)


@pytest.mark.parametrize("text", ["", "options ndots:x\n", "garbage line\n"])
def test_resolv_conf_defaults(text: str) -> None:
    conf = parse_resolv_conf(text)
    assert (conf.ndots, conf.search, conf.nameservers) == (1, (), ())
