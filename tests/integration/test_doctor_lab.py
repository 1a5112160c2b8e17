"""dnsguard doctor and probe on the shared lab (dnsguard.testing.lab): bridged pods behind
br_netfilter, two dnsmasq "CoreDNS" pods, kube-proxy's rules in each mode and flavour.

test_doctor.py induces faults on a small routed node of its own; this module checks what
only the lab's realism shows: kube-proxy's mode and the DNS ClusterIP are discovered from the
rules kube-proxy really writes (iptables-legacy, iptables-nft, nftables' ``service-ips`` map),
a healthy lab under pod load gives no warning or critical finding, and a native nft notrack
rule breaks the nftables-mode DNAT for real and is named.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from dnsguard.model import Family, ProxyMode
from dnsguard.testing.lab import DNS_CLUSTER_IPS, Lab, LabConfig

pytestmark = pytest.mark.root

CLUSTER_IP = str(DNS_CLUSTER_IPS[Family.V4])

MODES = [
    LabConfig(ProxyMode.IPTABLES, "legacy"),
    LabConfig(ProxyMode.IPTABLES, "nft"),
    LabConfig(ProxyMode.NFTABLES),
]


def node_like(lab: Lab) -> Lab:
    """The lab node must route the Service range, as a real node's default route does: without
    it host-network lookups to the ClusterIP fail before kube-proxy's DNAT, and doctor's own
    probe rightly reports DNS unreachable. The lab adds that route itself; check it is there."""
    routes = lab.node_run(["ip", "route", "show", "198.18.1.0/24"]).stdout
    assert "dev br0" in routes, routes
    return lab


def doctor(lab: Lab, *args: str, window: float = 2.0) -> tuple[int, dict[str, Any]]:
    cp = lab.node_run([sys.executable, "-m", "dnsguard.cli_diag", "doctor", "--json",
                       "--window", str(window), "--resolv-conf", "", *args],
                      check=False, timeout=window * 3 + 30)
    assert cp.returncode in (0, 3, 4), cp.stderr
    return cp.returncode, json.loads(cp.stdout)


def loud(doc: dict[str, Any]) -> dict[str, str]:
    return {f["id"]: f["severity"] for f in doc["findings"] if f["severity"] != "info"}


@pytest.mark.parametrize("config", MODES, ids=LabConfig.label)
def test_healthy_lab_under_load_has_no_warning_or_critical(make_lab: Any,
                                                           config: LabConfig) -> None:
    lab = node_like(make_lab(config))
    load = lab.lookup_load(count=100, concurrency=4, duration=10)
    assert not load.failures
    rc, doc = doctor(lab)
    assert loud(doc) == {}
    assert rc == 0
    assert doc["proxy_mode"] == config.proxy_mode.value
    assert doc["dns_ips"] == [CLUSTER_IP]  # from kube-proxy's own rules
    assert sum("dnsmasq" in n for n in doc["notes"]) >= 1


def test_probe_from_a_lab_pod_through_the_bridge(make_lab: Any) -> None:
    lab = make_lab(LabConfig(ProxyMode.IPTABLES, "nft"))
    cp = lab.pod_run(0, [sys.executable, "-m", "dnsguard.cli_diag", "probe", "--json",
                         "--server", CLUSTER_IP, "--name", "svc-0.default.svc.cluster.local",
                         "--count", "200", "--concurrency", "8"], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["lookups"] == 200 and doc["rcodes"] == {"NOERROR": 400}


def test_native_nft_notrack_breaks_nftables_mode(make_lab: Any) -> None:
    lab = node_like(make_lab(LabConfig(ProxyMode.NFTABLES)))
    lab.node_run(["nft", "-f", "-"], input=(
        "table inet dgdoc_fix {\n"
        "  chain pre {\n"
        "    type filter hook prerouting priority raw; policy accept;\n"
        f"    ip daddr {CLUSTER_IP} udp dport 53 notrack comment \"dns fix\"\n"
        "  }\n"
        "}\n"))
    load = lab.lookup_load(count=2, concurrency=1, duration=5, grace=1.0)
    assert not load.latencies  # the fault is real: pods' lookups fail or hang
    assert load.failures or load.unfinished
    rc, doc = doctor(lab)
    assert loud(doc) == {"notrack-breaks-dnat": "critical"}
    assert rc == 4
    [finding] = [f for f in doc["findings"] if f["id"] == "notrack-breaks-dnat"]
    assert any("table inet dgdoc_fix" in e and "dns fix" in e for e in finding["evidence"])
