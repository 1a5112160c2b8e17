"""Frozen, validated settings from flags and ``DNSGUARD_*`` environment variables.

Every flag ``--some-flag`` can also come from ``DNSGUARD_SOME_FLAG``; the flag wins. Repeatable
flags take a comma-separated list from the environment. Values are parsed once, here, into typed
fields (addresses, networks, seconds as float), so nothing downstream re-parses strings. Any bad
value raises `ConfigError` whose message is one line naming the flag and the value.
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


class ConfigError(ValueError):
    """A bad flag or environment value; the message is one line fit for the user."""


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
    # node-local cache (--mitigation nodelocal)
    local_ips: tuple[IPAddress, ...] = (ipaddress.ip_address("169.254.20.10"),)
    upstreams: tuple[tuple[IPAddress, int], ...] = ()
    cluster_domain: str = "cluster.local"
    state_dir: Path = Path("/run/dnsguard")
    health_port: int = 53053
    node_resolv_conf: Path = Path("/etc/resolv.conf")
    drain_seconds: float = 2.0
    unbound: str = "unbound"
    # Kubernetes API: facts the flags do not give
    kubeconfig: Path | None = None
    dns_services: tuple[tuple[str, str], ...] = (("kube-system", "kube-dns"),)
    node_name: str | None = None
    # reporting
    metrics_address: tuple[str, int] | None = None
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
    kube = parser.add_argument_group("Kubernetes API (facts the flags do not give)")
    kube.add_argument("--kubeconfig", metavar="PATH",
                      help="default: in-cluster config when in a pod, else no API")
    kube.add_argument("--dns-service", action="append", metavar="NAMESPACE/NAME",
                      help="DNS Service to watch (repeatable; default kube-system/kube-dns)")
    kube.add_argument("--node-name", metavar="NAME",
                      help="this node, for its pod CIDRs (default $NODE_NAME)")
    report = parser.add_argument_group("reporting (dnsguard run)")
    report.add_argument("--metrics-address", metavar="HOST:PORT",
                        help="serve /metrics, /healthz and /readyz here (default: off)")
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
                       help="resolv.conf whose nameservers get names outside the cluster")
    cache.add_argument("--unbound", metavar="PATH",
                       help="the unbound binary (default: unbound on PATH)")
    cache.add_argument("--drain-seconds", metavar="SECONDS",
                       help="on SIGTERM, how long the cache keeps answering after interception "
                            "is withdrawn (default 2)")


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
    """An address from a flag or env value; ConfigError names the flag and the value."""
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        raise ConfigError(f"invalid {flag} {raw!r}: not an IPv4 or IPv6 address") from None


def _cidr(flag: str, raw: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise ConfigError(f"invalid {flag} {raw!r}: {exc}") from None


def _port(flag: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"invalid {flag} {raw!r}: not a port number (1-65535)")
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
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"invalid {flag} {raw!r}: not an IP address or IP:PORT") from None
    return ip, _port(flag, port)


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
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"invalid {flag} {raw!r}: HOST must be an IP address") from None
    return host, _port(flag, port)


def _domain(flag: str, raw: str) -> str:
    name = raw.strip(".").lower()
    labels = name.split(".")
    if not name or any(not lb or len(lb) > 63 or not all(c.isalnum() or c == "-" for c in lb)
                       for lb in labels):
        raise ConfigError(f"invalid {flag} {raw!r}: not a DNS domain name")
    return name


def _seconds(flag: str, raw: str, minimum: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"invalid {flag} {raw!r}: not a number of seconds") from None
    if not value >= minimum or value == float("inf"):
        raise ConfigError(f"invalid {flag} {raw!r}: must be at least {minimum:g} seconds")
    return value


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
    kwargs["dns_ips"] = _dedup([parse_ip("--dns-ip", v) for v in _items(_raw(ns, env, "--dns-ip"))])
    kwargs["pod_cidrs"] = _dedup(
        [_cidr("--pod-cidr", v) for v in _items(_raw(ns, env, "--pod-cidr"))])
    if (raw := _raw(ns, env, "--sync-interval")) is not None:
        kwargs["sync_interval"] = _seconds("--sync-interval", str(raw), 0.1)
    if local := _items(_raw(ns, env, "--local-ip")):
        kwargs["local_ips"] = _dedup([parse_ip("--local-ip", v) for v in local])
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
    if (raw := _raw(ns, env, "--drain-seconds")) is not None:
        kwargs["drain_seconds"] = _seconds("--drain-seconds", str(raw), 0.0)
    if (raw := _raw(ns, env, "--kubeconfig")) is not None:
        kwargs["kubeconfig"] = Path(str(raw))
    if svcs := _items(_raw(ns, env, "--dns-service")):
        kwargs["dns_services"] = _dedup([_service("--dns-service", v) for v in svcs])
    if node := (_raw(ns, env, "--node-name") or env.get("NODE_NAME")):
        kwargs["node_name"] = str(node)
    if (raw := _raw(ns, env, "--metrics-address")) is not None and str(raw):
        kwargs["metrics_address"] = _hostport("--metrics-address", str(raw))
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

    return Settings(**{**s.__dict__, **kwargs})
