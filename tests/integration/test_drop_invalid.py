"""--drop-invalid-input on the real kernel: INVALID TCP towards the node is dropped, not reset.

A TCP server runs on the lab node; client pod 0 crafts segments with a raw socket and watches,
with the same socket, what the node sends back:

* a mid-stream segment that conntrack cannot place (no entry, and the node does not pick up
  connections in the middle: ``nf_conntrack_tcp_loose=0``, as after conntrack lost the flow).
  Without dnsguard the host answers it with a RST (the connection-reset bug); with the rule it
  is dropped and counted;
* an out-of-window segment inside a live connection: without the rule it reaches the socket
  (which answers with a duplicate ACK); with it, nothing reaches the node and the connection
  keeps working.

New and established connections are untouched. Every backend this kernel has; both families are
planned (the round trip is checked by ``status``), the packets are IPv4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dnsguard.model import Family
from dnsguard.testing.lab import NODE_IPS, Lab, LabConfig, pod_ip
from tests.support.lab_helpers import VARIANTS, dnsguard, status, without_empty_legacy_tables

pytestmark = pytest.mark.root

PORT = 8080
NODE = str(NODE_IPS[Family.V4])
ARGS = ("--mitigation", "none", "--drop-invalid-input")

#: An echo server on the node (one line per connection).
SERVER = """
import socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
def serve(c):
    with c:
        while data := c.recv(4096):
            c.sendall(data)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""

#: Run in the pod: craft one segment, report what the node sends back within a second.
PROBE = r"""
import json, os, random, select, socket, struct, sys, time
mode, src, dst, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def segment(sport, dport, seq, ack, flags):
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = struct.pack("!4s4sBBH", socket.inet_aton(src), socket.inet_aton(dst), 0, 6, len(hdr))
    return hdr[:16] + struct.pack("!H", checksum(pseudo + hdr)) + hdr[18:]

def tcp_header(pkt):
    ihl = (pkt[0] & 0x0F) * 4
    return struct.unpack("!HHIIBB", pkt[ihl:ihl + 14])

raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
conn = None
if mode == "established":
    conn = socket.socket()
    conn.settimeout(5)
    conn.bind((src, 0))
    sport = conn.getsockname()[1]
    conn.connect((dst, port))
    conn.sendall(b"hello\n")
    assert conn.recv(100) == b"hello\n"
    # the SYN-ACK tells both sides' sequence numbers: ours is its ack number
    while True:
        s, d, seq0, ack0, _, flags = tcp_header(raw.recv(65535))
        if (s, d) == (port, sport) and flags & 0x12 == 0x12:
            break
    seq, ack = ack0 + 6, seq0 + 1 + 6
    time.sleep(0.3)  # let delayed ACKs pass before watching
    while select.select([raw], [], [], 0)[0]:
        raw.recv(65535)
    # a quarter of the sequence space ahead: beyond any window conntrack allows. (Behind the
    # window would not do: current kernels let "old" segments through as retransmissions.)
    seq = (seq + (1 << 30)) & 0xFFFFFFFF
else:
    sport = random.randint(40000, 60000)
    seq, ack = random.getrandbits(32), random.getrandbits(32)
raw.sendto(segment(sport, port, seq, ack & 0xFFFFFFFF, 0x10), (dst, 0))
replies, resets = 0, 0
deadline = time.monotonic() + 1.0
while (left := deadline - time.monotonic()) > 0:
    if not select.select([raw], [], [], left)[0]:
        break
    pkt, (addr, _) = raw.recvfrom(65535)
    s, d, _, _, _, flags = tcp_header(pkt)
    if addr == dst and s == port and d == sport:
        replies += 1
        resets += bool(flags & 0x04)
still = None
if conn is not None:
    conn.sendall(b"again\n")
    still = conn.recv(100) == b"again\n"
print(json.dumps({"replies": replies, "resets": resets, "still_works": still}))
"""


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def lab(variant: str):
    mode, flavour, _ = VARIANTS[variant]
    with Lab(LabConfig(proxy_mode=mode, iptables=flavour, ipv6=True, pods=1)) as lab:  # type: ignore[arg-type]
        yield lab


@pytest.fixture
def server(lab: Lab):
    proc = lab.popen_in(lab.node_netns, [sys.executable, "-c", SERVER, NODE, str(PORT)],
                        stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def probe(lab: Lab, mode: str) -> dict[str, object]:
    res = lab.pod_run(0, [sys.executable, "-c", PROBE, mode, str(pod_ip(0)), NODE, str(PORT)],
                      check=False, timeout=20)
    assert res.returncode == 0, res.stderr
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


def drops_counted(lab: Lab, variant: str) -> int | None:
    """Packets the drop rule matched (iptables counters); None on native nft (no counter)."""
    if variant == "nftables":
        return None
    tool = "iptables-legacy" if variant.endswith("legacy") else "iptables-nft"
    out = lab.node_run([tool, "-t", "filter", "-L", "DNSGUARD-INPUT", "-v", "-x", "-n"]).stdout
    rows = [ln.split() for ln in out.splitlines() if "ctstate INVALID" in ln]
    assert len(rows) == 1, out
    return int(rows[0][0])


def test_invalid_tcp_is_reset_without_the_rule_and_dropped_with_it(
        lab: Lab, variant: str, server: subprocess.Popen[str], tmp_path: Path) -> None:
    lab.node_run(["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"])
    before = lab.save_rules()

    # without dnsguard: the host resets what conntrack calls INVALID
    lost = probe(lab, "lost")
    assert lost["resets"] == 1, lost
    live = probe(lab, "established")
    assert live["replies"] == 1 and live["resets"] == 0 and live["still_works"], live

    res = dnsguard(lab, "apply", *ARGS)
    assert res.returncode == 0, res.stderr
    st = status(lab, ARGS)
    assert st["in_sync"] is True and st["drift"] == [], st  # round trip, both families
    again = dnsguard(lab, "apply", *ARGS)
    assert again.returncode == 0 and "applied" not in again.stderr  # nothing was written

    lost = probe(lab, "lost")
    assert lost["replies"] == 0, lost  # no RST: the segment never reached TCP
    live = probe(lab, "established")  # a new connection works, the out-of-window one is eaten
    assert live["replies"] == 0 and live["still_works"] is True, live
    assert drops_counted(lab, variant) in (None, 2)

    res = dnsguard(lab, "cleanup", "--state-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert without_empty_legacy_tables(lab.save_rules()) == without_empty_legacy_tables(before)
    assert probe(lab, "lost")["resets"] == 1
