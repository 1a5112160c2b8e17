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
import time
from pathlib import Path
from typing import Any

import pytest

from dnsguard.model import ALIVE_SECONDS, Family, ProxyMode
from dnsguard.testing.fake_apiserver import service_object
from dnsguard.testing.lab import (
    DNS_CLUSTER_IPS,
    POD_CIDRS,
    Lab,
    LabConfig,
    dns_pod_ip,
    service_addresses,
    service_fqdn,
)
from tests.support.lab_helpers import (
    dnsguard,
    fake_api,
    nodelocal_args,
    start_agent,
    status,
    stop_agent,
    wait_for,
    without_empty_legacy_tables,
)

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


Sample = tuple[float, int, float]  # (start after the kill, getent's exit code, its seconds)


def _lookup_ok_after(lab: Lab, since: float) -> tuple[float, list[Sample]]:
    """Seconds after ``since`` until a lookup from pod 0 succeeds, and every attempt till then.

    Serial lookups with one-second resolver timeouts (see `_point_pods_at`); gives up 30 s
    after the switch would have expired. A lookup stuck in the kernel (the soft lockup this
    phase once hit) ends the test through pod_run's own timeout.
    """
    samples: list[Sample] = []
    while time.monotonic() - since < ALIVE_SECONDS + 30:
        t = time.monotonic()
        r = lab.pod_run(0, ["getent", "ahosts", "svc-1.default.svc.cluster.local."],
                        check=False, timeout=30)
        samples.append((round(t - since, 2), r.returncode, round(time.monotonic() - t, 2)))
        if r.returncode == 0:
            return t - since, samples
    raise AssertionError(f"lookups never recovered: {samples}")


def _no_failure_after_expiry(samples: list[Sample]) -> None:
    """Every lookup that started once the switch had expired succeeded.

    The switch expires at most ALIVE_SECONDS after the last refresh, so after the kill. That,
    not the time of the first success, is the bound: the first success also waits for the
    lookup running at the expiry to time out: 1 s plus process start, which the emulated
    guest stretches to 2 s in all when the host is busy. (A 3 s bound on the first success,
    which this replaces, was met with 2.7-2.84 s in 3 of 12 rounds on a busy host and missed
    once, at 5.3 s.)
    """
    late = [s for s in samples if s[1] != 0 and s[0] > ALIVE_SECONDS + 0.5]
    assert not late, samples


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
        pid = status(lab, args)["cache"]["pid"]
        killed = time.monotonic()
        os.kill(int(pid), signal.SIGKILL)  # type: ignore[arg-type]
        took, samples = _lookup_ok_after(lab, killed)
        print(f"\nipvs nodelocal: cache killed, link-local lookups work again after {took:.2f}s "
              f"(start, exit code, seconds: {samples})")
        _no_failure_after_expiry(samples)

        # agent and cache die together (the agent frozen first: nobody withdraws)
        wait_for(lambda: (status(lab, args).get("cache") or {}).get("intercepting") is True,
                 timeout=60)
        pid = status(lab, args)["cache"]["pid"]
        os.kill(proc.pid, signal.SIGSTOP)
        killed = time.monotonic()
        os.kill(int(pid), signal.SIGKILL)  # type: ignore[arg-type]
        os.kill(proc.pid, signal.SIGKILL)
        took, samples = _lookup_ok_after(lab, killed)
        print(f"ipvs nodelocal: agent+cache killed, lookups work again after {took:.2f}s "
              f"(start, exit code, seconds: {samples})")
        _no_failure_after_expiry(samples)
    finally:
        if proc.poll() is None:
            stop_agent(proc)
    assert dnsguard(lab, "cleanup", "--state-dir", str(tmp_path / "state")).returncode == 0


# --external-to-cluster: kube-dns gets an external IP and a load-balancer ingress IP (IPv4) and
# an external IP (IPv6). The node routes them towards its bridge, where nothing answers: the
# load balancer a pod would otherwise hairpin through is out of the picture, so an answer can
# only come through dnsguard's DNAT to the ClusterIP and IPVS.
EXTERNAL = {Family.V4: "198.18.2.53", Family.V6: "fd00:198:18:2::35"}
LB_INGRESS = "198.18.2.54"
NODE = "node-a"


def _kube_dns(external: bool) -> dict[str, Any]:
    obj = service_object("kube-system", "kube-dns",
                         [str(DNS_CLUSTER_IPS[Family.V4]), str(DNS_CLUSTER_IPS[Family.V6])])
    if external:
        obj["spec"]["externalIPs"] = [EXTERNAL[Family.V4], EXTERNAL[Family.V6]]
        obj["spec"]["type"] = "LoadBalancer"
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": LB_INGRESS}]}}
    return obj


def _answers(lab: Lab, where: str, server: str, *, tcp: bool = False) -> bool:
    """One A query to ``server`` from pod 0 or the node: did the lab's CoreDNS answer it?"""
    argv = ["dig", f"@{server}", service_fqdn(1), "A", "+short", "+time=1", "+tries=1",
            *(["+tcp"] if tcp else [])]
    res = (lab.pod_run(0, argv, check=False, timeout=30) if where == "pod"
           else lab.node_run(argv, check=False, timeout=30))
    return res.returncode == 0 and str(service_addresses(1)[Family.V4]) in res.stdout


def _reachable(lab: Lab) -> dict[str, bool]:
    probes = {f"pod udp {ip}": ("pod", ip, False) for ip in [*EXTERNAL.values(), LB_INGRESS]}
    probes[f"pod tcp {EXTERNAL[Family.V4]}"] = ("pod", EXTERNAL[Family.V4], True)
    probes[f"node udp {EXTERNAL[Family.V4]}"] = ("node", EXTERNAL[Family.V4], False)
    probes[f"node udp {EXTERNAL[Family.V6]}"] = ("node", EXTERNAL[Family.V6], False)
    return {k: _answers(lab, w, ip, tcp=tcp) for k, (w, ip, tcp) in probes.items()}


def test_external_ips_reach_the_cluster_ip_and_go_with_the_service(
        lab: Lab, backend: str, tmp_path: Path) -> None:
    """Pods and the node reach a Service's external and LB IPs through dnsguard's DNAT.

    The DNAT goes away when the Service loses its external IPs, also when that happens while
    the agent is down (it was SIGKILLed, so nothing tore its rules down).
    """
    for fam, net in (("-4", "198.18.2.0/24"), ("-6", "fd00:198:18:2::/64")):
        lab.node_run(["ip", fam, "route", "add", net, "dev", "br0"])
    before = lab.save_rules()
    with fake_api(lab, tmp_path / "kubeconfig") as call:
        call("apply", "services", _kube_dns(external=True))
        for fam in (Family.V4, Family.V6):
            call("put_endpoint_slice", "kube-system", f"kube-dns-v{fam.value}",
                 service="kube-dns", endpoints=[str(dns_pod_ip(0, fam)), str(dns_pod_ip(1, fam))])
        call("put_node", NODE, [str(POD_CIDRS[Family.V4]), str(POD_CIDRS[Family.V6])])
        assert not any(_reachable(lab).values())  # nothing answers there without dnsguard

        args = ["--mitigation", "none", "--external-to-cluster", "--backend", backend,
                "--kubeconfig", str(tmp_path / "kubeconfig"), "--node-name", NODE,
                "--state-dir", str(tmp_path / "state"), "--sync-interval", "1"]
        proc = start_agent(lab, args, tmp_path / "agent.log")
        try:
            wait_for(lambda: EXTERNAL[Family.V6] in lab.save_rules(), timeout=120)
            reached = _reachable(lab)
            print(f"\n{backend}: with dnsguard: {reached}")
            assert all(reached.values()), (reached, (tmp_path / "agent.log").read_text())

            call("apply", "services", _kube_dns(external=False))
            wait_for(lambda: EXTERNAL[Family.V4] not in lab.save_rules(), timeout=60)
            assert not any(_reachable(lab).values())

            call("apply", "services", _kube_dns(external=True))
            wait_for(lambda: LB_INGRESS in lab.save_rules(), timeout=60)
            proc.kill()  # down, rules left behind
            proc.wait(timeout=30)
            assert LB_INGRESS in lab.save_rules()
            call("apply", "services", _kube_dns(external=False))
            proc = start_agent(lab, args, tmp_path / "agent2.log")
            wait_for(lambda: LB_INGRESS not in lab.save_rules(), timeout=120)
            assert not any(_reachable(lab).values())
        finally:
            if proc.poll() is None:
                stop_agent(proc)
    cleanup = dnsguard(lab, "cleanup", "--state-dir", str(tmp_path / "state"), timeout=300)
    assert cleanup.returncode == 0, cleanup.stderr
    assert without_empty_legacy_tables(lab.save_rules()) == without_empty_legacy_tables(before)
