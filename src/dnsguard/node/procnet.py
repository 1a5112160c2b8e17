"""DNS server processes, their namespaces' UDP counters, and resolv.conf.

A DNS server that cannot drain its socket drops queries *before* any log line is written: the
only trace is ``RcvbufErrors`` in the UDP MIB of the network namespace it lives in (a pod's own
namespace for CoreDNS, the host's for node-cache). ``/proc/PID/net/snmp`` shows the MIB of the
namespace of PID, so we can read every DNS pod's counters from the host without entering its
namespace. Several processes may share one namespace; `find_dns_servers` groups them so a
namespace's counters are read (and reported) once.

The counters are namespace-wide (any UDP socket there counts), which is exact for a pod that
runs only a DNS server and an over-approximation for the host namespace; the per-socket
``drops`` column of ``/proc/PID/net/udp`` for port 53 is read as well to say which it was.

Everything reads under an injectable ``proc_root``; nothing here writes.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DNS_SERVER_COMMS",
    "DnsServer",
    "ResolvConf",
    "UdpCounters",
    "UdpSocket",
    "decode_proc_addr",
    "find_dns_servers",
    "listening_udp",
    "parse_resolv_conf",
    "parse_snmp",
    "parse_snmp6",
    "parse_udp_sockets",
    "read_resolv_conf",
    "read_udp_counters",
]

#: ``/proc/PID/comm`` of the DNS servers we know (comm is at most 15 characters).
DNS_SERVER_COMMS = frozenset(
    {"coredns", "dnsmasq", "unbound", "named", "node-cache", "kresd", "pdns_recursor"})


@dataclass(frozen=True)
class DnsServer:
    """One network namespace holding DNS server processes (lowest PID first)."""

    netns: str  # "net:[4026531840]", the identity of the namespace
    pids: tuple[int, ...]
    comms: tuple[str, ...]

    @property
    def pid(self) -> int:
        return self.pids[0]

    @property
    def label(self) -> str:
        return f"{'/'.join(self.comms)} (pid {self.pid}, {self.netns})"


def find_dns_servers(proc_root: Path = Path("/proc"),
                     comms: frozenset[str] = DNS_SERVER_COMMS) -> list[DnsServer]:
    """DNS server processes by ``comm``, grouped by network namespace."""
    by_ns: dict[str, list[tuple[int, str]]] = {}
    try:
        entries = list(os.scandir(proc_root))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            comm = (Path(entry.path) / "comm").read_text().strip()
            if comm not in comms:
                continue
            netns = os.readlink(Path(entry.path) / "ns/net")
        except OSError:  # the process exited, or we may not look at it
            continue
        by_ns.setdefault(netns, []).append((int(entry.name), comm))
    servers = []
    for netns, procs in by_ns.items():
        procs.sort()
        servers.append(DnsServer(netns, tuple(p for p, _ in procs),
                                 tuple(dict.fromkeys(c for _, c in procs))))
    return sorted(servers, key=lambda s: s.pid)


@dataclass(frozen=True)
class UdpCounters:
    """UDP MIB of one namespace (IPv4 ``Udp:`` plus IPv6 ``Udp6*``) and port-53 socket drops."""

    rcvbuf_errors: int
    in_errors: int
    in_datagrams: int
    socket_drops: int | None = None  # sum of ``drops`` over UDP sockets bound to port 53


def parse_snmp(text: str, prefix: str = "Udp:") -> dict[str, int]:
    """``/proc/net/snmp``: pairs of lines (names, values) per protocol."""
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(prefix)]
    out: dict[str, int] = {}
    for names, values in zip(rows[0::2], rows[1::2], strict=False):
        out.update({n: int(v) for n, v in zip(names[1:], values[1:], strict=False)})
    return out


def parse_snmp6(text: str) -> dict[str, int]:
    """``/proc/net/snmp6``: one ``Name value`` pair per line."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


@dataclass(frozen=True)
class UdpSocket:
    local: str  # hex address as the kernel prints it
    port: int
    drops: int

    @property
    def address(self) -> str:
        return decode_proc_addr(self.local)


def decode_proc_addr(hexaddr: str) -> str:
    """``/proc/net/udp`` address -> text. The kernel prints each 32-bit word of the address
    in host byte order, so on little-endian machines every 4-byte group is reversed."""
    raw = bytes.fromhex(hexaddr)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def parse_udp_sockets(text: str) -> list[UdpSocket]:
    """``/proc/net/udp`` or ``udp6``: local address, port and the per-socket ``drops`` column."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 13 or ":" not in parts[1]:
            continue
        addr, _, port = parts[1].rpartition(":")
        out.append(UdpSocket(addr, int(port, 16), int(parts[-1])))
    return out


def listening_udp(proc_root: Path = Path("/proc")) -> set[tuple[str, int]]:
    """(address, port) of the UDP sockets of our own namespace."""
    out: set[tuple[str, int]] = set()
    for name in ("udp", "udp6"):
        try:
            socks = parse_udp_sockets((proc_root / "net" / name).read_text())
        except (OSError, ValueError):
            continue
        for sock in socks:
            try:
                out.add((sock.address, sock.port))
            except ValueError:
                continue
    return out


def read_udp_counters(proc_root: Path, pid: int | None = None,
                      port: int = 53) -> UdpCounters | None:
    """The UDP counters of PID's namespace (or of ours with ``pid=None``); None if unreadable."""
    base = proc_root / (str(pid) if pid is not None else "self") / "net"
    try:
        v4 = parse_snmp((base / "snmp").read_text())
    except (OSError, ValueError):
        return None
    try:
        v6 = parse_snmp6((base / "snmp6").read_text())
    except (OSError, ValueError):
        v6 = {}
    drops: int | None = None
    for name in ("udp", "udp6"):
        try:
            socks = parse_udp_sockets((base / name).read_text())
        except (OSError, ValueError):
            continue
        on_port = [s.drops for s in socks if s.port == port]
        if on_port:
            drops = (drops or 0) + sum(on_port)
    return UdpCounters(
        rcvbuf_errors=v4.get("RcvbufErrors", 0) + v6.get("Udp6RcvbufErrors", 0),
        in_errors=v4.get("InErrors", 0) + v6.get("Udp6InErrors", 0),
        in_datagrams=v4.get("InDatagrams", 0) + v6.get("Udp6InDatagrams", 0),
        socket_drops=drops,
    )


@dataclass(frozen=True)
class ResolvConf:
    """What glibc takes from resolv.conf for name expansion and retries (its defaults)."""

    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    ndots: int = 1
    timeout: float = 5.0
    attempts: int = 2

    def expand(self, name: str) -> tuple[str, ...]:
        """The names glibc's ``res_nsearch`` tries for ``name``, in order (absolute, no dot).

        A trailing dot means "absolute": only the name itself. Otherwise a name with at least
        ``ndots`` dots is tried as is first, then with each search domain; a name with fewer
        dots gets the search domains first and is tried as is last.
        """
        if name.endswith("."):
            return (name.rstrip("."),)
        with_domains = tuple(f"{name}.{d}" for d in self.search)
        if name.count(".") >= self.ndots:
            return (name, *with_domains)
        return (*with_domains, name)


def parse_resolv_conf(text: str) -> ResolvConf:
    """Parse like glibc: the last ``search``/``domain`` line wins; ndots is capped at 15."""
    nameservers: list[str] = []
    search: tuple[str, ...] = ()
    ndots, timeout, attempts = 1, 5.0, 2
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        parts = line.split()
        if not parts:
            continue
        key, args = parts[0], parts[1:]
        if key == "nameserver" and args:
            nameservers.append(args[0])
        elif key in ("search", "domain"):
            search = tuple(a.rstrip(".") for a in args if a.rstrip("."))
        elif key == "options":
            for opt in args:
                name, _, value = opt.partition(":")
                try:
                    if name == "ndots":
                        ndots = min(int(value), 15)
                    elif name == "timeout":
                        timeout = float(min(int(value), 30))
                    elif name == "attempts":
                        attempts = min(int(value), 5)
                except ValueError:
                    continue
    return ResolvConf(tuple(nameservers), search, ndots, timeout, attempts)


def read_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> ResolvConf | None:
    try:
        return parse_resolv_conf(path.read_text())
    except OSError:
        return None
