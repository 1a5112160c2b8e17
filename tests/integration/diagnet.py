"""A small routed "node" in network namespaces for the doctor and probe tests.

Why not the lab (dnsguard.testing.lab): these tests were written before it was committed;
they need only one DNS pod, one client pod and a kube-proxy-shaped DNAT, and they must
induce faults (NOTRACK rules, a full table, an overflowing DNS server) on a node no other
test shares. Switching to the lab later changes only this file.

    pod  (198.18.2.11) ── veth ── node (198.18.2.1 | 198.18.0.1) ── veth ── dns (198.18.0.101)
                                   iptables-nft nat: ClusterIP 198.18.1.10:53 -> 198.18.0.101

Routed, not bridged: every packet, replies included, crosses the node's netfilter hooks, so
the DNAT is undone on the way back without br_netfilter. Namespaces are named
``dgdoc-<6 hex>-{node,dns,pod}``; only 198.18.0.0/15 addresses are used; nothing is configured
outside them except ``/etc/netns/<pod>/resolv.conf`` (which ``ip netns exec`` bind-mounts for
glibc), removed on close. `close` ends the processes this helper started, by PID, then anything
left in its own namespaces, then deletes the namespaces, even after a failed start.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLUSTER_IP = "198.18.1.10"
DNS_IP = "198.18.0.101"
NODE_IP = "198.18.0.1"
NODE_LOCAL_IP = "169.254.20.10"
POD_IP = "198.18.2.11"
PROBE_NAME = "kubernetes.default.svc.cluster.local"
PY = sys.executable

KUBE_PROXY_NAT = f"""\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
:KUBE-SVC-ERIFXISQEP7F7OF4 - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
:KUBE-SEP-ZP3FB6NMPNCO4VBJ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d {CLUSTER_IP}/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -d {CLUSTER_IP}/32 -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp cluster IP" -m tcp --dport 53 -j KUBE-SVC-ERIFXISQEP7F7OF4
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/kube-dns:dns -> {DNS_IP}:53" -j KUBE-SEP-IT2ZTR26TO4XFPTO
-A KUBE-SVC-ERIFXISQEP7F7OF4 -m comment --comment "kube-system/kube-dns:dns-tcp -> {DNS_IP}:53" -j KUBE-SEP-ZP3FB6NMPNCO4VBJ
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination {DNS_IP}:53
-A KUBE-SEP-ZP3FB6NMPNCO4VBJ -p tcp -m comment --comment "kube-system/kube-dns:dns-tcp" -m tcp -j DNAT --to-destination {DNS_IP}:53
COMMIT
"""


def unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "iptables-nft-restore", "dnsmasq", "conntrack"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def run(argv: list[str], *, check: bool = True, timeout: float = 60.0,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                        check=False)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp


class DiagNode:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.node, self.dns, self.pod = (f"dgdoc-{tag}-{r}" for r in ("node", "dns", "pod"))
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[str]] = []
        self._etc = Path("/etc/netns") / self.pod
        self.dnsmasq: subprocess.Popen[str] | None = None

    def __enter__(self) -> DiagNode:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- building ---------------------------------------------------------------------

    def _ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._created.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _link(self, ns_a: str, if_a: str, ip_a: str, ns_b: str, if_b: str, ip_b: str) -> None:
        run(["ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
             "netns", ns_b])
        for ns, dev, ip in ((ns_a, if_a, ip_a), (ns_b, if_b, ip_b)):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])

    def _build(self) -> None:
        for ns in (self.node, self.dns, self.pod):
            self._ns(ns)
        self._link(self.node, "to-dns", NODE_IP, self.dns, "eth0", DNS_IP)
        self._link(self.node, "to-pod", "198.18.2.1", self.pod, "eth0", POD_IP)
        run(["ip", "-n", self.dns, "route", "add", "default", "via", NODE_IP])
        run(["ip", "-n", self.pod, "route", "add", "default", "via", "198.18.2.1"])
        # The ClusterIP range needs a route for the node's own lookups to be routed before
        # OUTPUT's DNAT re-routes them (a real node has a default route).
        run(["ip", "-n", self.node, "route", "add", "198.18.1.0/24", "dev", "to-dns"])
        self.node_run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.node_run(["iptables-nft-restore", "--noflush"], stdin=KUBE_PROXY_NAT)
        self._etc.mkdir(parents=True, exist_ok=True)
        (self._etc / "resolv.conf").write_text(
            f"nameserver {CLUSTER_IP}\nsearch default.svc.cluster.local svc.cluster.local "
            "cluster.local\noptions ndots:5 timeout:1 attempts:1\n")
        self.start_dnsmasq()

    def start_dnsmasq(self, *extra: str) -> subprocess.Popen[str]:
        argv = ["ip", "netns", "exec", self.dns, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                "--no-resolv", "--no-hosts", "--bind-interfaces", f"--listen-address={DNS_IP}",
                "--local=/cluster.local/", "--cache-size=0", "--pid-file=", "--user=root",
                "--group=root", f"--host-record={PROBE_NAME},198.19.0.1,fd00:198:18:ff::1",
                "--host-record=svc-0.default.svc.cluster.local,198.19.0.2", *extra]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._procs.append(proc)
        self.dnsmasq = proc
        self._wait_dns()
        return proc

    def start_node_cache(self) -> subprocess.Popen[str]:
        """A NodeLocal-DNSCache-shaped cache: the ClusterIP and 169.254.20.10 on a local link
        (a port-less bridge: this kernel has no dummy links), NOTRACK for DNS to them so pods'
        queries are delivered locally instead of DNATed, and a dnsmasq answering there."""
        self.node_run(["ip", "link", "add", "dgdoc0", "type", "bridge"])
        self.node_run(["ip", "link", "set", "dgdoc0", "up"])
        rules = ["*raw"]
        for ip in (NODE_LOCAL_IP, CLUSTER_IP):
            self.node_run(["ip", "addr", "add", f"{ip}/32", "dev", "dgdoc0"])
            for chain in ("PREROUTING", "OUTPUT"):
                for proto in ("udp", "tcp"):
                    rules.append(f"-A {chain} -d {ip}/32 -p {proto} -m {proto} --dport 53 "
                                 '-m comment --comment "node-cache" -j NOTRACK')
            rules.append(f"-A OUTPUT -s {ip}/32 -p udp -m udp --sport 53 -j NOTRACK")
        self.node_run(["iptables-nft-restore", "--noflush"], stdin="\n".join([*rules, "COMMIT"]) + "\n")
        argv = ["ip", "netns", "exec", self.node, "dnsmasq", "--no-daemon",
                "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces",
                f"--listen-address={NODE_LOCAL_IP}", f"--listen-address={CLUSTER_IP}",
                "--cache-size=0", "--pid-file=", "--user=root", "--group=root",
                f"--host-record={PROBE_NAME},198.19.0.1,fd00:198:18:ff::1"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._procs.append(proc)
        self._wait_dns(NODE_LOCAL_IP)
        return proc

    def _wait_dns(self, server: str = DNS_IP, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cp = self.node_run(["dig", "+short", "+time=1", "+tries=1", f"@{server}", PROBE_NAME],
                               check=False) if shutil.which("dig") else None
            if cp is None or (cp.returncode == 0 and "198.19.0.1" in cp.stdout):
                return
            time.sleep(0.1)
        raise RuntimeError(f"DNS on {server} did not answer within {timeout}s")

    # --- running ----------------------------------------------------------------------

    def exec_in(self, ns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], **kw)

    def node_run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.exec_in(self.node, argv, **kw)

    def cli(self, ns: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``dnsguard probe|doctor ...`` inside ``ns`` (via the standalone entry point)."""
        return self.exec_in(ns, [PY, "-m", "dnsguard.cli_diag", *args], check=False,
                            timeout=timeout)

    def doctor(self, *args: str, window: float = 2.0, resolv: Path | None = None
               ) -> tuple[int, dict[str, Any]]:
        extra = ["--resolv-conf", str(resolv) if resolv else ""]
        cp = self.cli(self.node, "doctor", "--json", "--window", str(window), *extra, *args,
                      timeout=window * 3 + 30)
        assert cp.returncode in (0, 3, 4), f"doctor failed ({cp.returncode}): {cp.stderr}"
        return cp.returncode, json.loads(cp.stdout)

    def conntrack_count(self) -> int:
        return int(self.node_run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).stdout)

    # --- teardown ---------------------------------------------------------------------

    def _pids_in(self, ns: str) -> list[int]:
        cp = run(["ip", "netns", "pids", ns], check=False)
        return [int(p) for p in cp.stdout.split()]

    def close(self) -> None:
        errors: list[str] = []
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
            if proc.stderr is not None:
                proc.stderr.close()
        for ns in reversed(self._created):
            for pid in self._pids_in(ns):  # started by us (inside our own namespace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            cp = run(["ip", "netns", "del", ns], check=False)
            if cp.returncode != 0:
                errors.append(f"ip netns del {ns}: {cp.stderr.strip()}")
        self._created.clear()
        with contextlib.suppress(FileNotFoundError):
            (self._etc / "resolv.conf").unlink()
        with contextlib.suppress(OSError):
            self._etc.rmdir()
        if errors:
            raise RuntimeError("; ".join(errors))


def udp_blast(ns: str, dst: str, port: int, count: int, *, vary_port: bool,
              payload: bytes = b"") -> None:
    """Send ``count`` UDP datagrams from ``ns`` as fast as Python can (bounded by count).

    ``vary_port``: a new socket (source port) per datagram, so each makes a conntrack entry
    (datagrams conntrack refuses, with the table full, are skipped); otherwise one socket. With ``payload`` empty, each is a DNS query for PROBE_NAME.
    """
    body = payload or (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
                       + b"".join(bytes([len(p)]) + p.encode() for p in PROBE_NAME.split("."))
                       + b"\x00\x00\x01\x00\x01")
    code = f"""
import socket
dst, port, count, vary = {dst!r}, {port}, {count}, {vary_port}
body = {body!r}
if vary:
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(body, (dst, port + (i % 1000)))
        except PermissionError:  # conntrack refused a new entry: the table is full
            pass
        s.close()
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    sent = 0
    while sent < count:
        try:
            s.sendto(body, (dst, port)); sent += 1
        except BlockingIOError:
            pass
"""
    run(["ip", "netns", "exec", ns, PY, "-c", code], timeout=120)

