"""The lab itself, on the real kernel: a node that behaves like a Kubernetes node for DNS.

Every later integration test trusts the lab, so these tests pin down what it promises: pods
resolve service names (A and AAAA, short and search-path names) only through kube-proxy's
DNAT of the ClusterIP; unknown names fail fast with NXDOMAIN; every lookup leaves a
conntrack entry on the node (the state dnsguard's NOTRACK must make disappear); the rules
snapshot changes exactly when rules change; and teardown leaves nothing behind, even after
a failed start or a killed owner.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dnsguard.model import Family, ProxyMode
from dnsguard.testing import kubeproxy
from dnsguard.testing.lab import (
    DNS_CLUSTER_IPS,
    ETC_NETNS,
    OWNER_DIR,
    Lab,
    LabCommandError,
    LabConfig,
    LabError,
    LabUnavailable,
    dns_pod_ip,
    lab_namespaces,
    service_addresses,
    service_fqdn,
    service_name,
)

pytestmark = pytest.mark.root

MATRIX = [
    LabConfig(ProxyMode.IPTABLES, "legacy", ipv6=False),
    LabConfig(ProxyMode.IPTABLES, "legacy", ipv6=True),
    LabConfig(ProxyMode.IPTABLES, "nft", ipv6=False),
    LabConfig(ProxyMode.IPTABLES, "nft", ipv6=True),
    LabConfig(ProxyMode.NFTABLES, ipv6=False),
    LabConfig(ProxyMode.NFTABLES, ipv6=True),
]

# Resolves each argv name with getaddrinfo(AF_UNSPEC) inside a pod; prints JSON.
RESOLVE = r"""
import json, socket, sys, time
out = {}
for name in sys.argv[1:]:
    t = time.monotonic()
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_DGRAM)
        out[name] = {"addrs": sorted({i[4][0] for i in infos}), "t": time.monotonic() - t}
    except socket.gaierror as e:
        out[name] = {"errno": e.errno, "error": str(e), "t": time.monotonic() - t}
print(json.dumps(out))
"""


@pytest.fixture(scope="module", params=MATRIX, ids=LabConfig.label)
def lab(
    request: pytest.FixtureRequest, lab_host: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    config: LabConfig = request.param
    with Lab(config, workdir=tmp_path_factory.mktemp(config.label())) as built:
        yield built


def resolve(lab: Lab, pod: int, *names: str) -> dict[str, dict[str, object]]:
    out = lab.pod_run(pod, [sys.executable, "-c", RESOLVE, *names], timeout=60).stdout
    result: dict[str, dict[str, object]] = json.loads(out)
    return result


def expected_addrs(i: int) -> list[str]:
    return sorted(str(a) for a in service_addresses(i).values())


def dig(lab: Lab, pod: int, *args: str) -> str:
    return lab.pod_run(pod, ["dig", "+time=2", "+tries=1", *args], check=False).stdout


def conntrack_lines(lab: Lab) -> list[str]:
    out = []
    for fam in ("ipv4", "ipv6"):
        out += lab.node_run(["conntrack", "-L", "-f", fam]).stdout.splitlines()
    return [ln for ln in out if ln.split()[:1] in (["udp"], ["tcp"]) and " dport=53 " in ln]


def reply_sources(lines: list[str]) -> set[str]:
    """The reply-direction source of each entry: the endpoint DNAT chose."""
    return {[f for f in ln.split() if f.startswith("src=")][1][4:] for ln in lines}


def section(snapshot: str, title: str) -> str:
    """The body of one `### title` section of a save_rules() snapshot."""
    body = snapshot.split(f"### {title}\n", 1)[1]
    return body.split("\n### ", 1)[0]


# --------------------------------------------------------------------------- DNS through kube-proxy


def test_every_pod_resolves_a_and_aaaa_through_the_cluster_ip(lab: Lab) -> None:
    for pod in range(lab.config.pods):
        got = resolve(lab, pod, service_name(1))[service_name(1)]
        assert got.get("addrs") == expected_addrs(1), got


def test_the_service_answers_on_every_cluster_ip_over_udp_and_tcp(lab: Lab) -> None:
    # The node has no route to the Service CIDR: only kube-proxy's DNAT can deliver these.
    answers = service_addresses(3)
    for cluster_ip in lab.dns_ips:
        for transport in ("+notcp", "+tcp"):
            for qtype, fam in (("A", Family.V4), ("AAAA", Family.V6)):
                out = dig(lab, 0, "+short", transport, f"@{cluster_ip}", service_fqdn(3) + ".",
                          qtype)
                assert out.split() == [str(answers[fam])], (cluster_ip, transport, qtype, out)


def test_short_and_search_path_names_resolve(lab: Lab) -> None:
    names = ["svc-2", "svc-2.default", "svc-2.default.svc", "svc-2.default.svc.cluster.local",
             "svc-2.default.svc.cluster.local."]
    got = resolve(lab, 1, *names)
    assert {n: r.get("addrs") for n, r in got.items()} == {n: expected_addrs(2) for n in names}


def test_unknown_names_fail_fast_with_nxdomain(lab: Lab) -> None:
    unknown = ["no-such-svc", service_name(lab.config.names), "no-such-svc.default.svc."
               "cluster.local.", "example.invalid."]
    got = resolve(lab, 0, *unknown)
    for name in unknown:
        # EAI_NONAME is NXDOMAIN; a lost query would be EAI_AGAIN after 5 s or more.
        assert got[name].get("errno") == socket.EAI_NONAME, (name, got[name])
        assert float(got[name]["t"]) < 1.0, (name, got[name])  # type: ignore[arg-type]
    out = dig(lab, 0, f"@{lab.dns_ips[0]}", "no-such-svc.default.svc.cluster.local.")
    assert "status: NXDOMAIN" in out


# --------------------------------------------------------------------------- conntrack


def test_each_lookup_leaves_a_conntrack_entry_dnated_to_coredns(lab: Lab) -> None:
    lab.flush_conntrack()
    assert lab.conntrack_entries() == 0
    n = 20
    result = lab.lookup_load([0], [service_name(0)], count=n, concurrency=1, duration=30)
    assert result.summary().ok == n
    entries = lab.conntrack_entries()
    # One socket (A + AAAA) per lookup, one entry per socket; two lookups that happen to
    # get the same ephemeral port share an entry, hence the small tolerance.
    assert 0.9 * n <= entries <= n
    lines = conntrack_lines(lab)
    assert len(lines) == entries
    assert all(f"dst={lab.dns_ips[0]} " in ln for ln in lines)
    # kube-proxy spread the lookups over both CoreDNS pods (chance of not: 2 * 2**-20).
    assert reply_sources(lines) == {str(dns_pod_ip(i)) for i in range(2)}


def test_ipv6_cluster_ip_lookups_are_tracked_too(lab: Lab) -> None:
    if not lab.config.ipv6:
        pytest.skip("single-stack lab")
    v6 = DNS_CLUSTER_IPS[Family.V6]
    lab.flush_conntrack()
    for transport in ("+notcp", "+tcp"):
        assert dig(lab, 1, "+short", transport, f"@{v6}", service_fqdn(0) + ".").split()
    lines = conntrack_lines(lab)
    assert {ln.split()[0] for ln in lines} == {"udp", "tcp"}
    assert all(f"dst={v6} " in ln for ln in lines)
    assert reply_sources(lines) <= {str(dns_pod_ip(i, Family.V6)) for i in range(2)}
    assert lab.conntrack_entries() == len(lines) == 2


# --------------------------------------------------------------------------- rules snapshot


def test_rules_snapshot_shows_kube_proxy_where_it_wrote_and_nothing_else(lab: Lab) -> None:
    snap = lab.save_rules()
    assert "# Generated" not in snap and "# Completed" not in snap
    legacy = section(snap, "iptables-legacy-save") + section(snap, "ip6tables-legacy-save")
    nft_compat = section(snap, "iptables-nft-save") + section(snap, "ip6tables-nft-save")
    ruleset = section(snap, "nft list ruleset")
    svc = kubeproxy.kube_dns(DNS_CLUSTER_IPS[Family.V4], [dns_pod_ip(0)])
    udp = kubeproxy.KUBE_DNS_PORTS[0]
    if lab.proxy_mode is ProxyMode.NFTABLES:
        assert legacy.strip() == "" and nft_compat.strip() == ""  # reading created nothing
        assert "table ip kube-proxy" in ruleset
        assert ("table ip6 kube-proxy" in ruleset) is lab.config.ipv6
        assert kubeproxy.nft_service_chain(svc, udp) in ruleset
        return
    written, other = (legacy, nft_compat) if lab.config.iptables == "legacy" else (
        nft_compat, legacy)
    assert other.strip() == ""
    assert written.count(f":{kubeproxy.svc_chain(svc, udp)} - [0:0]") == len(lab.families)
    assert written.count('-A PREROUTING -m comment --comment "kubernetes service portals"'
                         " -j KUBE-SERVICES") == len(lab.families)


def test_rules_snapshot_ignores_counters_and_sees_real_changes(lab: Lab) -> None:
    before = lab.save_rules()
    lab.lookup_load(count=10, concurrency=2, duration=30)  # moves every counter on the path
    assert lab.save_rules() == before
    lab.resync_kube_proxy()
    assert lab.save_rules() == before  # a kube-proxy resync changes nothing
    lab.node_run(["nft", "add", "table", "inet", "dglab-probe"])
    try:
        assert lab.save_rules() != before
    finally:
        lab.node_run(["nft", "delete", "table", "inet", "dglab-probe"])
    assert lab.save_rules() == before


# --------------------------------------------------------------------------- load


def test_lookup_load_merges_pods_and_reports_failures(lab: Lab) -> None:
    result = lab.lookup_load(names=[service_name(0), "no-such-svc"], count=20, concurrency=4,
                             duration=30)
    summary = result.summary()
    assert len(result.workers) == lab.config.pods
    assert summary.count == 20 * lab.config.pods and result.unfinished == 0
    assert summary.failed == 10 * lab.config.pods
    assert {f.name for f in result.failures} == {"no-such-svc"}
    assert all("not known" in f.error for f in result.failures)
    assert 0 < summary.p50 <= summary.p99 <= summary.max < 1.0
    assert summary.slow == 0
    assert result.started <= min(w.started for w in result.workers)


def test_lookup_load_stops_at_its_deadline(make_lab) -> None:
    lab = make_lab(LabConfig(pods=1, dns_servers=1))
    t0 = time.monotonic()
    result = lab.lookup_load(count=10**9, concurrency=2, duration=1.0, grace=2.0)
    took = time.monotonic() - t0
    assert took < 1.0 + 2.0 + 5.0  # + interpreter start-up, on a slow machine
    assert 1.0 <= result.wall < 3.0
    assert result.summary().count > 10 and result.unfinished == 0


# --------------------------------------------------------------------------- teardown


def lab_pids(lab: Lab) -> set[int]:
    pids: set[int] = set()
    for ns in (lab.node_netns, *lab.pod_netns, *lab.dns_netns):
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                             check=True).stdout
        pids |= {int(p) for p in out.split()}
    return pids


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it, not for us)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_gone(lab: Lab, pids: set[int]) -> None:
    assert [ns for ns in lab_namespaces() if ns.startswith(f"dglab-{lab.id}-")] == []
    assert not any((ETC_NETNS / ns).exists() for ns in lab.pod_netns)
    assert not (OWNER_DIR / lab.id).exists()
    assert [p for p in pids if running(p)] == []


def test_teardown_removes_namespaces_etc_dirs_processes_and_temp_files(lab_host: None) -> None:
    with Lab(LabConfig(ipv6=True)) as lab:
        names = {lab.node_netns, *lab.pod_netns, *lab.dns_netns}
        assert names <= set(lab_namespaces())
        assert all((ETC_NETNS / ns / "resolv.conf").exists() for ns in lab.pod_netns)
        assert (OWNER_DIR / lab.id).exists()
        lab.popen_in(lab.pod_netns[0], ["sleep", "300"])
        pids = lab_pids(lab)
        assert len(pids) == 3  # two dnsmasq and the sleeper
        workdir = lab.workdir
        assert workdir is not None and (workdir / "dnsmasq-0.log").exists()
        with pytest.raises(LabCommandError) as failed:
            lab.node_run(["sh", "-c", "echo diagnosis >&2; exit 3"])
        assert failed.value.returncode == 3 and failed.value.stderr == "diagnosis\n"
    assert_gone(lab, pids)
    assert not workdir.exists()
    lab.close()  # idempotent


def test_a_failed_start_tears_down_what_it_built(lab_host: None, monkeypatch) -> None:
    lab = Lab(LabConfig())
    seen: set[int] = set()

    def broken_kube_proxy(self: Lab, first: bool) -> None:
        seen.update(lab_pids(self))
        raise RuntimeError("kube-proxy exploded")

    monkeypatch.setattr(Lab, "_install_kube_proxy", broken_kube_proxy)
    with pytest.raises(RuntimeError, match="exploded"):
        lab.start()
    assert len(seen) == 2  # the dnsmasqs were running when it failed
    assert_gone(lab, seen)


def test_remove_stale_cleans_up_after_a_killed_owner_and_spares_live_labs(make_lab) -> None:
    live = make_lab(LabConfig(pods=1, dns_servers=1))
    script = (
        "import time\n"
        "from dnsguard.testing.lab import Lab, LabConfig\n"
        "lab = Lab(LabConfig(pods=1, dns_servers=1)); lab.start()\n"
        "print(lab.id, flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, child.kill)  # never let a stuck child outlive the test
    watchdog.start()
    try:
        assert child.stdout is not None
        dead_id = child.stdout.readline().strip()
        assert dead_id, "child lab did not start"
        child.send_signal(signal.SIGKILL)  # no atexit, no finally: a crash
        child.wait(timeout=10)
        orphans = sorted(ns for ns in lab_namespaces() if ns.startswith(f"dglab-{dead_id}-"))
        assert len(orphans) == 3
        dns_pids = {int(p) for p in subprocess.run(
            ["ip", "netns", "pids", f"dglab-{dead_id}-dns0"], capture_output=True, text=True,
            check=True).stdout.split()}
        assert len(dns_pids) == 1  # its dnsmasq outlived the owner
        assert len(list(Path(tempfile.gettempdir()).glob(f"dglab-{dead_id}-*"))) == 1

        removed = Lab.remove_stale()

        assert sorted(ns for ns in removed if ns.startswith(f"dglab-{dead_id}-")) == orphans
        assert not any(ns.startswith(f"dglab-{dead_id}-") for ns in lab_namespaces())
        assert not (ETC_NETNS / f"dglab-{dead_id}-pod0").exists()
        assert not (OWNER_DIR / dead_id).exists()
        assert not list(Path(tempfile.gettempdir()).glob(f"dglab-{dead_id}-*"))
        assert not any(running(p) for p in dns_pids)
        # The live lab is untouched and still works.
        assert not any(ns.startswith(f"dglab-{live.id}-") for ns in removed)
        assert resolve(live, 0, service_name(0))[service_name(0)].get("addrs") == \
            expected_addrs(0)
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        Lab.remove_stale()


def test_ipvs_lab_builds_only_where_the_kernel_has_ipvs(lab_host: None) -> None:
    lab = Lab(LabConfig(ProxyMode.IPVS, ipv6=True))
    try:
        lab.start()
    except LabUnavailable:
        # Refused before creating anything (this host: no ip_vs, no dummy links).
        assert_gone(lab, set())
        assert not Path("/proc/net/ip_vs").exists() or not Path("/sys/module/dummy").exists()
        return
    with lab:  # e.g. in the qemu VM: the lab must be a working ipvs-mode node
        services = lab.node_run(["ipvsadm", "-S", "-n"]).stdout
        assert f"-A -u {DNS_CLUSTER_IPS[Family.V4]}:53 -s rr" in services
        assert "kube-ipvs0" in lab.node_run(["ip", "link", "show", "kube-ipvs0"]).stdout
        lab.flush_conntrack()
        got = resolve(lab, 0, service_name(0))[service_name(0)]
        assert got.get("addrs") == expected_addrs(0)
        assert lab.conntrack_entries() == 1  # net.ipv4.vs.conntrack=1: IPVS is tracked


# --------------------------------------------------------------------------- values


def test_config_is_validated() -> None:
    for bad in ({"pods": 0}, {"dns_servers": 100}, {"names": 0}, {"iptables": "xtables"}):
        with pytest.raises(ValueError):
            LabConfig(**bad)  # type: ignore[arg-type]


def test_chain_names_are_kube_proxys() -> None:
    # Known names from real clusters: kube-dns's UDP and TCP service chains.
    svc = kubeproxy.kube_dns(DNS_CLUSTER_IPS[Family.V4], [dns_pod_ip(0)])
    udp, tcp = kubeproxy.KUBE_DNS_PORTS
    assert kubeproxy.svc_chain(svc, udp) == "KUBE-SVC-TCOU7JCQXEZGVUNU"
    assert kubeproxy.svc_chain(svc, tcp) == "KUBE-SVC-ERIFXISQEP7F7OF4"
    assert kubeproxy.nft_service_chain(svc, tcp) == \
        "service-NWBZK7IH-kube-system/kube-dns/tcp/dns-tcp"


def test_run_in_refuses_namespaces_of_other_labs() -> None:
    with pytest.raises(LabError, match="not a namespace of"):
        Lab(LabConfig()).run_in("dglab-000000-node", ["true"])
