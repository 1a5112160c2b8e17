"""The node-local cache's exposure, with the real unbound in a lab node.

Who it answers (access-control) and how fast one client may query it (ip-ratelimit), as
rendered by `render_unbound`. Every lab address is in 198.18.0.0/15, which the cache allows
as non-global space (`CLUSTER_PRIVATE`): to see a refusal here, that list is emptied for the
test, so only loopback, the listen address and the pod CIDR given are allowed.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import dnsguard.plan.cache as cache_plan
from dnsguard.model import Family
from dnsguard.plan.cache import CacheSpec, render_unbound
from dnsguard.testing.lab import NODE_IPS, Lab, LabConfig, dns_pod_ip, pod_ip, service_fqdn
from tests.support.lab_helpers import fake_api, nodelocal_args, stop_agent, wait_for

pytestmark = pytest.mark.root

NODE = NODE_IPS[Family.V4]

BURST = r"""
import socket, struct, sys, time
from dnsguard.dnswire import build_query
server, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
for i in range(n):
    s.sendto(build_query(name, 1, i), (server, 53))
s.settimeout(2.0)
got = set()
try:
    while True:
        got.add(struct.unpack("!H", s.recv(4096)[:2])[0])
except TimeoutError:
    pass
print(len(got))
"""


def dig_status(lab: Lab, pod: int, server: str, name: str) -> str:
    out = lab.pod_run(pod, ["dig", f"@{server}", name, "+tries=1", "+time=3"],
                      check=False).stdout
    m = re.search(r"status: (\w+)", out)
    return m.group(1) if m else "TIMEOUT"


def start_unbound(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  client_qps: int = 0) -> subprocess.Popen[str]:
    monkeypatch.setattr(cache_plan, "CLUSTER_PRIVATE", ())
    spec = CacheSpec(listen=(NODE,), health_port=53053, cluster_domain="cluster.local",
                     cluster_upstreams=((dns_pod_ip(0), 53),), external_upstreams=(),
                     ipv6=False, pod_cidrs=(ipaddress.ip_network(f"{pod_ip(0)}/32"),),
                     client_qps=client_qps)
    conf = tmp_path / "unbound.conf"
    conf.write_text(render_unbound(spec, tmp_path))
    log = (tmp_path / "unbound.out").open("w")
    proc = lab.popen_in(lab.node_netns, ["unbound", "-d", "-c", str(conf)], stdout=log,
                        stderr=subprocess.STDOUT)
    log.close()
    wait_for(lambda: dig_status(lab, 0, str(NODE), service_fqdn(1)) == "NOERROR", timeout=20)
    return proc


@pytest.fixture
def lab():
    with Lab(LabConfig()) as lab:
        yield lab


def test_the_cache_answers_its_pods_and_refuses_other_sources(
        lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = start_unbound(lab, tmp_path, monkeypatch)
    try:
        assert dig_status(lab, 0, str(NODE), service_fqdn(1)) == "NOERROR"  # in the pod CIDR
        assert dig_status(lab, 1, str(NODE), service_fqdn(1)) == "REFUSED"  # outside it
        # the node itself: a query to a local address leaves with that address as its source
        out = lab.node_run(["dig", f"@{NODE}", service_fqdn(1), "+tries=1", "+time=3"],
                           check=False).stdout
        assert "status: NOERROR" in out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_one_client_cannot_take_the_whole_cache(
        lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = start_unbound(lab, tmp_path, monkeypatch, client_qps=20)
    try:
        answered = int(lab.pod_run(0, [sys.executable, "-c", BURST, str(NODE),
                                       service_fqdn(1), "400"]).stdout)
        print(f"ip-ratelimit 20: {answered} of 400 answered")
        # 20 a second plus one in ten of the rest (ip-ratelimit-factor 10); without the limit
        # every one of the 400 is answered from the cache
        assert answered < 150, answered
        assert answered >= 20
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_without_a_limit_the_same_burst_is_answered(
        lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline of the test above: the burst itself is not what loses answers."""
    proc = start_unbound(lab, tmp_path, monkeypatch, client_qps=0)
    try:
        answered = int(lab.pod_run(0, [sys.executable, "-c", BURST, str(NODE),
                                       service_fqdn(1), "400"]).stdout)
        print(f"no ip-ratelimit: {answered} of 400 answered")
        assert answered >= 300, answered
    finally:
        proc.terminate()
        proc.wait(timeout=10)



#: The container's capabilities (deploy/base/daemonset.yaml): root, with only these.
POD_CAPS = "net_admin,net_raw,net_bind_service,setuid,setgid,kill"


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in /proc/{pid}/status")


def test_the_cache_drops_to_its_user_and_still_reloads_and_stops(lab: Lab) -> None:
    """The agent with the pod's capabilities only: unbound binds 53 on the ClusterIP and
    169.254.20.10, then runs as ``unbound`` with no capabilities; reload and
    reload_keep_cache keep it answering; its log and control socket work; the agent stops it."""
    # a state dir the unbound user can search (pytest's tmp_path is under a 0700 directory)
    base = Path(tempfile.mkdtemp(prefix="dnsguard-privs-", dir="/tmp"))
    base.chmod(0o755)
    state = base / "state"
    try:
        args = [*nodelocal_args(lab, state), "--metrics-address", "off"]
        with (base / "agent.log").open("w") as out:
            # allowPrivilegeEscalation: false is no_new_privs
            agent = lab.popen_in(lab.node_netns, [
                "setpriv", "--no-new-privs", "--inh-caps", "-all",
                "--bounding-set", f"-all,+{POD_CAPS.replace(',', ',+')}",
                "--", sys.executable, "-m", "dnsguard", "run", *args],
                stdout=out, stderr=subprocess.STDOUT)
        try:
            name = service_fqdn(1)
            wait_for(lambda: dig_status(lab, 0, "169.254.20.10", name) == "NOERROR", timeout=30)
            assert dig_status(lab, 0, str(lab.dns_ips[0]), name) == "NOERROR"
            m = re.search(r"started unbound, pid (\d+)", (base / "agent.log").read_text())
            assert m, (base / "agent.log").read_text()
            pid = int(m.group(1))
            uid = str(pwd.getpwnam("unbound").pw_uid)
            assert status_field(pid, "Uid").split() == [uid] * 4
            assert int(status_field(pid, "CapEff"), 16) == 0
            assert int(status_field(pid, "CapPrm"), 16) == 0
            assert "is not root" not in (base / "agent.log").read_text()
            conf = str(state / "unbound.conf")
            for command in ("reload", "reload_keep_cache"):
                before = (state / "unbound.log").stat().st_size
                res = lab.node_run(["unbound-control", "-c", conf, command], check=False)
                assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
                for server in ("169.254.20.10", str(lab.dns_ips[0])):
                    assert dig_status(lab, 0, server, name) == "NOERROR", (command, server)
                # the same process, still unprivileged, still writing its log
                assert status_field(pid, "Uid").split() == [uid] * 4
                wait_for(lambda b=before: (state / "unbound.log").stat().st_size > b, 10)
            assert stop_agent(agent) == 0
            assert not Path(f"/proc/{pid}").exists() or \
                status_field(pid, "State").startswith("Z")
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("user", ["unbound", "root"])
def test_a_new_cluster_ip_is_answered_after_the_change(lab: Lab, tmp_path: Path,
                                                       user: str) -> None:
    """The DNS Service gets a new ClusterIP: unbound must listen there, not just say 'ok'.

    A reload keeps unbound's sockets and never binds the new address (an unprivileged unbound
    could not); the agent restarts it instead. ``root``: a state dir under pytest's private
    tmp, where the agent keeps unbound's user (the fallback) - the same must hold.
    """
    base = Path(tempfile.mkdtemp(prefix="dnsguard-cip-", dir="/tmp"))
    base.chmod(0o755 if user == "unbound" else 0o700)
    try:
        kubeconfig = base / "kubeconfig"
        with fake_api(lab, kubeconfig) as call:
            call("put_service", "kube-system", "kube-dns", ["198.18.1.10"])
            call("put_endpoint_slice", "kube-system", "kube-dns-a", service="kube-dns",
                 endpoints=[str(dns_pod_ip(0))])
            call("put_node", "node-a", ["198.18.0.0/24"])
            resolv = base / "node-resolv.conf"
            resolv.write_text(f"nameserver {dns_pod_ip(0)}\n")
            args = ["--mitigation", "nodelocal", "--kubeconfig", str(kubeconfig),
                    "--node-name", "node-a", "--state-dir", str(base / "state"),
                    "--node-resolv-conf", str(resolv), "--sync-interval", "1",
                    "--metrics-address", "off"]
            env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
            log = base / "agent.log"
            with log.open("w") as out:
                agent = lab.popen_in(lab.node_netns, [
                    "setpriv", "--no-new-privs", "--inh-caps", "-all",
                    "--bounding-set", f"-all,+{POD_CAPS.replace(',', ',+')}",
                    "--", sys.executable, "-m", "dnsguard", "run", *args],
                    stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                name = service_fqdn(1)
                # (198.18.1.10 also answers through kube-proxy: wait for the cache itself)
                wait_for(lambda: "intercepting DNS to 169.254.20.10, 198.18.1.10" in
                         log.read_text(), 30)
                assert dig_status(lab, 0, "198.18.1.10", name) == "NOERROR"
                call("put_service", "kube-system", "kube-dns", ["198.18.1.11"])
                wait_for(lambda: dig_status(lab, 0, "198.18.1.11", name) == "NOERROR", 30)
                assert dig_status(lab, 0, "169.254.20.10", name) == "NOERROR"
                pids = re.findall(r"started unbound, pid (\d+)", log.read_text())
                assert len(pids) == 2, log.read_text()  # restarted, not reloaded
                uid = status_field(int(pids[-1]), "Uid").split()[0]
                want = str(pwd.getpwnam("unbound").pw_uid) if user == "unbound" else "0"
                assert uid == want
                assert ("keeps running as the agent's user" in log.read_text()) == \
                    (user == "root")
                assert stop_agent(agent) == 0
            finally:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)
