"""kube-proxy IPVS mode, on a kernel that has IPVS: these tests run INSIDE the qemu guest.

tests/integration/test_ipvs_mode.py boots Debian's stock kernel (dnsguard.testing.vm) and runs
this file there with DNSGUARD_VM=1; anywhere else it is skipped. The lab builds a node with a
dummy kube-ipvs0 holding the ClusterIP, ipvsadm services in masquerade mode to the CoreDNS pods,
``net.ipv4.vs.conntrack=1`` as kube-proxy sets it, and kube-proxy's nat rules (so the kernel
really tracks connections). Python runs ~15x slower under software emulation: loads are small
and bounds are about correctness, not speed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from dnsguard_helpers import (
    dnsguard,
    nodelocal_args,
    start_agent,
    status,
    stop_agent,
    wait_for,
    without_empty_legacy_tables,
)

from dnsguard.model import ProxyMode
from dnsguard.testing.lab import Lab, LabConfig

pytestmark = pytest.mark.skipif(os.environ.get("DNSGUARD_VM") != "1",
                                reason="runs inside the qemu guest (see test_ipvs_mode.py)")

BACKENDS = ["iptables-legacy", "iptables-nft", "nftables"]
LOOKUPS = 20


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def lab(backend: str):
    flavour = "legacy" if backend == "iptables-legacy" else "nft"
    with Lab(LabConfig(proxy_mode=ProxyMode.IPVS, iptables=flavour, ipv6=True)) as lab:
        yield lab


def notrack_args(lab: Lab, backend: str) -> list[str]:
    args = ["--mitigation", "notrack", "--backend", backend]
    for ip in lab.dns_ips:
        args += ["--dns-ip", str(ip)]
    for cidr in lab.pod_cidrs:
        args += ["--pod-cidr", str(cidr)]
    return args


def test_notrack_in_ipvs_mode_leaves_no_conntrack_entries(lab: Lab, backend: str) -> None:
    before = lab.save_rules()
    lab.flush_conntrack()
    base = lab.lookup_load(pods=[0], count=LOOKUPS, concurrency=1, duration=60)
    assert base.summary().failed == 0
    baseline = lab.conntrack_entries()
    print(f"\n{backend}: kube-proxy ipvs, {LOOKUPS} lookups -> {baseline} conntrack entries")
    assert baseline >= LOOKUPS * 0.9  # about one per lookup: the kernel really tracks them

    res = dnsguard(lab, "apply", *notrack_args(lab, backend), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "proxy mode ipvs detected" in res.stderr
    lab.flush_conntrack()
    after = lab.lookup_load(pods=[0, 1], count=LOOKUPS, concurrency=1, duration=60)
    assert after.summary().failed == 0
    entries = lab.conntrack_entries()
    print(f"{backend}: with dnsguard notrack, {2 * LOOKUPS} lookups -> {entries} entries")
    assert entries == 0

    again = dnsguard(lab, "apply", *notrack_args(lab, backend), timeout=120)
    assert again.returncode == 0 and "applied" not in again.stderr
    assert dnsguard(lab, "cleanup").returncode == 0
    assert without_empty_legacy_tables(lab.save_rules()) == without_empty_legacy_tables(before)
    assert lab.lookup_load(pods=[0], count=5, concurrency=1, duration=60).summary().failed == 0


def _point_pods_at(lab: Lab, server: str) -> None:
    """What kubelet does with --cluster-dns=169.254.20.10: pods' resolv.conf names it.

    One-second resolver timeouts (instead of glibc's 5 s) let the recovery tests sample the
    fallback with one-second resolution using plain serial lookups.
    """
    for ns in lab.pod_netns:
        conf = Path("/etc/netns") / ns / "resolv.conf"
        lines = [f"nameserver {server}" if ln.startswith("nameserver")
                 else "options ndots:5 timeout:1 attempts:1" if ln.startswith("options") else ln
                 for ln in conf.read_text().splitlines()]
        conf.write_text("\n".join(lines) + "\n")


def _lookup_ok_after(lab: Lab, since: float, bound: float) -> float:
    """Seconds after ``since`` until a lookup from pod 0 succeeds (raises past ``bound``)."""
    while time.monotonic() - since < bound + 30:
        t = time.monotonic()
        r = lab.pod_run(0, ["getent", "ahosts", "svc-1.default.svc.cluster.local."],
                        check=False, timeout=30)
        if r.returncode == 0 and time.monotonic() - t < 1.0:
            return t - since
    raise AssertionError("lookups never recovered")


@pytest.mark.parametrize("backend", ["iptables-nft"], indirect=True)
def test_nodelocal_link_local_falls_back_to_the_cluster_ip(lab: Lab, tmp_path: Path) -> None:
    args = [a for a in nodelocal_args(lab, tmp_path / "state", upstreams=[])]
    proc = start_agent(lab, args, tmp_path / "agent.log")
    try:
        wait_for(lambda: (status(lab, args).get("cache") or {}).get("intercepting") is True,
                 timeout=120)
        _point_pods_at(lab, "169.254.20.10")
        lab.flush_conntrack()
        assert lab.lookup_load(pods=[0], count=LOOKUPS, concurrency=1,
                               duration=60).summary().failed == 0
        assert lab.conntrack_entries() == 0 or all(
            "169.254.20.10" not in ln for ln in
            lab.node_run(["conntrack", "-L"], check=False).stdout.splitlines())

        # the cache dies: the link-local address falls back to the ClusterIP via IPVS
        pid = status(lab, args)["cache"]["pid"]  # type: ignore[index]
        killed = time.monotonic()
        os.kill(int(pid), signal.SIGKILL)  # type: ignore[arg-type]
        took = _lookup_ok_after(lab, killed, 3.0)
        print(f"\nipvs nodelocal: cache killed, link-local lookups work again after {took:.2f}s")
        assert took <= 3.0

        # Not here: agent and cache killed together (only the switch's expiry restores DNS).
        # That passed once in this guest (1.33 s) and once sent the guest kernel (Debian 6.1,
        # under TCG) into a soft lockup in a pod's getent; it is tested on the host kernel for
        # iptables and nftables modes (test_nodelocal.py) until the lockup is understood.
    finally:
        if proc.poll() is None:
            stop_agent(proc)
    assert dnsguard(lab, "cleanup", "--state-dir", str(tmp_path / "state")).returncode == 0
