"""dnsguard probe against a real dnsmasq behind a kube-proxy-style DNAT, in namespaces.

What must hold on a real kernel: a lookup is A + AAAA from one socket (so exactly one conntrack
entry per lookup, and a new one each time), replies are paired by ID, timeouts and refusals are
reported as such and the run stays bounded, search expansion sends what glibc would, and the
getaddrinfo mode goes through the system resolver.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from diagnet import CLUSTER_IP, DNS_IP, DiagNode, unavailable

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


@pytest.fixture
def node() -> Iterator[DiagNode]:
    with DiagNode() as n:
        yield n


def probe(node: DiagNode, ns: str, *args: str, expect: int = 0) -> tuple[dict[str, Any], str]:
    cp = node.cli(ns, "probe", "--json", *args)
    assert cp.returncode == expect, cp.stdout + cp.stderr
    return json.loads(cp.stdout), cp.stderr


def dns_entries(node: DiagNode) -> int:
    cp = node.node_run(["conntrack", "-L", "-p", "udp", "--orig-dst", CLUSTER_IP])
    return sum(1 for line in cp.stdout.splitlines() if "dport=53" in line)


def test_lookups_through_the_cluster_ip_one_socket_and_entry_each(node: DiagNode) -> None:
    node.node_run(["conntrack", "-F"])
    doc, _ = probe(node, node.pod, "--server", CLUSTER_IP, "--count", "200",
                   "--concurrency", "8")
    assert doc["lookups"] == 200
    assert doc["queries"] == 400
    assert doc["rcodes"] == {"NOERROR": 400}
    assert doc["timeouts"] == 0 and doc["errors"] == {}
    assert doc["latency_seconds"]["p50"] is not None
    assert doc["latency_seconds"]["max"] < 1.0
    # A and AAAA share one socket (one tuple: never more entries than lookups), and every
    # lookup has a new source port (random, like glibc's: two lookups out of a few hundred
    # may draw the same port and share an entry).
    assert 190 <= dns_entries(node) <= 200


def test_workers_split_the_lookups_and_merge_the_results(node: DiagNode) -> None:
    node.node_run(["conntrack", "-F"])
    doc, _ = probe(node, node.pod, "--server", CLUSTER_IP, "--count", "301",
                   "--concurrency", "8", "--workers", "2")
    assert doc["lookups"] == 301 and doc["rcodes"] == {"NOERROR": 602}
    assert 290 <= dns_entries(node) <= 301


def test_timeouts_are_reported_and_the_run_stays_bounded(node: DiagNode) -> None:
    node.exec_in(node.dns, ["iptables-nft", "-A", "INPUT", "-p", "udp", "--dport", "53",
                            "-j", "DROP"])
    start = time.monotonic()
    doc, _ = probe(node, node.pod, "--server", CLUSTER_IP, "--duration", "1",
                   "--timeout", "0.5", "--concurrency", "4", expect=4)
    took = time.monotonic() - start
    assert took < 1 + 0.5 + 2.0  # duration + timeout, plus interpreter start-up
    assert doc["lookups"] >= 4 and doc["timeouts"] == doc["lookups"]
    assert doc["at_least_1s"] == 0 and doc["slow_count"] == doc["lookups"]  # 0.5 s timeout
    assert doc["latency_seconds"]["p50"] is None
    offsets = [s["offset_seconds"] for s in doc["slow"]]
    assert offsets == sorted(offsets) and offsets[-1] < 1.0


def test_port_unreachable_is_a_failure_not_a_timeout(node: DiagNode) -> None:
    # The DNS pod's kernel would rate-limit its port-unreachable replies (a few, then about
    # one a second); unlimited in its own namespace, each of our lookups gets one.
    node.exec_in(node.dns, ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"])
    doc, _ = probe(node, node.node, "--server", DNS_IP, "--port", "5353", "--count", "10",
                   "--timeout", "2", expect=4)
    assert doc["errors"] == {"refused": 10}
    assert doc["timeouts"] == 0
    assert doc["elapsed_seconds"] < 1.0


def test_search_expansion_sends_what_glibc_would(node: DiagNode) -> None:
    # ndots:5: "kubernetes.default" is tried with the first search domain (NXDOMAIN), then
    # the second, which answers; glibc stops there.
    doc, _ = probe(node, node.pod, "--search", "--resolv-conf",
                   f"/etc/netns/{node.pod}/resolv.conf", "--name", "kubernetes.default",
                   "--count", "10")
    assert str(doc["target"]).startswith(CLUSTER_IP)  # nameserver from resolv.conf
    assert doc["queries"] == 40
    assert doc["rcodes"] == {"NXDOMAIN": 20, "NOERROR": 20}


def test_via_getaddrinfo_uses_the_system_resolver(node: DiagNode) -> None:
    # `ip netns exec` bind-mounts /etc/netns/<pod>/resolv.conf: the pod's view, like kubelet's.
    doc, _ = probe(node, node.pod, "--via", "getaddrinfo", "--name", "kubernetes.default",
                   "--count", "20", "--concurrency", "4")
    assert doc["via"] == "getaddrinfo"
    assert doc["lookups"] == 20 and doc["timeouts"] == 0 and doc["errors"] == {}
    assert doc["rcodes"] == {"NOERROR": 20}


def test_progress_lines_without_a_terminal(node: DiagNode) -> None:
    doc, err = probe(node, node.node, "--server", DNS_IP, "--duration", "2.2",
                     "--concurrency", "4")
    lines = [ln for ln in err.splitlines() if ln.startswith("probe: ")]
    assert len(lines) >= 2 and "\r" not in err
    assert doc["lookups"] > 0


def test_generator_drives_a_local_server(node: DiagNode) -> None:
    """A floor, not a benchmark: the one-thread epoll loop keeps a local dnsmasq busy."""
    doc, _ = probe(node, node.node, "--server", DNS_IP, "--duration", "2",
                   "--concurrency", "32", "--timeout", "2")
    print(f"probe ceiling against dnsmasq: {doc['lookups_per_second']} lookups/s")
    assert doc["lookups_per_second"] > 1000
    assert doc["timeouts"] == 0
