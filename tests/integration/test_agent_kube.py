"""The real agent in a lab node, taking its facts from a fake Kubernetes API server.

The fake server (dnsguard.testing.fake_apiserver) speaks the list/watch HTTP+JSON protocol and
runs in the node's namespace; the agent talks to it through the official client. What this
cannot prove: RBAC, API priority and fairness, the real watch cache's timing, TLS and real
authentication (the fake is plain HTTP with a static token).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dnsguard.model import ProxyMode
from dnsguard.testing.lab import Lab, LabConfig, dns_pod_ip
from tests.support.lab_helpers import dnsguard, fake_api, lock_file, status, stop_agent, wait_for

pytestmark = pytest.mark.root

NODE = "node-a"


@pytest.fixture
def lab():
    with Lab(LabConfig(proxy_mode=ProxyMode.IPTABLES, iptables="nft", ipv6=False)) as lab:
        yield lab


@pytest.fixture
def api(lab: Lab, tmp_path: Path):
    kubeconfig = tmp_path / "kubeconfig"
    with fake_api(lab, kubeconfig) as call:
        call("put_service", "kube-system", "kube-dns", ["198.18.1.10"])
        call("put_endpoint_slice", "kube-system", "kube-dns-a", service="kube-dns",
             endpoints=[str(dns_pod_ip(0)), str(dns_pod_ip(1))])
        call("put_node", NODE, ["198.18.0.0/24"])
        yield call, kubeconfig


def _args(tmp_path: Path, kubeconfig: Path) -> list[str]:
    resolv = tmp_path / "node-resolv.conf"
    resolv.write_text(f"nameserver {dns_pod_ip(0)}\n")
    return ["--mitigation", "nodelocal", "--kubeconfig", str(kubeconfig), "--node-name", NODE,
            "--state-dir", str(tmp_path / "state"), "--node-resolv-conf", str(resolv),
            "--sync-interval", "1"]


@pytest.fixture
def agent(lab: Lab, api, tmp_path: Path):
    call, kubeconfig = api
    args = [*_args(tmp_path, kubeconfig), "--lock-file", str(lock_file(lab))]
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with log.open("w") as out:
        proc = lab.popen_in(lab.node_netns, [sys.executable, "-m", "dnsguard", "run", *args],
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: (status(lab, args).get("cache") or {}).get("intercepting") is True,
                 timeout=30)
    except AssertionError:
        stop_agent(proc)
        raise AssertionError(log.read_text()) from None
    yield proc, args, log, call
    if proc.poll() is None:
        stop_agent(proc)


def _conf(tmp_path: Path) -> str:
    return (tmp_path / "state" / "unbound.conf").read_text()


def _cluster_zone(tmp_path: Path) -> str:
    """The cluster domain's forward-zone block of unbound's config."""
    return _conf(tmp_path).split('name: "cluster.local."', 1)[1].split("forward-zone:", 1)[0]


def test_facts_come_from_the_api_and_pods_resolve_through_the_cache(
        lab: Lab, agent, tmp_path: Path) -> None:
    _, args, _, _ = agent
    conf = _conf(tmp_path)
    assert "interface: 198.18.1.10@53" in conf  # the ClusterIP, from the Service
    zone = _cluster_zone(tmp_path)
    assert "forward-addr: 198.18.0.101@53" in zone and "forward-addr: 198.18.0.102@53" in zone
    assert lab.lookup_load(count=20, concurrency=2, duration=15).summary().failed == 0
    st = status(lab, args)
    assert st["in_sync"] is True and st["kube"]["connected"] is True  # type: ignore[index]


def test_endpoint_change_reloads_unbound_without_a_restart(lab: Lab, agent, tmp_path: Path) -> None:
    _, args, log, call = agent
    pid = status(lab, args)["cache"]["pid"]  # type: ignore[index]
    call("put_endpoint_slice", "kube-system", "kube-dns-a", service="kube-dns",
         endpoints=[str(dns_pod_ip(1))])
    try:
        took = wait_for(lambda: "198.18.0.101@53" not in _cluster_zone(tmp_path), timeout=5)
    except AssertionError:
        raise AssertionError(log.read_text()[-3000:]) from None
    print(f"\nendpoint change reached unbound's config after {took:.2f}s")
    assert took <= 2.0
    wait_for(lambda: "unbound reloaded its config and kept its cache" in log.read_text(),
             timeout=5)
    cache = status(lab, args)["cache"]
    assert cache["pid"] == pid and cache["restarts"] == 0  # type: ignore[index]
    assert lab.lookup_load(count=10, concurrency=2, duration=15).summary().failed == 0


def test_service_cluster_ip_change_moves_the_interception(lab: Lab, agent, tmp_path: Path) -> None:
    _, args, log, call = agent
    call("put_service", "kube-system", "kube-dns", ["198.18.1.11"])
    def ours() -> str:
        return "\n".join(ln for ln in lab.save_rules().splitlines() if "dnsguard:" in ln)

    took = wait_for(lambda: "198.18.1.11" in ours() and "198.18.1.10" not in ours(), timeout=5)
    print(f"\nClusterIP change reached the rules after {took:.2f}s")
    assert took <= 2.0
    wait_for(lambda: "interface: 198.18.1.11@53" in _conf(tmp_path), timeout=5)
    assert "rules changed outside dnsguard" not in log.read_text()  # a new plan is not drift
    addrs = lab.node_run(["ip", "-br", "addr", "show", "dnsguard0"]).stdout
    assert "198.18.1.11/32" in addrs and "198.18.1.10/32" not in addrs


def test_api_outage_keeps_the_rules_and_status_says_so(lab: Lab, agent, tmp_path: Path) -> None:
    _, args, _, call = agent
    before = lab.save_rules()
    call("outage")
    wait_for(lambda: status(lab, args).get("kube", {}).get("connected") is False, timeout=15)
    st = status(lab, args)
    assert st["in_sync"] is True and st["cache"]["intercepting"] is True  # type: ignore[index]
    assert lab.save_rules() == before
    assert lab.lookup_load(count=10, concurrency=2, duration=15).summary().failed == 0
    call("restore")
    wait_for(lambda: status(lab, args).get("kube", {}).get("connected") is True, timeout=40)


def test_one_shot_commands_read_the_api_and_fail_clearly_without_it(
        lab: Lab, api, tmp_path: Path) -> None:
    call, kubeconfig = api
    args = _args(tmp_path, kubeconfig)
    res = dnsguard(lab, "plan", *args)
    assert res.returncode == 0, res.stderr
    assert "198.18.1.10" in res.stdout
    call("outage")
    res = dnsguard(lab, "plan", *args, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("dnsguard: error:")


def test_doctor_takes_the_cluster_ip_from_the_api(lab: Lab, api, tmp_path: Path) -> None:
    call, kubeconfig = api
    # an address kube-proxy's rules do not know: only the API can have told doctor
    call("put_service", "kube-system", "kube-dns", ["198.18.1.99"])
    res = dnsguard(lab, "doctor", "--kubeconfig", str(kubeconfig), "--window", "0.5",
                   "--no-probe", "--json", timeout=120)
    assert res.returncode in (0, 3, 4), res.stderr
    assert json.loads(res.stdout)["dns_ips"] == ["198.18.1.99"]
