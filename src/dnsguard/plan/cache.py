"""The node-local cache's desired configuration, and unbound's config file rendered from it.

Pure and deterministic: the same spec always renders byte-identical text (sorted, no maps
iterated in arbitrary order), so the supervisor can tell "changed" from "re-rendered" by
comparing files, and reload unbound only when something really changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dnsguard.model import IPAddress

__all__ = ["HEALTH_NAME", "CacheSpec", "render_unbound"]

#: Answered by the cache itself from local data; the agent asks it every health tick.
HEALTH_NAME = "health.dnsguard.invalid."
HEALTH_TXT = "dnsguard-ok"

Endpoint = tuple[IPAddress, int]


@dataclass(frozen=True)
class CacheSpec:
    listen: tuple[IPAddress, ...]
    health_port: int
    cluster_domain: str
    cluster_upstreams: tuple[Endpoint, ...]
    #: where names outside the cluster go; empty means "the cluster upstreams as well"
    external_upstreams: tuple[Endpoint, ...]
    ipv6: bool
    #: the DNS Service's ClusterIPs: the agent asks them through kube-proxy's path when the
    #: cache cannot reach its upstreams, to tell a broken cache path from a dead cluster DNS
    cluster_ips: tuple[IPAddress, ...] = ()


def _addr(ep: Endpoint) -> str:
    return f"{ep[0]}@{ep[1]}"


def render_unbound(spec: CacheSpec, state_dir: Path) -> str:
    """unbound.conf for the spec; every setting here is deliberate, see the comments."""
    lines = [
        "# Written by dnsguard; changes are overwritten.",
        "server:",
        "    verbosity: 0",
        "    use-syslog: no",
        '    logfile: ""',
        "    do-daemonize: no",
        '    username: ""',
        '    chroot: ""',
        f'    directory: "{state_dir}"',
        '    pidfile: ""',
        # bind even if an address is not (yet) on the link; the agent adds it just before
        "    ip-freebind: yes",
    ]
    lines += [f"    interface: {ip}@53" for ip in spec.listen]
    lines += [
        f"    interface: 127.0.0.1@{spec.health_port}",
        "    do-ip4: yes",
        f"    do-ip6: {'yes' if spec.ipv6 else 'no'}",
        "    do-udp: yes",
        "    do-tcp: yes",
        "    access-control: 0.0.0.0/0 allow",
        "    access-control: ::/0 allow",
        "    num-threads: 2",
        # lets the next agent's cache bind beside a draining one during a rolling update
        "    so-reuseport: yes",
        # undersized DNS server receive buffers are a measured source of 5 s tails
        "    so-rcvbuf: 8m",
        "    so-sndbuf: 4m",
        "    msg-cache-size: 16m",
        "    rrset-cache-size: 32m",
        # NodeLocal DNSCache's known complaint: NXDOMAIN cached for the upstream's SOA minimum
        "    cache-max-negative-ttl: 5",
        # when upstreams fail, answer from expired entries rather than fail the lookup
        "    serve-expired: yes",
        "    serve-expired-ttl: 300",
        "    serve-expired-client-timeout: 1500",
        "    prefetch: yes",
        "    minimal-responses: yes",
        "    qname-minimisation: no",
        '    module-config: "iterator"',
        "    do-not-query-localhost: no",
        "    unblock-lan-zones: yes",
        "    insecure-lan-zones: yes",
        f'    domain-insecure: "{spec.cluster_domain}."',
        '    local-zone: "dnsguard.invalid." static',
        f"    local-data: '{HEALTH_NAME} 0 IN TXT \"{HEALTH_TXT}\"'",
        "",
        "remote-control:",
        "    control-enable: yes",
        f'    control-interface: "{state_dir / "unbound.ctl"}"',
        "    control-use-cert: no",
    ]
    cluster = tuple(_addr(e) for e in spec.cluster_upstreams)
    external = tuple(_addr(e) for e in spec.external_upstreams) or cluster
    zones = [
        # the cluster zone and reverse zones go to the cluster DNS over TCP: no UDP conntrack
        # entries, no lost fragments, no racing parallel queries on the way upstream
        (f"{spec.cluster_domain}.", cluster, True),
        ("in-addr.arpa.", cluster, True),
        ("ip6.arpa.", cluster, True),
        (".", external, False),
    ]
    for name, addrs, tcp in zones:
        lines += ["", "forward-zone:", f'    name: "{name}"']
        if tcp:
            lines.append("    forward-tcp-upstream: yes")
        lines += [f"    forward-addr: {a}" for a in addrs]
    return "\n".join(lines) + "\n"
