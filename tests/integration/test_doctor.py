"""dnsguard doctor on a real kernel: induce each fault for real, and doctor must name it.

Each test builds its own small node (tests/integration/diagnet.py), checks that the fault is
real (a lookup really fails, the table really is full, the server really dropped queries),
then runs ``doctor --json`` inside the node's namespace and asserts the exact set of warning
and critical findings with their severities: the induced one, and nothing else.

The conntrack tests shrink ``nf_conntrack_max``, a global sysctl (read-only inside network
namespaces): only through the `small_conntrack_table` fixture, which restores it whatever
happens and refuses to run when some namespace on the machine holds enough entries to feel it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from diagnet import CLUSTER_IP, DNS_IP, PY, DiagNode, run, udp_blast, unavailable

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")
SMALL_TABLE = 16384


def loud(doc: dict[str, Any]) -> dict[str, str]:
    """Findings at warning or critical, id -> severity."""
    return {f["id"]: f["severity"] for f in doc["findings"] if f["severity"] != "info"}


@pytest.fixture
def node() -> Iterator[DiagNode]:
    with DiagNode() as n:
        yield n


def _busiest_namespace() -> int:
    counts = [int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())]
    for line in run(["ip", "netns", "list"]).stdout.splitlines():
        ns = line.split()[0]
        cp = run(["ip", "netns", "exec", ns, "cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
                 check=False)
        if cp.returncode == 0:
            counts.append(int(cp.stdout))
    return max(counts)


@pytest.fixture
def small_conntrack_table() -> Iterator[int]:
    """nf_conntrack_max = SMALL_TABLE for one test, restored whatever happens."""
    original = CONNTRACK_MAX.read_text().strip()
    busiest = _busiest_namespace()
    if busiest > SMALL_TABLE // 2:
        pytest.skip(f"a namespace holds {busiest} conntrack entries: shrinking the global "
                    f"table to {SMALL_TABLE} could hurt it")
    try:
        CONNTRACK_MAX.write_text(str(SMALL_TABLE))
        yield SMALL_TABLE
    finally:
        CONNTRACK_MAX.write_text(original)
        assert CONNTRACK_MAX.read_text().strip() == original


def test_healthy_node_has_no_warning_or_critical(node: DiagNode) -> None:
    # The DNAT works end to end: a pod resolves through the ClusterIP.
    cp = node.cli(node.pod, "probe", "--server", CLUSTER_IP, "--count", "20", "--json")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    rc, doc = node.doctor(window=2)
    assert loud(doc) == {}
    assert rc == 0
    assert doc["proxy_mode"] == "iptables"
    assert doc["dns_ips"] == [CLUSTER_IP]  # discovered from KUBE-SERVICES, not given
    assert "kernel-clash-fixes" in {f["id"] for f in doc["findings"]}
    assert any("dnsmasq" in n for n in doc["notes"])


def test_notrack_rule_to_the_cluster_ip_in_iptables_mode(node: DiagNode) -> None:
    node.node_run(["iptables-nft", "-t", "raw", "-A", "PREROUTING", "-d", f"{CLUSTER_IP}/32",
                   "-p", "udp", "-m", "udp", "--dport", "53", "-m", "comment", "--comment",
                   "a DNS fix", "-j", "CT", "--notrack"])
    # The fault is real: the pod's queries are no longer DNATed and go unanswered.
    cp = node.cli(node.pod, "probe", "--server", CLUSTER_IP, "--count", "3", "--timeout", "1",
                  "--json")
    assert cp.returncode == 4, cp.stdout + cp.stderr

    rc, doc = node.doctor(window=2)
    assert loud(doc) == {"notrack-breaks-dnat": "critical"}
    assert rc == 4
    [finding] = [f for f in doc["findings"] if f["id"] == "notrack-breaks-dnat"]
    assert any("a DNS fix" in e and f"UDP {CLUSTER_IP}:53" in e for e in finding["evidence"])


def test_notrack_rule_in_ipvs_mode_is_not_a_finding(node: DiagNode) -> None:
    node.node_run(["iptables-nft", "-t", "raw", "-A", "PREROUTING", "-d", f"{CLUSTER_IP}/32",
                   "-p", "udp", "-m", "udp", "--dport", "53", "-j", "CT", "--notrack"])
    rc, doc = node.doctor("--proxy-mode", "ipvs", window=1)
    assert "notrack-breaks-dnat" not in {f["id"] for f in doc["findings"]}
    assert rc == 0


def test_full_conntrack_table(node: DiagNode, small_conntrack_table: int) -> None:
    # Unreplied UDP entries live 30 s: fill 93% of the table from the node (one new source
    # port per datagram, so one entry each), staying under the limit so nothing is evicted.
    udp_blast(node.node, DNS_IP, 40000, int(small_conntrack_table * 0.93) - node.conntrack_count(),
              vary_port=True)
    assert node.conntrack_count() >= 0.9 * small_conntrack_table
    rc, doc = node.doctor(window=1)
    assert loud(doc) == {"conntrack-table-full": "critical"}
    assert rc == 4


def test_evicted_entries_when_the_table_overflows(node: DiagNode,
                                                  small_conntrack_table: int) -> None:
    # Fill the table to the brim: every new entry (the doctor's own lookups among them) must
    # now evict an unreplied one.
    udp_blast(node.node, DNS_IP, 40000, small_conntrack_table + 200, vary_port=True)
    rc, doc = node.doctor(window=2)
    found = loud(doc)
    assert found["conntrack-early-drop"] == "critical"
    assert found["conntrack-table-full"] == "critical"
    # Evicting in-flight lookups is exactly how this fault delays DNS; nothing else may show.
    assert set(found) <= {"conntrack-early-drop", "conntrack-table-full", "dns-slow-lookups"}
    assert rc == 4


def test_dns_server_receive_buffer_overflow(node: DiagNode) -> None:
    assert node.dnsmasq is not None
    pid = node.dnsmasq.pid  # ip netns exec execs dnsmasq: same PID
    doctor = subprocess.Popen(
        ["ip", "netns", "exec", node.node, PY, "-m", "dnsguard.cli_diag", "doctor", "--json",
         "--window", "5", "--resolv-conf", "", "--no-probe"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    try:
        # A stalled server (think CPU-throttled CoreDNS) while queries keep coming: its
        # socket buffer fills and the kernel drops the rest. Twice, at 1.5 s and 3 s, so at
        # least one stall falls inside the window even if doctor starts slowly.
        for at in (1.5, 3.0):
            time.sleep(max(0.0, started + at - time.monotonic()))
            os.kill(pid, signal.SIGSTOP)
            try:
                udp_blast(node.node, DNS_IP, 53, 3000, vary_port=False)
            finally:
                os.kill(pid, signal.SIGCONT)
        out, err = doctor.communicate(timeout=60)
    finally:
        if doctor.poll() is None:
            doctor.kill()
            doctor.wait()
    doc = json.loads(out)
    assert loud(doc) == {"dns-server-rcvbuf-overflow": "critical"}, err
    assert doctor.returncode == 4
    [finding] = [f for f in doc["findings"] if f["id"] == "dns-server-rcvbuf-overflow"]
    assert any(f"dnsmasq (pid {pid}" in e for e in finding["evidence"])


def test_dns_server_down_is_unreachable(node: DiagNode) -> None:
    assert node.dnsmasq is not None
    node.dnsmasq.terminate()
    node.dnsmasq.wait(timeout=5)
    rc, doc = node.doctor(window=1)
    assert loud(doc) == {"dns-unreachable": "critical"}
    assert rc == 4


def test_cache_stopped_behind_interception(node: DiagNode) -> None:
    cache = node.start_node_cache()
    # With the cache up: pods' DNS to the ClusterIP is NOTRACKed and answered locally, and
    # that NOTRACK is not the broken-DNAT kind (the node holds the address).
    cp = node.cli(node.pod, "probe", "--server", CLUSTER_IP, "--count", "10", "--json")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    rc, doc = node.doctor(window=1)
    assert loud(doc) == {}
    assert rc == 0

    cache.terminate()
    cache.wait(timeout=5)
    cp = node.cli(node.pod, "probe", "--server", CLUSTER_IP, "--count", "3", "--timeout", "1",
                  "--json")
    assert cp.returncode == 4  # the fault is real: pods' lookups fail
    rc, doc = node.doctor(window=1)
    # The same fault seen twice: why (interception) and what it does (unreachable).
    assert loud(doc) == {"interception-without-cache": "critical", "dns-unreachable": "critical"}
    assert rc == 4
    [finding] = [f for f in doc["findings"] if f["id"] == "interception-without-cache"]
    assert any(f"{CLUSTER_IP} is held by link dgdoc0" in e for e in finding["evidence"])


CTNETLINK_VS_PROC = """
import json, tempfile
from pathlib import Path
from dnsguard.netfilter.runner import SubprocessRunner
from dnsguard.node.conntrack import parse_proc_stat, read_conntrack
proc, _ = parse_proc_stat(Path("/proc/net/stat/nf_conntrack").read_text())
with tempfile.TemporaryDirectory() as empty:  # a procfs without the stat file (Ubuntu's)
    stats = read_conntrack(SubprocessRunner(), Path(empty))
print(json.dumps({"proc": proc, "netlink": dict(stats.counters), "source": stats.source,
                  "entries": stats.entries}))
"""


def test_ctnetlink_fallback_reads_what_the_proc_file_says(node: DiagNode) -> None:
    cp = node.cli(node.pod, "probe", "--server", CLUSTER_IP, "--count", "50")  # move counters
    assert cp.returncode == 0
    out = json.loads(node.node_run([PY, "-c", CTNETLINK_VS_PROC]).stdout)
    assert out["source"] == "ctnetlink (conntrack -S)"
    assert out["entries"] == node.conntrack_count()  # conntrack -C
    common = set(out["proc"]) & set(out["netlink"])
    assert {"insert_failed", "drop", "early_drop", "clash_resolve", "found"} <= common
    assert {k: out["netlink"][k] for k in common} == {k: out["proc"][k] for k in common}


def test_search_amplification_in_a_pod_resolv_conf(node: DiagNode) -> None:
    rc, doc = node.doctor(window=1, resolv=Path(f"/etc/netns/{node.pod}/resolv.conf"))
    assert loud(doc) == {"resolv-search-amplification": "warning"}
    assert rc == 3
