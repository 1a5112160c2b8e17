"""A simulated Kubernetes node made of network namespaces, for real-kernel tests.

dnsguard's claims are about the kernel: that NOTRACK rules stop the conntrack race, that
they are installed ahead of kube-proxy's DNAT, that removing them restores the node byte
for byte. Fakes cannot prove any of that, so integration tests build this lab::

      pod0 ─┐                       ┌─ dns0  (dnsmasq standing in for CoreDNS)
      pod1 ─┼── br0 in "node" ──────┼─ dns1
             198.18.0.1/24, kube-proxy rules, conntrack, br_netfilter

* every piece lives in namespaces named ``dglab-<6 hex>-{node,podN,dnsN}``; nothing is
  ever configured in the namespace the tests run in, and the only addresses used are
  198.18.0.0/15, fd00:198:18::/48 (and 169.254.20.10, reserved for a node-local cache).
  The node has no uplink and no default route, so no packet can leave the lab;
* pods reach CoreDNS through the DNS Service's ClusterIP, DNATed by kube-proxy rules that
  `dnsguard.testing.kubeproxy` renders the way kube-proxy does (iptables mode with either
  iptables flavour, nftables mode, or ipvs mode where the kernel has IPVS);
* CoreDNS replies to a pod on the same bridge are *bridged*, not routed, so the node sees
  them only through br_netfilter (``bridge-nf-call-ip{,6}tables=1``, per namespace on
  current kernels), exactly the path on bridge-CNI nodes where the DNS race bites;
* pods get kubelet's resolv.conf (``ndots:5`` and the cluster search path) through
  ``/etc/netns/<pod>/resolv.conf``, which ``ip netns exec`` bind-mounts for glibc.

Teardown is the other half of the design. `Lab` is a context manager whose `close` is
idempotent, runs even when `start` failed halfway (every resource is recorded as it is
created), ends only processes the lab started (by their `Popen`, then by PID for anything
left inside the lab's own namespaces), and is also registered with `atexit`. A lab whose
owning process died (SIGKILL, OOM) is found by `Lab.remove_stale`: each lab writes an
owner file with its owner's PID and start time before it creates anything, so a stale lab
can be told from a live one that a parallel test run is using.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import dnsguard
from dnsguard.model import Backend, Family, IPAddress, IPNetwork, NodeFacts, ProxyMode, Table
from dnsguard.testing import kubeproxy
from dnsguard.testing.lookups import DEFAULT_GRACE, LoadResult, WorkerResult, merge

__all__ = [
    "CLUSTER_DOMAIN",
    "DNS_CLUSTER_IPS",
    "NAME_NETWORKS",
    "NODELOCAL_IP",
    "NODE_IPS",
    "POD_CIDRS",
    "PREFIX",
    "SERVICE_CIDRS",
    "Lab",
    "LabCommandError",
    "LabConfig",
    "LabError",
    "LabUnavailable",
    "LoadRun",
    "dns_pod_ip",
    "lab_namespaces",
    "pod_ip",
    "service_addresses",
    "service_fqdn",
    "service_name",
]

IptablesFlavour = Literal["legacy", "nft"]

#: Every namespace a lab creates starts with this; `Lab.remove_stale` relies on it.
PREFIX = "dglab-"
#: Where labs record their owner (PID and start time) while they exist.
OWNER_DIR = Path("/run/dnsguard-lab")
#: Where `ip netns exec` looks for per-namespace /etc overrides.
ETC_NETNS = Path("/etc/netns")

CLUSTER_DOMAIN = "cluster.local"
#: kubelet's search path for a pod in the "default" namespace.
SEARCH = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")

POD_CIDRS: dict[Family, IPNetwork] = {
    Family.V4: ipaddress.ip_network("198.18.0.0/24"),
    Family.V6: ipaddress.ip_network("fd00:198:18::/64"),
}
SERVICE_CIDRS: dict[Family, IPNetwork] = {
    Family.V4: ipaddress.ip_network("198.18.1.0/24"),
    Family.V6: ipaddress.ip_network("fd00:198:18:1::/112"),
}
DNS_CLUSTER_IPS: dict[Family, IPAddress] = {
    Family.V4: ipaddress.ip_address("198.18.1.10"),
    Family.V6: ipaddress.ip_address("fd00:198:18:1::a"),
}
#: The node's address on the pod bridge: the pods' default gateway.
NODE_IPS: dict[Family, IPAddress] = {
    Family.V4: ipaddress.ip_address("198.18.0.1"),
    Family.V6: ipaddress.ip_address("fd00:198:18::1"),
}
#: Addresses the service names resolve to (DNS data only; nothing listens there).
NAME_NETWORKS: dict[Family, IPNetwork] = {
    Family.V4: ipaddress.ip_network("198.19.0.0/16"),
    Family.V6: ipaddress.ip_network("fd00:198:18:ff::/64"),
}
#: NodeLocal DNSCache's conventional link-local listen address (reserved for the cache).
NODELOCAL_IP = ipaddress.ip_address("169.254.20.10")

# Host parts of the first client pod and the first CoreDNS pod. They read the same in both
# families (198.18.0.11 / fd00:198:18::11), so v4 counts in decimal and v6 in hex.
_POD_BASE = {Family.V4: 11, Family.V6: 0x11}
_DNS_BASE = {Family.V4: 101, Family.V6: 0x101}
_MAX_PODS = 89  # keeps v4 pod IPs below the DNS pods' .101
_MAX_DNS = 99
_MAX_NAMES = 10_000  # host-records go on dnsmasq's command line
_BRIDGE = "br0"
_IPVS_LINK = "kube-ipvs0"


def pod_ip(i: int, family: Family = Family.V4) -> IPAddress:
    """Address of client pod `i` (0-based)."""
    return POD_CIDRS[family].network_address + _POD_BASE[family] + i


def dns_pod_ip(i: int, family: Family = Family.V4) -> IPAddress:
    """Address of CoreDNS pod `i` (0-based): the Service's endpoints."""
    return POD_CIDRS[family].network_address + _DNS_BASE[family] + i


def service_name(i: int) -> str:
    """Short name of service `i`, resolvable from pods through the search path."""
    return f"svc-{i}"


def service_fqdn(i: int) -> str:
    return f"{service_name(i)}.default.svc.{CLUSTER_DOMAIN}"


def service_addresses(i: int) -> dict[Family, IPAddress]:
    """The A and AAAA answers for service `i` (in every lab, dual-stack or not)."""
    return {f: net.network_address + i + 1 for f, net in NAME_NETWORKS.items()}


@dataclass(frozen=True)
class LabConfig:
    """The shape of one lab. Frozen: a lab is built once from it and never changes shape.

    `iptables` picks the flavour kube-proxy writes its rules with in iptables and ipvs
    modes; dnsguard must detect it and coexist with either. `names` is how many service
    names CoreDNS answers (``svc-0`` ... ``svc-<names-1>`` in ``default``).
    """

    proxy_mode: ProxyMode = ProxyMode.IPTABLES
    iptables: IptablesFlavour = "legacy"
    ipv6: bool = False
    pods: int = 2
    dns_servers: int = 2
    names: int = 16
    #: dnsmasq logs every query to its log file; handy when debugging, slow under load.
    log_queries: bool = False
    #: TTL of the CoreDNS pods' answers; CoreDNS's kubernetes plugin answers with 5 s (dnsmasq's
    #: own default, 0, would make every answer uncacheable for a node-local cache)
    answer_ttl: int = 5
    #: Extra dnsmasq options for every CoreDNS pod: the lab's stand-in for Corefile
    #: customisations (``--host-record=db.corp.internal,198.19.100.1`` for a private zone,
    #: an override of a public name), which a node-local cache must keep answering as the
    #: cluster DNS does.
    dns_extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.iptables not in ("legacy", "nft"):
            raise ValueError(f"iptables must be 'legacy' or 'nft', not {self.iptables!r}")
        if not 1 <= self.pods <= _MAX_PODS:
            raise ValueError(f"pods must be in 1..{_MAX_PODS}")
        if not 1 <= self.dns_servers <= _MAX_DNS:
            raise ValueError(f"dns_servers must be in 1..{_MAX_DNS}")
        if not 1 <= self.names <= _MAX_NAMES:
            raise ValueError(f"names must be in 1..{_MAX_NAMES}")
        if not 0 <= self.answer_ttl <= 86400:
            raise ValueError("answer_ttl must be in 0..86400")
        bad = [a for a in self.dns_extra_args if not a.startswith("--") or "\n" in a]
        if bad:
            raise ValueError(f"dns_extra_args must be dnsmasq long options, not {bad!r}")

    @property
    def families(self) -> tuple[Family, ...]:
        return (Family.V4, Family.V6) if self.ipv6 else (Family.V4,)

    def label(self) -> str:
        """Short readable id, e.g. ``iptables-legacy-dual`` (test ids, bench rows)."""
        mode = self.proxy_mode.value
        if self.proxy_mode is not ProxyMode.NFTABLES:
            mode += f"-{self.iptables}"
        return f"{mode}-{'dual' if self.ipv6 else 'v4'}"


class LabError(RuntimeError):
    """Building, using or tearing down a lab failed."""


class LabUnavailable(LabError):
    """This machine cannot build the requested lab (not root, no IPVS, missing tool).

    Raised before anything is created, so callers can skip instead of fail.
    """


class LabCommandError(LabError):
    """A command the lab ran failed; carries what it printed (stderr is the diagnosis)."""

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{' '.join(self.argv)} {what}: {stderr.strip() or stdout.strip()}")


def _run(
    argv: Sequence[str],
    input: str | None = None,
    check: bool = True,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout,
            check=False, stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise LabCommandError(argv, None, out, err) from exc
    if check and cp.returncode != 0:
        raise LabCommandError(argv, cp.returncode, cp.stdout, cp.stderr)
    return cp


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    cp = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in cp.stdout.split() if p.isdigit()]


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a live owner from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces; fields after the last ")" are fixed.
    return stat.rsplit(")", 1)[1].split()[19]


def _kill_pids(pids: Sequence[int], timeout: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL what is still alive after `timeout`; returns survivors."""
    alive = list(pids)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05 if alive else 0)
    return [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _normalize_save(text: str) -> str:
    """Drop what changes without anyone changing rules: timestamps and counters."""
    out = []
    for raw in text.splitlines():
        if raw.startswith(("# Generated by", "# Completed on")):
            continue
        line = re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1 [0:0]", raw)
        out.append(re.sub(r"\bcounter packets \d+ bytes \d+", "counter", line))
    return "\n".join(out)


_LIVE: set[Lab] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _close_live_labs() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


class Lab:
    """One simulated node. Use as a context manager; everything is gone after ``close``.

    Helpers run commands inside the lab's namespaces (`node_run`, `pod_run`, `dns_run`),
    read its conntrack table, snapshot its netfilter state (`save_rules`) and drive DNS
    load from its pods (`lookup_load`). The properties under "facts" describe the node the
    way dnsguard's own discovery should find it, so tests can compare the two.
    """

    def __init__(
        self, config: LabConfig | None = None, *, workdir: Path | None = None
    ) -> None:
        self.config = config or LabConfig()
        self.id = secrets.token_hex(3)
        self.node_netns = f"{PREFIX}{self.id}-node"
        self.pod_netns = tuple(f"{PREFIX}{self.id}-pod{i}" for i in range(self.config.pods))
        self.dns_netns = tuple(
            f"{PREFIX}{self.id}-dns{i}" for i in range(self.config.dns_servers)
        )
        self._workdir_arg = workdir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir: Path | None = None
        self._created_ns: list[str] = []
        self._etc_dirs: list[Path] = []
        self._created_etc_netns = False
        self._owner_file: Path | None = None
        self._procs: list[subprocess.Popen[str]] = []
        self._dns_procs: list[subprocess.Popen[str]] = []
        # Per DNS pod: does it serve the lab's names (CoreDNS) or nothing at all (a node
        # resolver that knows none of them), its extra options, and records replacing the
        # default ones for the current start (`start_dns`).
        self._dns_specs: list[_DnsSpec] = [_DnsSpec() for _ in range(self.config.dns_servers)]
        #: DNS pods behind the Service (kube-proxy's endpoints), see `set_service_endpoints`.
        self._endpoints: tuple[int, ...] = tuple(range(self.config.dns_servers))
        self._logs: list[IO[str]] = []
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"Lab({self.id}, {self.config.label()})"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Lab:
        """Start the lab unless already started; either way `close` runs on exit, so
        ``lab.start(); with lab: ...`` is fine too."""
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Build the lab; on any failure tear down what was built and re-raise.

        Raises `LabUnavailable` before creating anything when this machine cannot build
        the requested lab.
        """
        if self._started or self._closed:
            raise LabError(f"{self!r} already {'closed' if self._closed else 'started'}")
        self._check_prerequisites()
        self._started = True
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._write_owner()
            if self._workdir_arg is None:
                self._tmp = tempfile.TemporaryDirectory(prefix=f"{PREFIX}{self.id}-")
                self.workdir = Path(self._tmp.name)
            else:
                self.workdir = self._workdir_arg
                self.workdir.mkdir(parents=True, exist_ok=True)
            self._build_node()
            for i, ns in enumerate(self.pod_netns):
                self._build_pod(ns, f"vp{i}", [pod_ip(i, f) for f in self.config.families])
                self._write_resolv_conf(ns)
            for i, ns in enumerate(self.dns_netns):
                self._build_pod(ns, f"vd{i}", [dns_pod_ip(i, f) for f in self.config.families])
            self._start_dns()
            self._install_kube_proxy(first=True)
            self._wait_dns_ready()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove everything the lab created; safe to call twice or after a failed start.

        Tries every step even when one fails, then raises `LabError` listing what could
        not be removed, because a leak must be loud.
        """
        with self._lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
        errors: list[str] = []
        procs = self._procs + self._dns_procs
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + 3.0
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=3.0)
                except subprocess.TimeoutExpired:
                    errors.append(f"pid {p.pid} survived SIGKILL")
        for f in self._logs:
            f.close()
        # Anything else inside our namespaces was started by us (e.g. a grandchild of a
        # timed-out command); end it by PID before deleting the namespace under it.
        for ns in reversed(self._created_ns):
            survivors = _kill_pids(_netns_pids(ns))
            if survivors:
                errors.append(f"processes {survivors} survived in {ns}")
            cp = _run(["ip", "netns", "del", ns], check=False)
            if cp.returncode != 0 and ns in _netns_list():
                errors.append(f"ip netns del {ns}: {cp.stderr.strip()}")
        for d in self._etc_dirs:
            shutil.rmtree(d, ignore_errors=True)
            if d.exists():
                errors.append(f"could not remove {d}")
        if self._created_etc_netns:
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()  # only if empty: another lab may be using it
        if self._tmp is not None:
            self._tmp.cleanup()
        if self._owner_file is not None:
            self._owner_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                OWNER_DIR.rmdir()  # only if empty
        with _LIVE_LOCK:
            _LIVE.discard(self)
        leaked = [ns for ns in _netns_list() if ns.startswith(f"{PREFIX}{self.id}-")]
        if leaked:
            errors.append(f"namespaces left: {leaked}")
        if errors:
            raise LabError(f"{self!r} teardown incomplete: " + "; ".join(errors))

    @staticmethod
    def remove_stale() -> list[str]:
        """Delete what labs whose owner has died left behind: namespaces (and the
        processes in them), /etc/netns dirs, owner files and temporary work directories.

        Labs of live owners, e.g. a parallel test run, are left alone. Returns the removed
        namespace names.
        """
        removed: list[str] = []
        by_lab: dict[str, list[str]] = {}
        for ns in _netns_list():
            m = re.fullmatch(rf"{re.escape(PREFIX)}([0-9a-f]+)-\w+", ns)
            if m:
                by_lab.setdefault(m.group(1), []).append(ns)
        # Each decision reads the owner file afresh: a lab writes it before creating
        # anything, so a lab being built right now is always seen as alive.
        for lab_id, names in sorted(by_lab.items()):
            if _owner_alive(OWNER_DIR / lab_id):
                continue
            for ns in names:
                _kill_pids(_netns_pids(ns))
                _run(["ip", "netns", "del", ns], check=False)
                shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
                removed.append(ns)
        for d in ETC_NETNS.glob(f"{PREFIX}*") if ETC_NETNS.is_dir() else []:
            lab_id = d.name[len(PREFIX):].split("-", 1)[0]
            if not _owner_alive(OWNER_DIR / lab_id) and d.name not in _netns_list():
                shutil.rmtree(d, ignore_errors=True)
        # Work directories a killed owner could not remove (TemporaryDirectory names).
        for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
            m = re.fullmatch(rf"{re.escape(PREFIX)}([0-9a-f]+)-[\w]+", d.name)
            if m and d.is_dir() and not _owner_alive(OWNER_DIR / m.group(1)):
                shutil.rmtree(d, ignore_errors=True)
        for owner in OWNER_DIR.glob("*") if OWNER_DIR.is_dir() else []:
            if re.fullmatch("[0-9a-f]+", owner.name) and not _owner_alive(owner):
                owner.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            OWNER_DIR.rmdir()  # only if empty
        return removed

    # ------------------------------------------------------------------ facts

    @property
    def proxy_mode(self) -> ProxyMode:
        return self.config.proxy_mode

    @property
    def families(self) -> tuple[Family, ...]:
        return self.config.families

    @property
    def dns_ips(self) -> tuple[IPAddress, ...]:
        """The DNS Service's ClusterIPs (what pods' resolv.conf and NOTRACK rules target)."""
        return tuple(DNS_CLUSTER_IPS[f] for f in self.families)

    @property
    def dns_endpoints(self) -> tuple[IPAddress, ...]:
        """CoreDNS pod IPs, every family."""
        return tuple(dns_pod_ip(i, f) for f in self.families for i in self._endpoints)

    @property
    def service_endpoints(self) -> tuple[int, ...]:
        """Indices of the DNS pods currently behind the DNS Service."""
        return self._endpoints

    @property
    def pod_cidrs(self) -> tuple[IPNetwork, ...]:
        return tuple(POD_CIDRS[f] for f in self.families)

    @property
    def service_cidrs(self) -> tuple[IPNetwork, ...]:
        return tuple(SERVICE_CIDRS[f] for f in self.families)

    @property
    def kube_proxy_backend(self) -> Backend:
        """Which tool kube-proxy's rules were written with."""
        if self.proxy_mode is ProxyMode.NFTABLES:
            return Backend.NFTABLES
        return Backend.IPTABLES_LEGACY if self.config.iptables == "legacy" else Backend.IPTABLES_NFT

    @property
    def facts(self) -> NodeFacts:
        """What dnsguard should discover on this node."""
        return NodeFacts(
            proxy_mode=self.proxy_mode,
            dns_ips=self.dns_ips,
            pod_cidrs=self.pod_cidrs,
            families=frozenset(self.families),
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Short names of every service CoreDNS answers."""
        return tuple(service_name(i) for i in range(self.config.names))

    # ------------------------------------------------------------------ running things

    def run_in(
        self, netns: str, argv: Sequence[str], input: str | None = None, check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in one of this lab's namespaces (``ip netns exec``)."""
        if netns not in (self.node_netns, *self.pod_netns, *self.dns_netns):
            raise LabError(f"{netns} is not a namespace of {self!r}")
        return _run(["ip", "netns", "exec", netns, *argv], input=input, check=check,
                    timeout=timeout)

    def node_run(
        self, argv: Sequence[str], input: str | None = None, check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` on the node (where kube-proxy's rules and dnsguard live)."""
        return self.run_in(self.node_netns, argv, input, check, timeout)

    def pod_run(
        self, i: int, argv: Sequence[str], input: str | None = None, check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in client pod `i`, with the pod's resolv.conf in place."""
        return self.run_in(self.pod_netns[i], argv, input, check, timeout)

    def dns_run(
        self, i: int, argv: Sequence[str], input: str | None = None, check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in CoreDNS pod `i`."""
        return self.run_in(self.dns_netns[i], argv, input, check, timeout)

    def popen_in(
        self, netns: str, argv: Sequence[str], *, stdout: int | IO[str] | None = None,
        stderr: int | IO[str] | None = None, env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """Start a long-running process in a lab namespace; `close` ends it.

        For daemons under test (dnsguard's agent, a node-local cache). The caller may stop
        it earlier; the lab only ever signals the PID it started.
        """
        if netns not in (self.node_netns, *self.pod_netns, *self.dns_netns):
            raise LabError(f"{netns} is not a namespace of {self!r}")
        p = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=stderr, text=True, env=env, start_new_session=True,
        )
        self._procs.append(p)
        return p

    # ------------------------------------------------------------------ observing

    def conntrack_entries(self, port: int = 53) -> int:
        """Conntrack entries on the node whose *original* destination port is `port`.

        UDP and TCP, both families. Untracked (NOTRACK) packets create none, which is what
        tests use to prove dnsguard's rules are in effect.
        """
        total = 0
        for fam in ("ipv4", "ipv6"):
            out = self.node_run(["conntrack", "-L", "-f", fam]).stdout
            for line in out.splitlines():
                fields = line.split()
                if not fields or fields[0] not in ("udp", "tcp"):
                    continue
                dport = next((f for f in fields if f.startswith("dport=")), None)
                if dport == f"dport={port}":
                    total += 1
        return total

    def flush_conntrack(self) -> None:
        """Empty the node's conntrack table (both families)."""
        for fam in ("ipv4", "ipv6"):
            self.node_run(["conntrack", "-F", "-f", fam])

    def save_rules(self) -> str:
        """A normalised snapshot of all netfilter state on the node.

        Both iptables flavours, both families, plus ``nft list ruleset`` (and ipvsadm in
        ipvs mode), without timestamps and counters, so two snapshots are equal exactly
        when the rules are. Reading never creates tables.
        """
        sections = []
        tools = [
            ["iptables-legacy-save"], ["ip6tables-legacy-save"],
            ["iptables-nft-save"], ["ip6tables-nft-save"],
            ["nft", "list", "ruleset"],
        ]
        if self.proxy_mode is ProxyMode.IPVS:
            tools.append(["ipvsadm", "-S", "-n"])
        for argv in tools:
            out = self.node_run(argv).stdout
            sections.append(f"### {' '.join(argv)}\n{_normalize_save(out)}")
        return "\n".join(sections) + "\n"

    def dns_log(self, i: int) -> str:
        """What CoreDNS pod `i`'s dnsmasq has logged so far."""
        if self.workdir is None:
            return ""
        path = self.workdir / f"dnsmasq-{i}.log"
        return path.read_text() if path.exists() else ""

    # ------------------------------------------------------------------ acting

    def dns_running(self, i: int) -> bool:
        """Whether DNS pod `i`'s dnsmasq is running."""
        return self._dns_procs[i].poll() is None

    def stop_dns(self, i: int) -> None:
        """Stop DNS pod `i`'s dnsmasq (the process the lab started, by its PID).

        The pod's namespace and address stay: like a CoreDNS container that died, queries
        to it are refused (TCP RST, ICMP port unreachable) rather than unanswered.
        """
        p = self._dns_procs[i]
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def start_dns(
        self, i: int, records: dict[str, Sequence[IPAddress]] | None = None,
        timeout: float = 10.0,
    ) -> None:
        """(Re)start DNS pod `i`'s dnsmasq and wait until it answers.

        `records` (FQDN -> addresses) replace the lab's own records of those names for
        this start, so a test can tell a fresh answer from a cached one.
        """
        if self.dns_running(i):
            raise LabError(f"dnsmasq in {self.dns_netns[i]} is already running")
        spec = self._dns_specs[i]
        self._dns_specs[i] = _DnsSpec(spec.serve_names, spec.extra_args, tuple(
            (name, tuple(str(a) for a in addrs)) for name, addrs in (records or {}).items()))
        self._spawn_dns(i)
        self._wait_dns_answering(i, timeout)

    def add_dns_pod(
        self, *, serve_names: bool = True, extra_args: Sequence[str] = (), timeout: float = 10.0,
    ) -> int:
        """Build one more DNS pod on the bridge, start its dnsmasq, return its index.

        It is not behind the Service until `set_service_endpoints` says so: a CoreDNS pod of
        a rollout before it is ready. With ``serve_names=False`` it knows no name at all
        (NXDOMAIN for everything): a node resolver that knows nothing of the cluster.
        """
        i = len(self.dns_netns)
        if i >= _MAX_DNS:
            raise LabError(f"at most {_MAX_DNS} DNS pods")
        if any(not a.startswith("--") or "\n" in a for a in extra_args):
            raise ValueError(f"extra_args must be dnsmasq long options, not {extra_args!r}")
        ns = f"{PREFIX}{self.id}-dns{i}"
        self.dns_netns = (*self.dns_netns, ns)
        self._dns_specs.append(_DnsSpec(serve_names, tuple(extra_args)))
        self._build_pod(ns, f"vd{i}", [dns_pod_ip(i, f) for f in self.families])
        self._spawn_dns(i)
        self._wait_dns_answering(i, timeout)
        return i

    def set_service_endpoints(self, indices: Sequence[int]) -> None:
        """Point the DNS Service at these DNS pods, as kube-proxy does after an
        EndpointSlice change (its chains rewritten in place)."""
        if not indices or any(not 0 <= i < len(self.dns_netns) for i in indices):
            raise ValueError(f"endpoints must be DNS pods of this lab, not {list(indices)}")
        self._endpoints = tuple(indices)
        if self.proxy_mode is ProxyMode.IPVS:
            self.node_run(["ipvsadm", "-C"])
            self.node_run(["ipvsadm", "-R"],
                          input=kubeproxy.ipvsadm_restore(list(self._services().values())))
        self._install_kube_proxy(first=False)

    def _wait_dns_answering(self, i: int, timeout: float) -> None:
        """dnsmasq of pod `i` answers (any rcode) on each of its addresses."""
        deadline = time.monotonic() + timeout
        for fam in self.families:
            while True:
                proc = self._dns_procs[i]
                if proc.poll() is not None:
                    raise LabError(f"dnsmasq in {self.dns_netns[i]} exited {proc.returncode}:"
                                   f"\n{self.dns_log(i)}")
                cp = self.dns_run(i, ["dig", "+time=1", "+tries=1", f"@{dns_pod_ip(i, fam)}",
                                      f"{service_fqdn(0)}.", "A"], check=False, timeout=5)
                if "status: " in cp.stdout:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"dnsmasq in {self.dns_netns[i]} not answering on "
                                   f"{dns_pod_ip(i, fam)}: {cp.stdout}{cp.stderr}")
                time.sleep(0.05)

    def resync_kube_proxy(self) -> None:
        """Re-apply kube-proxy's rules as its periodic full sync would.

        Chains are rewritten in place; jumps from built-in chains are only re-inserted
        (first in line) when missing, the way kube-proxy ensures them. A dnsguard that
        survives this keeps working on real nodes.
        """
        self._install_kube_proxy(first=False)

    def lookup_load(
        self,
        pods: Sequence[int] | None = None,
        names: Sequence[str] | None = None,
        *,
        count: int = 100,
        concurrency: int = 4,
        duration: float = 10.0,
        grace: float = DEFAULT_GRACE,
    ) -> LoadResult:
        """Run the lookup worker in several pods at once and merge their results.

        `count` and `concurrency` are per pod; every worker stops starting lookups after
        `duration` seconds and gives up on stuck ones `grace` seconds later, so the whole
        call returns within about ``duration + grace`` seconds.
        """
        return self.start_lookup_load(pods, names, count=count, concurrency=concurrency,
                                      duration=duration, grace=grace).result()

    def start_lookup_load(
        self,
        pods: Sequence[int] | None = None,
        names: Sequence[str] | None = None,
        *,
        count: int = 100,
        concurrency: int = 4,
        duration: float = 10.0,
        grace: float = DEFAULT_GRACE,
        interval: float | None = None,
    ) -> LoadRun:
        """Start the lookup workers and return at once; `LoadRun.result` collects them.

        With `interval` each worker runs open loop (a lookup every `interval` seconds, at
        most `concurrency` in flight, `count` ignored) and reports every lookup as a
        `Sample`, so a test can inject a fault while pods resolve and line the lookups up
        with it. Bounded like `lookup_load`.
        """
        pods = list(range(self.config.pods)) if pods is None else list(pods)
        names = list(self.names) if names is None else list(names)
        env = dict(os.environ)
        src = str(Path(dnsguard.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        procs = []
        for i in pods:
            argv = [
                sys.executable, "-m", "dnsguard.testing.lookups",
                "--names", ",".join(names), "--count", str(count),
                "--concurrency", str(concurrency), "--duration", str(duration),
                "--grace", str(grace), "--label", f"pod{i}",
            ]
            if interval is not None:
                argv += ["--interval", str(interval), "--samples"]
            procs.append(self.popen_in(self.pod_netns[i], argv, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=env))
        # + interpreter start-up
        return LoadRun(self, pods, procs, time.monotonic() + duration + grace + 15.0)

    def _forget(self, procs: Sequence[subprocess.Popen[str]]) -> None:
        with self._lock:
            self._procs = [p for p in self._procs if p not in procs]

    # ------------------------------------------------------------------ building

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise LabUnavailable("the lab needs root")
        tools = ["ip", "dnsmasq", "dig", "conntrack", "nft", "iptables-legacy-save",
                 "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"]
        if self.proxy_mode is ProxyMode.IPVS:
            tools += ["ipvsadm", "modprobe"]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise LabUnavailable(f"missing tools: {', '.join(missing)}")
        if self.proxy_mode is ProxyMode.IPVS:
            # Module loading is global, not a network setting; nothing else is touched
            # outside the lab's namespaces.
            for mod in ("ip_vs", "dummy"):
                _run(["modprobe", mod], check=False)
            if not Path("/proc/net/ip_vs").exists():
                raise LabUnavailable("kernel has no IPVS (modprobe ip_vs failed)")
            if not Path("/sys/module/dummy").exists():
                raise LabUnavailable("kernel has no dummy links (modprobe dummy failed)")

    def _write_owner(self) -> None:
        pid = os.getpid()
        self._owner_file = OWNER_DIR / self.id
        tmp = OWNER_DIR / f".{self.id}.tmp"
        for _ in range(3):  # another lab may rmdir an empty OWNER_DIR under us
            OWNER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                # Atomic: remove_stale must never read a half-written file as "owner dead".
                tmp.write_text(f"{pid} {_proc_start_time(pid)}\n")
                tmp.replace(self._owner_file)
                return
        raise LabError(f"cannot write {self._owner_file}")

    def _ip(self, *args: str) -> None:
        _run(["ip", *args])

    def _add_netns(self, ns: str, *settings: str) -> None:
        """Create a namespace and apply its sysctls before any link exists in it.

        IPv6 DAD is off everywhere: a tentative link-local address on the node's bridge
        keeps the node from resolving neighbours for about a second after start, which
        would make the first IPv6 lookups time out for reasons that are not the lab's
        subject. ICMP redirects are off too (the node routes pod -> ClusterIP -> pod
        back out of the bridge it came from, which would otherwise trigger them).
        """
        _run(["ip", "netns", "add", ns])
        self._created_ns.append(ns)
        self._ip("-n", ns, "link", "set", "lo", "up")
        if Path("/proc/sys/net/ipv6").exists():
            settings = (
                "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_redirects=0",
                "net.ipv6.conf.default.accept_redirects=0", *settings,
            )
        self._sysctl(ns, "net.ipv4.conf.all.accept_redirects=0",
                     "net.ipv4.conf.default.accept_redirects=0", *settings)

    def _sysctl(self, ns: str, *settings: str) -> None:
        self.run_in(ns, ["sysctl", "-q", "-w", *settings])

    def _build_node(self) -> None:
        ns = self.node_netns
        self._add_netns(ns, "net.ipv4.conf.all.send_redirects=0",
                        "net.ipv4.conf.default.send_redirects=0")
        has_bridge_nf = self.run_in(ns, ["test", "-d", "/proc/sys/net/bridge"], check=False)
        if has_bridge_nf.returncode != 0:
            # Built into some kernels, a module on others; a failure here shows up as a
            # clear sysctl error just below.
            _run(["modprobe", "br_netfilter"], check=False)
        settings = [
            "net.ipv4.ip_forward=1",
            # Per namespace on current kernels: this node's bridged traffic (CoreDNS
            # replying to a pod on the same bridge) must pass through its netfilter.
            "net.bridge.bridge-nf-call-iptables=1",
            "net.bridge.bridge-nf-call-ip6tables=1",
        ]
        if self.config.ipv6:
            settings.append("net.ipv6.conf.all.forwarding=1")
        self._sysctl(ns, *settings)
        self._ip("-n", ns, "link", "add", _BRIDGE, "type", "bridge")
        for fam in self.families:
            net = POD_CIDRS[fam]
            self._ip("-n", ns, "addr", "add", f"{NODE_IPS[fam]}/{net.prefixlen}", "dev", _BRIDGE,
                     *(["nodad"] if fam is Family.V6 else []))
        self._ip("-n", ns, "link", "set", _BRIDGE, "up")
        # A real node reaches Service IPs through its default route; kube-proxy then DNATs
        # them in OUTPUT. Without a route, host-network lookups fail before netfilter runs.
        for fam in self.families:
            self._ip("-n", ns, f"-{fam.value}", "route", "add", str(SERVICE_CIDRS[fam]),
                     "dev", _BRIDGE)

    def _build_pod(self, ns: str, host_if: str, addrs: Sequence[IPAddress]) -> None:
        self._add_netns(ns)
        node = self.node_netns
        # Both veth ends are created from inside the lab: nothing appears in the caller's
        # namespace even for a moment.
        self._ip("-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
        self._ip("-n", node, "link", "set", host_if, "master", _BRIDGE, "up")
        for addr in addrs:
            fam = Family.of(addr)
            self._ip("-n", ns, "addr", "add", f"{addr}/{POD_CIDRS[fam].prefixlen}", "dev", "eth0",
                     *(["nodad"] if fam is Family.V6 else []))
        self._ip("-n", ns, "link", "set", "eth0", "up")
        for addr in addrs:
            fam = Family.of(addr)
            self._ip("-n", ns, f"-{fam.value}", "route", "add", "default", "via",
                     str(NODE_IPS[fam]))

    def _write_resolv_conf(self, ns: str) -> None:
        """kubelet's resolv.conf for a ClusterFirst pod; the first ClusterIP is the server
        (kubelet writes the first of --cluster-dns, which is IPv4 on dual-stack)."""
        if not ETC_NETNS.exists():
            self._created_etc_netns = True
        d = ETC_NETNS / ns
        self._etc_dirs.append(d)
        for _ in range(3):  # another lab may rmdir an empty /etc/netns under us
            try:
                ETC_NETNS.mkdir(exist_ok=True)
                d.mkdir(exist_ok=True)
                break
            except FileNotFoundError:
                continue
        (d / "resolv.conf").write_text(
            f"nameserver {self.dns_ips[0]}\n"
            f"search {' '.join(SEARCH)}\n"
            "options ndots:5\n"
        )

    def _dnsmasq_argv(self, i: int) -> list[str]:
        spec = self._dns_specs[i]
        argv = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--bind-interfaces", "--pid-file=", "--log-facility=-", "--cache-size=0",
            # Authoritative-style answers: unknown names in the cluster domain are
            # NXDOMAIN, and so is everything else, as a real upstream would answer; the
            # lab never forwards anywhere.
            f"--local=/{CLUSTER_DOMAIN}/", "--local=/#/",
            f"--local-ttl={self.config.answer_ttl}",
        ]
        argv += [f"--listen-address={dns_pod_ip(i, f)}" for f in self.families]
        if self.config.log_queries:
            argv.append("--log-queries")
        if not spec.serve_names:
            return argv + list(spec.extra_args)
        records: dict[str, tuple[str, ...]] = {}
        for n in range(self.config.names):
            a = service_addresses(n)
            records[service_fqdn(n)] = (str(a[Family.V4]), str(a[Family.V6]))
        records.update(spec.records)
        argv += [f"--host-record={name},{','.join(addrs)}" for name, addrs in records.items()]
        return argv + list(self.config.dns_extra_args) + list(spec.extra_args)

    def _start_dns(self) -> None:
        for i in range(len(self.dns_netns)):
            self._spawn_dns(i)

    def _spawn_dns(self, i: int) -> None:
        assert self.workdir is not None
        log = (self.workdir / f"dnsmasq-{i}.log").open("a")
        self._logs.append(log)
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.dns_netns[i], *self._dnsmasq_argv(i)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, text=True,
            start_new_session=True,
        )
        with self._lock:
            if i < len(self._dns_procs):
                self._dns_procs[i] = p
            else:
                self._dns_procs.append(p)

    def _wait_dns_ready(self, timeout: float = 10.0) -> None:
        """Each dnsmasq answers on each of its addresses, and the ClusterIP works from a
        pod: the lab is only handed out once DNS through the Service works."""
        expect = service_addresses(0)
        deadline = time.monotonic() + timeout
        pending = [(i, f) for i in range(len(self.dns_netns)) for f in self.families]
        while pending:
            i, fam = pending[0]
            proc = self._dns_procs[i]
            if proc.poll() is not None:
                raise LabError(f"dnsmasq in {self.dns_netns[i]} exited {proc.returncode}:\n"
                               f"{self.dns_log(i)}")
            cp = self.dns_run(i, ["dig", "+short", "+time=1", "+tries=1",
                                  f"@{dns_pod_ip(i, fam)}", f"{service_fqdn(0)}.", "A"],
                              check=False, timeout=5)
            if cp.returncode == 0 and cp.stdout.split() == [str(expect[Family.V4])]:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise LabError(f"dnsmasq in {self.dns_netns[i]} not answering on "
                               f"{dns_pod_ip(i, fam)}: {cp.stdout}{cp.stderr}\n{self.dns_log(i)}")
            time.sleep(0.05)
        for cluster_ip in self.dns_ips:
            cp = self.pod_run(0, ["dig", "+short", "+time=2", "+tries=2", f"@{cluster_ip}",
                                  f"{service_fqdn(0)}.", "A"], check=False, timeout=10)
            if cp.stdout.split() != [str(expect[Family.V4])]:
                raise LabError(f"DNS through ClusterIP {cluster_ip} does not work: "
                               f"{cp.stdout}{cp.stderr}")

    def _services(self) -> dict[Family, kubeproxy.Service]:
        return {
            f: kubeproxy.kube_dns(
                DNS_CLUSTER_IPS[f], [dns_pod_ip(i, f) for i in self._endpoints]
            )
            for f in self.families
        }

    def _iptables_tool(self, family: Family, suffix: str = "") -> str:
        base = "iptables" if family is Family.V4 else "ip6tables"
        return f"{base}-{self.config.iptables}{suffix}"

    def _install_kube_proxy(self, first: bool) -> None:
        services = self._services()
        if self.proxy_mode is ProxyMode.NFTABLES:
            script = "".join(
                kubeproxy.nft_script(f, [svc], POD_CIDRS[f]) for f, svc in services.items()
            )
            self.node_run(["nft", "-f", "-"], input=script)
            return
        if self.proxy_mode is ProxyMode.IPVS and first:
            self._install_ipvs(services)
        render = (kubeproxy.iptables_restore if self.proxy_mode is ProxyMode.IPTABLES
                  else kubeproxy.ipvs_iptables_restore)
        for fam, svc in services.items():
            texts = render(fam, [svc], POD_CIDRS[fam], jumps=first)
            for table in (Table.FILTER, Table.NAT):
                self.node_run([self._iptables_tool(fam, "-restore"), "--noflush"],
                              input=texts[table])
            if not first:
                self._ensure_jumps(fam)

    def _ensure_jumps(self, family: Family) -> None:
        tool = self._iptables_tool(family)
        for jump in kubeproxy.iptables_jumps():
            base = [tool, "-w", "-t", jump.table.value]
            if self.node_run([*base, "-C", jump.chain, *jump.args], check=False).returncode:
                self.node_run([*base, "-I", jump.chain, "1", *jump.args])

    def _install_ipvs(self, services: dict[Family, kubeproxy.Service]) -> None:
        ns = self.node_netns
        self._ip("-n", ns, "link", "add", _IPVS_LINK, "type", "dummy")
        for fam, svc in services.items():
            self._ip("-n", ns, "addr", "add", f"{svc.cluster_ip}/{svc.cluster_ip.max_prefixlen}",
                     "dev", _IPVS_LINK, *(["nodad"] if fam is Family.V6 else []))
        # kube-proxy leaves kube-ipvs0 down, which is enough for IPv4 (local routes exist
        # regardless) but keeps IPv6 addresses tentative, without a local route, so the
        # IPv6 ClusterIP would never reach IPVS. Up is the one deviation, and harmless.
        self._ip("-n", ns, "link", "set", _IPVS_LINK, "up")
        self._sysctl(ns, "net.ipv4.vs.conntrack=1", "net.ipv4.vs.expire_nodest_conn=1",
                     "net.ipv4.vs.expire_quiescent_template=1")
        self.node_run(["ipvsadm", "-R"], input=kubeproxy.ipvsadm_restore(list(services.values())))


class LoadRun:
    """Lookup workers running in pods (`Lab.start_lookup_load`); `result` waits for them."""

    def __init__(self, lab: Lab, pods: Sequence[int], procs: list[subprocess.Popen[str]],
                 deadline: float) -> None:
        self.lab = lab
        self.pods = list(pods)
        self.procs = procs
        self.deadline = deadline

    def result(self) -> LoadResult:
        """Wait for every worker (killing one that overruns its bound) and merge."""
        results: list[WorkerResult] = []
        errors: list[str] = []
        for i, p in zip(self.pods, self.procs, strict=True):
            try:
                out, err = p.communicate(timeout=max(self.deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                errors.append(f"pod{i}: worker did not finish in time")
                continue
            line = out.strip().splitlines()[-1] if out.strip() else ""
            if p.returncode != 0 or not line:
                errors.append(f"pod{i}: worker exited {p.returncode}: {err.strip()[-500:]}")
                continue
            results.append(WorkerResult.from_json(line, label=f"pod{i}"))
        self.lab._forget(self.procs)
        if errors:
            raise LabError("lookup load failed: " + "; ".join(errors))
        return merge(results)


@dataclass(frozen=True)
class _DnsSpec:
    """How one DNS pod's dnsmasq is started (see `Lab.start_dns`, `Lab.add_dns_pod`)."""

    serve_names: bool = True
    extra_args: tuple[str, ...] = ()
    records: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _owner_alive(owner_file: Path) -> bool:
    try:
        pid_s, start = owner_file.read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _proc_start_time(pid) == start


def lab_namespaces() -> list[str]:
    """Every namespace that looks like a lab's, live or stale (for leak checks)."""
    return [ns for ns in _netns_list() if ns.startswith(PREFIX)]
