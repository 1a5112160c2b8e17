"""Frozen, validated settings from flags and ``DNSGUARD_*`` environment variables.

Every flag ``--some-flag`` can also come from ``DNSGUARD_SOME_FLAG``; the flag wins. Repeatable
flags take a comma-separated list from the environment. Values are parsed once, here, into typed
fields (addresses, networks, seconds as float), so nothing downstream re-parses strings. Any bad
value raises `ConfigError` whose message is one line naming the flag and the value.

Values are checked for what they mean, not only for their syntax: digits are ASCII only
(``str.isdigit`` takes ``²``, ``float`` takes fullwidth digits), durations are capped at
`MAX_SECONDS` (``1e300`` seconds overflows the timers that use it), addresses carry no
zone ID (Python's `ipaddress` keeps ``fe80::1%<anything>`` and prints it back into config
text) and are not IPv4-mapped IPv6 (``::ffff:10.96.0.10`` is the IPv4 address in disguise:
write it as IPv4), and each address flag refuses the kinds of address it cannot mean.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from dnsguard.model import Backend, IPAddress, IPNetwork, Mitigation, ProxyMode

Auto = Literal["auto"]
LogFormat = Literal["text", "json"]
ExternalVia = Literal["cluster", "node"]


MIB = 1 << 20


#: the longest duration any flag takes (a day): enough for every interval and drain, and far
#: below what the timers (threading waits, signal handling) can represent
MAX_SECONDS = 86400.0


class ConfigError(ValueError):
    """A bad flag or environment value; the message is one line fit for the user."""


@dataclass(frozen=True)
class ForwardZone:
    """``--forward-zone``: names at and under ``name`` go to ``addrs``, not to the cluster DNS.

    UDP unless ``tcp``: a zone forwarded elsewhere is usually a corporate or stub DNS outside
    the cluster, reached from the node's own network, where UDP is what every server answers
    and the node-to-server path has none of the pod-side conntrack races TCP avoids upstream.
    """

    name: str
    addrs: tuple[tuple[IPAddress, int], ...]
    tcp: bool = False


@dataclass(frozen=True)
class Settings:
    proxy_mode: ProxyMode | Auto = "auto"
    mitigation: Mitigation = Mitigation.NOTRACK
    dns_ips: tuple[IPAddress, ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()
    backend: Backend | Auto = "auto"
    sync_interval: float = 10.0
    log_format: LogFormat = "text"
    skip_teardown: bool = False
    #: drop TCP packets conntrack finds INVALID in filter INPUT (dnsguard's own chain)
    drop_invalid_input: bool = False
    #: DNAT pods' and the node's traffic to Services' external/LB IPs to their ClusterIPs
    external_to_cluster: bool = False
    #: the only ranges external IPs may be claimed from (empty: any not reserved)
    external_cidrs: tuple[IPNetwork, ...] = ()
    # node-local cache (--mitigation nodelocal)
    local_ips: tuple[IPAddress, ...] = (ipaddress.ip_address("169.254.20.10"),)
    upstreams: tuple[tuple[IPAddress, int], ...] = ()
    cluster_domain: str = "cluster.local"
    state_dir: Path = Path("/run/dnsguard")
    health_port: int = 53053
    node_resolv_conf: Path = Path("/etc/resolv.conf")
    drain_seconds: float = 2.0
    unbound: str = "unbound"
    #: zones forwarded to their own servers, sorted by name (--forward-zone)
    forward_zones: tuple[ForwardZone, ...] = ()
    #: where names the cache cannot answer go: the cluster DNS (same answers), or for names
    #: outside the cluster domain the node's resolv.conf (NodeLocal DNSCache's behaviour)
    external_via: ExternalVia = "cluster"
    #: bytes of cache, split msg 1/3 : rrset 2/3
    cache_size: int = 48 * MIB
    cache_max_ttl: float = 86400.0
    cache_negative_ttl: float = 5.0
    #: how long an expired answer may still be served while the upstreams fail; 0: never
    serve_stale: float = 300.0
    #: log every answer of the cache (client, name, type, rcode) to its log in the state dir
    log_queries: bool = False
    #: queries per second one client address may send to the cache; 0: unlimited
    #: 100000, not less: the benchmark's real resolvers (glibc, musl: 4 pods x 32 threads)
    #: send well over 10k qps from one pod, and every query over the limit is a resolver retry
    #: (5 s glibc, 2.5 s musl): 10000 cut node-local to 0.24x of kube-proxy's lookups/s with
    #: hundreds of lookups >= 1 s. 100k is beyond what one CoreDNS replica serves (~100k qps
    #: here), so the limit bites only where kube-proxy's path could not have answered either.
    cache_client_qps: int = 100000
    # Kubernetes API: facts the flags do not give
    kubeconfig: Path | None = None
    dns_services: tuple[tuple[str, str], ...] = (("kube-system", "kube-dns"),)
    node_name: str | None = None
    # reporting
    #: loopback by default, like kube-proxy's metrics (127.0.0.1:10249); 9254, not 9253, which
    #: node-local-dns's CoreDNS serves on every node address (see deploy/README.md)
    metrics_address: tuple[str, int] | None = ("127.0.0.1", 9254)
    probe_interval: float = 0.0
    # one agent per node (node/lock.py)
    lock_file: Path = Path("/run/dnsguard/agent.lock")
    #: apply/cleanup go ahead while another dnsguard holds the node lock (flag only, no env)
    force: bool = False


def env_name(flag: str) -> str:
    """``--dns-ip`` -> ``DNSGUARD_DNS_IP``."""
    return "DNSGUARD_" + flag.lstrip("-").replace("-", "_").upper()


def add_fact_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that needs the node's facts and settings."""
    parser.add_argument("--proxy-mode", metavar="auto|iptables|ipvs|nftables")
    parser.add_argument("--mitigation", metavar="notrack|nodelocal|none",
                        help="DNS mitigation; none: only the other features below own rules")
    parser.add_argument("--dns-ip", action="append", metavar="IP",
                        help="cluster DNS Service ClusterIP (repeatable, IPv4 and/or IPv6)")
    parser.add_argument("--pod-cidr", action="append", metavar="CIDR",
                        help="pod range(s), where replies from DNS pods come from (repeatable)")
    parser.add_argument("--backend", metavar="auto|iptables-legacy|iptables-nft|nftables")
    parser.add_argument("--sync-interval", metavar="SECONDS")
    parser.add_argument("--log-format", metavar="text|json")
    parser.add_argument("--skip-teardown", action="store_true", default=None,
                        help="leave the rules in place when the agent stops")
    parser.add_argument("--drop-invalid-input", action="store_true", default=None,
                        help="drop TCP packets to the node that conntrack marks INVALID (out "
                             "of window) instead of letting the host answer them with a RST")
    parser.add_argument("--external-to-cluster", action="store_true", default=None,
                        help="(ipvs mode) pods' and the node's traffic to a Service's external "
                             "or load-balancer IPs goes to its ClusterIP (needs the API)")
    parser.add_argument("--external-cidr", action="append", metavar="CIDR",
                        help="with --external-to-cluster: only external IPs in these ranges "
                             "are claimed (repeatable; default any not reserved)")
    kube = parser.add_argument_group("Kubernetes API (facts the flags do not give)")
    kube.add_argument("--kubeconfig", metavar="PATH",
                      help="default: in-cluster config when in a pod, else no API")
    kube.add_argument("--dns-service", action="append", metavar="NAMESPACE/NAME",
                      help="DNS Service to watch (repeatable; default kube-system/kube-dns)")
    kube.add_argument("--node-name", metavar="NAME",
                      help="this node, for its pod CIDRs (default $NODE_NAME)")
    report = parser.add_argument_group("reporting (dnsguard run)")
    report.add_argument("--metrics-address", metavar="HOST:PORT|off",
                        help="serve /metrics, /healthz and /readyz here (default "
                             "127.0.0.1:9254; the DaemonSet uses 0.0.0.0:9254)")
    report.add_argument("--probe-interval", metavar="SECONDS",
                        help="self-probe the cluster DNS this often for the latency histogram "
                             "(default 0: off)")
    parser.add_argument("--lock-file", metavar="PATH",
                        help="node-wide lock: one agent per node; run waits for it, apply and "
                             "cleanup refuse while it is held (default /run/dnsguard/agent.lock,"
                             " on a hostPath in the DaemonSet)")
    cache = parser.add_argument_group("node-local cache (--mitigation nodelocal)")
    cache.add_argument("--local-ip", action="append", metavar="IP",
                       help="address the cache serves on (repeatable; default 169.254.20.10)")
    cache.add_argument("--upstream", action="append", metavar="IP[:PORT]",
                       help="cluster DNS endpoints or an upstream Service IP not intercepted")
    cache.add_argument("--cluster-domain", metavar="DOMAIN")
    cache.add_argument("--state-dir", metavar="DIR",
                       help="config and control socket (/run/dnsguard)")
    cache.add_argument("--health-port", metavar="PORT",
                       help="loopback port of the cache's health query (default 53053)")
    cache.add_argument("--node-resolv-conf", metavar="FILE",
                       help="resolv.conf whose nameservers get names outside the cluster "
                            "with --external-via node")
    cache.add_argument("--unbound", metavar="PATH",
                       help="the unbound binary (default: unbound on PATH)")
    cache.add_argument("--log-queries", action="store_true", default=None,
                       help="log every answer of the cache (client, name, type, rcode) to "
                            "unbound.log in --state-dir; `dnsguard cache-log` toggles it live")
    cache.add_argument("--cache-client-qps", metavar="QPS",
                       help="queries per second one client address may send to the cache "
                            "(unbound ip-ratelimit; default 100000, 0: unlimited)")
    cache.add_argument("--drain-seconds", metavar="SECONDS",
                       help="on SIGTERM, how long the cache keeps answering after interception "
                            "is withdrawn (default 2)")
    cache.add_argument("--forward-zone", action="append", metavar="ZONE=[tcp:]IP[:PORT][,...]",
                       help="names in ZONE go to these servers (UDP unless tcp:) instead of the "
                            "cluster DNS (repeatable)")
    cache.add_argument("--external-via", metavar="cluster|node",
                       help="names the cache cannot answer: cluster (default) sends all to the "
                            "cluster DNS; node sends names outside the cluster domain to "
                            "--node-resolv-conf's nameservers")
    cache.add_argument("--cache-size", metavar="SIZE",
                       help="bytes of cache, suffix k/m/g (default 48m)")
    cache.add_argument("--cache-max-ttl", metavar="SECONDS",
                       help="longest time an answer is cached (default 86400)")
    cache.add_argument("--cache-negative-ttl", metavar="SECONDS",
                       help="longest time NXDOMAIN/NODATA is cached (default 5)")
    cache.add_argument("--serve-stale", metavar="DURATION",
                       help="how long expired answers are served while the upstreams fail: "
                            "300, 300s, 5m, 1h (default 5m; 0: never)")


def _raw(ns: argparse.Namespace, env: Mapping[str, str], flag: str) -> str | list[str] | None:
    value = getattr(ns, flag.lstrip("-").replace("-", "_"), None)
    if value is not None:
        return value  # type: ignore[no-any-return]
    return env.get(env_name(flag))


def _items(raw: str | list[str] | None) -> list[str]:
    if raw is None:
        return []
    parts = raw if isinstance(raw, list) else raw.split(",")
    return [p.strip() for p in parts if p.strip()]


def _lock_file(flag: str, raw: str) -> Path:
    """An absolute file path: a relative one would name a different lock from each working
    directory, and two agents that do not share one lock are exactly what it prevents."""
    if not raw.startswith("/") or "\0" in raw or raw.endswith("/") or \
            Path(raw).name in ("", ".", ".."):
        raise ConfigError(f"invalid {flag} {raw!r}: expected an absolute path to a file")
    return Path(raw)


def _choice(flag: str, raw: str, choices: Sequence[str]) -> str:
    if raw not in choices:
        raise ConfigError(f"invalid {flag} {raw!r}: expected one of {', '.join(choices)}")
    return raw


def parse_ip(flag: str, raw: str) -> IPAddress:
    """An address from a flag or env value; ConfigError names the flag and the value.

    No zone ID (``%eth0``) and no IPv4-mapped IPv6 address: neither means anything in a rule
    or a listen address, and a zone ID is free text.
    """
    if "%" in raw:
        raise ConfigError(f"invalid {flag} {raw!r}: a zone ID (%...) is not allowed")
    try:
        ip = ipaddress.ip_address(raw)
    except ValueError:
        raise ConfigError(f"invalid {flag} {raw!r}: not an IPv4 or IPv6 address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise ConfigError(f"invalid {flag} {raw!r}: an IPv4-mapped IPv6 address; "
                          f"write it as {ip.ipv4_mapped}")
    return ip


def _not_one_host(ip: IPAddress, *, loopback: bool = False) -> str | None:
    """Why ``ip`` is not one host a rule or a listener can mean: unspecified, multicast,
    broadcast, or (unless allowed) loopback; None when it is."""
    return ("unspecified" if ip.is_unspecified else "multicast" if ip.is_multicast
            else "broadcast" if ip == ipaddress.IPv4Address("255.255.255.255")
            else "loopback" if ip.is_loopback and not loopback else None)


def _unicast(flag: str, raw: str) -> IPAddress:
    """`parse_ip` that refuses what `_not_one_host` refuses."""
    ip = parse_ip(flag, raw)
    if kind := _not_one_host(ip):
        raise ConfigError(f"invalid {flag} {raw!r}: a {kind} address")
    return ip


def _cidr(flag: str, raw: str) -> IPNetwork:
    if "%" in raw:
        raise ConfigError(f"invalid {flag} {raw!r}: a zone ID (%...) is not allowed")
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise ConfigError(f"invalid {flag} {raw!r}: {exc}") from None
    if net.prefixlen == 0:
        # every address: NOTRACK of "replies to pods" would untrack masqueraded replies too
        raise ConfigError(f"invalid {flag} {raw!r}: a default route range (/0) is every "
                          "address")
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        raise ConfigError(f"invalid {flag} {raw!r}: an IPv4-mapped range; write it as IPv4")
    return net


def _port(flag: str, raw: str, *, whole: str | None = None) -> int:
    """A port 1-65535 in ASCII digits; ``whole``: the value to quote when ``raw`` is part."""
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"invalid {flag} {raw if whole is None else whole!r}: "
                          "not a port number (1-65535)")
    return int(raw)


def _endpoint(flag: str, raw: str) -> tuple[IPAddress, int]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address; the port defaults to 53."""
    host, port = raw, "53"
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"invalid {flag} {raw!r}: expected [IPv6]:PORT")
        port = rest[1:] or "53"
    elif raw.count(":") == 1:
        host, port = raw.split(":")
    try:
        ip = parse_ip(flag, host)
    except ConfigError:
        raise ConfigError(f"invalid {flag} {raw!r}: not an IP address or IP:PORT (no zone ID, "
                          "not IPv4-mapped)") from None
    # a resolver on the node's loopback is a fine upstream
    if kind := _not_one_host(ip, loopback=True):
        raise ConfigError(f"invalid {flag} {raw!r}: a {kind} address")
    return ip, _port(flag, port, whole=raw)


_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _service(flag: str, raw: str) -> tuple[str, str]:
    ns, sep, name = raw.partition("/")
    if not sep or not _DNS1123.match(ns) or not _DNS1123.match(name):
        raise ConfigError(f"invalid {flag} {raw!r}: expected NAMESPACE/NAME")
    return ns, name


def _hostport(flag: str, raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ConfigError(f"invalid {flag} {raw!r}: expected HOST:PORT")
    if host != "localhost":
        try:
            parse_ip(flag, host)
        except ConfigError:
            raise ConfigError(f"invalid {flag} {raw!r}: HOST must be an IP address (no zone "
                              "ID)") from None
    return host, _port(flag, port, whole=raw)


_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _domain(flag: str, raw: str) -> str:
    """An ASCII DNS name (letters, digits, inner hyphens; 253 characters at most): it is
    written into unbound.conf, and an IDN must be given in its ``xn--`` form."""
    name = raw.strip(".").lower()
    if (not name or len(name) > 253 or not name.isascii()
            or not all(_LABEL.fullmatch(lb) for lb in name.split("."))):
        raise ConfigError(f"invalid {flag} {raw!r}: not an ASCII DNS domain name")
    return name


_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def _seconds(flag: str, raw: str, minimum: float) -> float:
    """Plain ASCII decimal seconds, ``minimum`` to `MAX_SECONDS`."""
    if not _NUMBER.fullmatch(raw.strip()):
        raise ConfigError(f"invalid {flag} {raw!r}: not a number of seconds")
    value = float(raw)
    if not minimum <= value <= MAX_SECONDS:
        raise ConfigError(f"invalid {flag} {raw!r}: must be {minimum:g} to {MAX_SECONDS:g} "
                          "seconds")
    return value


_DURATION = re.compile(r"^([0-9]+)([smhd]?)$")
_SECONDS_PER = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(flag: str, raw: str, minimum: int, maximum: int) -> float:
    """Whole seconds, bare or with a unit (``300``, ``300s``, ``5m``, ``1h``), as float."""
    m = _DURATION.match(raw.strip().lower())
    if m is None:
        raise ConfigError(f"invalid {flag} {raw!r}: expected seconds or a duration such as "
                          "300s, 5m, 1h")
    value = int(m[1]) * _SECONDS_PER[m[2]]
    if not minimum <= value <= maximum:
        raise ConfigError(f"invalid {flag} {raw!r}: must be {minimum}-{maximum} seconds")
    return float(value)


_SIZE = re.compile(r"^([0-9]+)([kmg]?)$")


def _size(flag: str, raw: str, minimum: int, maximum: int) -> int:
    """Bytes, with an optional k/m/g suffix in powers of 1024 (unbound's own convention)."""
    m = _SIZE.match(raw.strip().lower())
    if m is None:
        raise ConfigError(f"invalid {flag} {raw!r}: expected bytes with an optional k/m/g "
                          "suffix, such as 48m")
    value = int(m[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[m[2]]
    if not minimum <= value <= maximum:
        raise ConfigError(f"invalid {flag} {raw!r}: must be {minimum >> 20}m-{maximum >> 30}g")
    return value


def _forward_zone(flag: str, raw: str) -> ForwardZone:
    """``ZONE=[tcp:|udp:]IP[:PORT][,IP[:PORT]...]``."""
    zone, sep, servers = raw.partition("=")
    if not sep:
        raise ConfigError(f"invalid {flag} {raw!r}: expected ZONE=[tcp:]IP[:PORT][,IP[:PORT]...]")
    try:
        name = _domain(flag, zone)
    except ConfigError:
        raise ConfigError(f"invalid {flag} {raw!r}: {zone!r} is not a DNS domain name") from None
    proto, colon, rest = servers.partition(":")
    tcp = False
    if colon and proto.strip().lower() in ("tcp", "udp"):
        tcp, servers = proto.strip().lower() == "tcp", rest
    addrs = _dedup([_endpoint(flag, a.strip()) for a in servers.split(",") if a.strip()])
    if not addrs:
        raise ConfigError(f"invalid {flag} {raw!r}: no server address after '='")
    return ForwardZone(name, addrs, tcp)


def _zone_items(raw: str | list[str] | None) -> list[str]:
    """One item per zone. Flags give one zone each; the environment variable is the usual
    comma-separated list, where an item without ``=`` is one more server of the zone before it
    (``a.example=198.18.0.1,198.18.0.2,b.example=tcp:198.18.0.3``)."""
    if raw is None or isinstance(raw, list):
        return [r.strip() for r in raw or [] if r.strip()]
    groups: list[str] = []
    for part in _items(raw):
        if "=" in part or not groups:
            groups.append(part)
        else:
            groups[-1] += "," + part
    return groups


def _file(flag: str, raw: str) -> Path:
    """A path to an existing regular file: caught here, before anything is observed."""
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"invalid {flag} {raw!r}: no such file")
    return path


def _bool(ns: argparse.Namespace, env: Mapping[str, str], flag: str) -> bool | None:
    """A ``store_true`` flag, or its variable as 1/0, true/false, yes/no; None when unset."""
    raw = _raw(ns, env, flag)
    if isinstance(raw, str):
        return _choice(env_name(flag), raw.lower(),
                       ["1", "0", "true", "false", "yes", "no"]) in ("1", "true", "yes")
    return None if raw is None else bool(raw)


T = TypeVar("T")


def _dedup(values: Sequence[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(values))


def settings_from(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from parsed flags, falling back to the environment, then defaults."""
    env = os.environ if env is None else env
    s = Settings()
    kwargs: dict[str, object] = {}

    if (raw := _raw(ns, env, "--proxy-mode")) is not None:
        mode = _choice("--proxy-mode", str(raw), ["auto", *(m.value for m in ProxyMode)])
        kwargs["proxy_mode"] = "auto" if mode == "auto" else ProxyMode(mode)
    if (raw := _raw(ns, env, "--mitigation")) is not None:
        kwargs["mitigation"] = Mitigation(
            _choice("--mitigation", str(raw), [m.value for m in Mitigation]))
    if (raw := _raw(ns, env, "--backend")) is not None:
        b = _choice("--backend", str(raw), ["auto", *(m.value for m in Backend)])
        kwargs["backend"] = "auto" if b == "auto" else Backend(b)
    kwargs["dns_ips"] = _dedup([_unicast("--dns-ip", v) for v in _items(_raw(ns, env, "--dns-ip"))])
    kwargs["pod_cidrs"] = _dedup(
        [_cidr("--pod-cidr", v) for v in _items(_raw(ns, env, "--pod-cidr"))])
    kwargs["external_cidrs"] = _dedup(
        [_cidr("--external-cidr", v) for v in _items(_raw(ns, env, "--external-cidr"))])
    if (raw := _raw(ns, env, "--sync-interval")) is not None:
        kwargs["sync_interval"] = _seconds("--sync-interval", str(raw), 0.1)
    if local := _items(_raw(ns, env, "--local-ip")):
        kwargs["local_ips"] = _dedup([_unicast("--local-ip", v) for v in local])
    kwargs["upstreams"] = _dedup(
        [_endpoint("--upstream", v) for v in _items(_raw(ns, env, "--upstream"))])
    if (raw := _raw(ns, env, "--cluster-domain")) is not None:
        kwargs["cluster_domain"] = _domain("--cluster-domain", str(raw))
    if (raw := _raw(ns, env, "--state-dir")) is not None:
        kwargs["state_dir"] = Path(str(raw))
    if (raw := _raw(ns, env, "--health-port")) is not None:
        kwargs["health_port"] = _port("--health-port", str(raw))
    if (raw := _raw(ns, env, "--node-resolv-conf")) is not None:
        kwargs["node_resolv_conf"] = Path(str(raw))
    if (raw := _raw(ns, env, "--unbound")) is not None:
        kwargs["unbound"] = str(raw)
    if (raw := _raw(ns, env, "--cache-client-qps")) is not None:
        qps = str(raw)
        if not (qps.isascii() and qps.isdigit()) or int(qps) > 1_000_000:
            raise ConfigError(f"invalid --cache-client-qps {qps!r}: expected a whole number "
                              "of queries per second, 0 to 1000000 (0: unlimited)")
        kwargs["cache_client_qps"] = int(qps)
    if (raw := _raw(ns, env, "--drain-seconds")) is not None:
        kwargs["drain_seconds"] = _seconds("--drain-seconds", str(raw), 0.0)
    zones: dict[str, ForwardZone] = {}
    for item in _zone_items(_raw(ns, env, "--forward-zone")):
        zone = _forward_zone("--forward-zone", item)
        if zone.name in zones:
            raise ConfigError(f"invalid --forward-zone {item!r}: zone {zone.name} given twice")
        zones[zone.name] = zone
    kwargs["forward_zones"] = tuple(zones[name] for name in sorted(zones))
    if (raw := _raw(ns, env, "--external-via")) is not None:
        kwargs["external_via"] = _choice("--external-via", str(raw), ["cluster", "node"])
    if (raw := _raw(ns, env, "--cache-size")) is not None:
        kwargs["cache_size"] = _size("--cache-size", str(raw), MIB, 64 << 30)
    if (raw := _raw(ns, env, "--cache-max-ttl")) is not None:
        kwargs["cache_max_ttl"] = _duration("--cache-max-ttl", str(raw), 1, 7 * 86400)
    if (raw := _raw(ns, env, "--cache-negative-ttl")) is not None:
        kwargs["cache_negative_ttl"] = _duration("--cache-negative-ttl", str(raw), 0, 86400)
    if (raw := _raw(ns, env, "--serve-stale")) is not None:
        kwargs["serve_stale"] = _duration("--serve-stale", str(raw), 0, 86400)
    if (raw := _raw(ns, env, "--kubeconfig")) is not None:
        kwargs["kubeconfig"] = _file("--kubeconfig", str(raw))
    if svcs := _items(_raw(ns, env, "--dns-service")):
        kwargs["dns_services"] = _dedup([_service("--dns-service", v) for v in svcs])
    if node := (_raw(ns, env, "--node-name") or env.get("NODE_NAME")):
        kwargs["node_name"] = str(node)
    if (raw := _raw(ns, env, "--metrics-address")) is not None:
        kwargs["metrics_address"] = None if str(raw) in ("", "off") else \
            _hostport("--metrics-address", str(raw))
    if (raw := _raw(ns, env, "--probe-interval")) is not None:
        kwargs["probe_interval"] = _seconds("--probe-interval", str(raw), 0.0)
    if (raw := _raw(ns, env, "--log-format")) is not None:
        kwargs["log_format"] = _choice("--log-format", str(raw), ["text", "json"])
    if (raw := _raw(ns, env, "--lock-file")) is not None:
        kwargs["lock_file"] = _lock_file("--lock-file", str(raw))
    # never from the environment: a DNSGUARD_FORCE left in a pod's env would silently let every
    # `kubectl exec ... dnsguard cleanup` tear the running agent's rules down
    kwargs["force"] = getattr(ns, "force", None) is True
    for flag in ("--skip-teardown", "--drop-invalid-input", "--external-to-cluster"):
        if (value := _bool(ns, env, flag)) is not None:
            kwargs[flag.lstrip("-").replace("-", "_")] = value
    if (value := _bool(ns, env, "--log-queries")) is not None:
        kwargs["log_queries"] = value

    return Settings(**{**s.__dict__, **kwargs})
