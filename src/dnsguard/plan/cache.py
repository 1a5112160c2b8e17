"""The node-local cache's desired configuration, and unbound's config file rendered from it.

Pure and deterministic: the same spec always renders byte-identical text (sorted, no maps
iterated in arbitrary order), so the supervisor can tell "changed" from "re-rendered" by
comparing files, and reload unbound only when something really changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path

from dnsguard.config import ForwardZone
from dnsguard.model import IPAddress, IPNetwork
from dnsguard.plan import checks

__all__ = ["CACHE_USER", "CLUSTER_PRIVATE", "HEALTH_NAME", "UNBOUND_DEFAULT_ZONES", "CacheSpec",
           "access_control", "render_unbound"]

#: The user unbound drops to after binding; Debian's unbound package creates it.
CACHE_USER = "unbound"

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
    #: (the default, --external-via cluster); the node's resolvers with --external-via node
    external_upstreams: tuple[Endpoint, ...]
    ipv6: bool
    #: --forward-zone, sorted by name: zones that go to their own servers
    forward_zones: tuple[ForwardZone, ...] = ()
    #: bytes of cache (msg 1/3, rrset 2/3), and the TTL caps, in seconds
    cache_size: int = 48 << 20
    cache_max_ttl: int = 86400
    cache_negative_ttl: int = 5
    #: serve-expired-ttl in seconds; 0 turns serve-expired off
    serve_stale: int = 300
    #: this node's pod ranges (--pod-cidr or the Node's spec.podCIDRs): clients the cache answers
    pod_cidrs: tuple[IPNetwork, ...] = ()
    #: queries per second one client address may send (unbound ip-ratelimit); 0: no limit
    client_qps: int = 0
    #: the DNS Service's ClusterIPs: the agent asks them through kube-proxy's path when the
    #: cache cannot reach its upstreams, to tell a broken cache path from a dead cluster DNS
    cluster_ips: tuple[IPAddress, ...] = ()


#: Zones unbound answers from its own defaults (RFC 6761/6762/7686/8375) unless told
#: ``nodefault``. The cluster DNS forwards them like any name, and a Corefile may serve them (a
#: ``hosts`` entry under ``test.``, a stub domain under ``home.arpa.``), so the cache must
#: forward them too to answer as the cluster DNS does. localhost and the loopback reverse zones
#: keep unbound's local answers: every resolver gives those the same.
UNBOUND_DEFAULT_ZONES = ("home.arpa.", "invalid.", "onion.", "test.")


#: Non-global ranges answered besides the pod CIDRs: private (RFC 1918), shared (RFC 6598, used
#: by some CNIs and cloud VPCs), benchmarking (RFC 2544), link-local, IPv6 ULA and link-local.
#: Why: the Node's spec.podCIDRs is not where every CNI takes pod IPs from (Calico IPAM blocks,
#: Cilium cluster-pool, cloud VPC CNIs), and a refused pod has no fallback: a REFUSED answer is
#: an answer. What stays refused is global address space outside the pod CIDRs: the cache
#: cannot be used as an open resolver by anything that can route a packet to this node.
CLUSTER_PRIVATE: tuple[IPNetwork, ...] = tuple(ip_network(n) for n in (
    "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
    "198.18.0.0/15", "fc00::/7", "fe80::/10"))


def access_control(spec: CacheSpec) -> list[str]:
    """unbound ``access-control`` lines: who the cache answers, everyone else REFUSED.

    Allowed: loopback (the agent's health query), the listen addresses themselves (the node's
    own queries to a local address leave with that address as their source), the pod CIDRs
    and `CLUSTER_PRIVATE`. The most specific entry wins in unbound, so the catch-all refuse
    lines go first only for reading. REFUSED, not a silent drop: a misconfigured client gets
    an answer at once instead of a 5 s timeout, and the answer is no larger than the query.
    """
    allowed = [ip_network("127.0.0.0/8"), ip_network("::1/128"),
               *(ip_network(ip) for ip in spec.listen), *spec.pod_cidrs, *CLUSTER_PRIVATE]
    lines = ["    access-control: 0.0.0.0/0 refuse", "    access-control: ::/0 refuse"]
    lines += [f"    access-control: {net} allow" for net in dict.fromkeys(allowed)]
    return lines


def _addr(ep: Endpoint) -> str:
    return f"{checks.check_addr(ep[0])}@{checks.check_port(ep[1])}"  # no zone ID: free text


def _bytes(n: int) -> str:
    """unbound's size syntax, exact: ``16m`` where it divides, else ``k``, else bytes."""
    for shift, unit in ((20, "m"), (10, "k")):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def render_unbound(spec: CacheSpec, state_dir: Path) -> str:
    """unbound.conf for the spec; every setting here is deliberate, see the comments."""
    lines = [
        "# Written by dnsguard; changes are overwritten.",
        "server:",
        "    verbosity: 0",
        # per-type, per-rcode and histogram counters for dnsguard.cache.stats (unbound-control)
        "    extended-statistics: yes",
        "    use-syslog: no",
        '    logfile: ""',
        "    do-daemonize: no",
        # unbound binds port 53 (and forces its socket buffers) as root, then drops to this
        # user with no capabilities; the supervisor turns it off where the drop cannot work
        f'    username: "{CACHE_USER}"',
        # no chroot: it needs CAP_SYS_CHROOT, which the pod does not have, and the config, the
        # control socket and the log inside it; the uid and no capabilities are the boundary
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
        *access_control(spec),
        # one client (a pod in a lookup loop) cannot take the whole cache; 1 in 10 of its
        # queries over the limit still get through (unbound's ip-ratelimit-factor default)
        *([f"    ip-ratelimit: {spec.client_qps}"] if spec.client_qps else []),
        "    num-threads: 2",
        # at most 4 TCP streams per thread to the upstreams (unbound's default is 10), each
        # carrying many queries (stream reuse): every node holds connections to CoreDNS, so
        # fewer is kinder to it, and the lab's dnsmasq stand-in serves at most 20 TCP
        # connections at once (a 21st stalls until one closes: measured in a scratch namespace)
        "    outgoing-num-tcp: 4",
        # lets the next agent's cache bind beside a draining one during a rolling update
        "    so-reuseport: yes",
        # undersized DNS server receive buffers are a measured source of 5 s tails
        "    so-rcvbuf: 8m",
        "    so-sndbuf: 4m",
        # unbound keeps a cache across reload_keep_cache only while these sizes and
        # num-threads stay the same (cache.unbound compares them before choosing the reload)
        f"    msg-cache-size: {_bytes(spec.cache_size // 3)}",
        f"    rrset-cache-size: {_bytes(spec.cache_size - spec.cache_size // 3)}",
        f"    cache-max-ttl: {spec.cache_max_ttl}",
        # NodeLocal DNSCache's known complaint: NXDOMAIN cached for the upstream's SOA minimum
        f"    cache-max-negative-ttl: {spec.cache_negative_ttl}",
    ]
    if spec.serve_stale > 0:
        lines += [
            # when upstreams fail, answer from expired entries rather than fail the lookup
            "    serve-expired: yes",
            f"    serve-expired-ttl: {spec.serve_stale}",
            "    serve-expired-client-timeout: 1500",
        ]
    else:
        lines.append("    serve-expired: no")
    lines += [
        "    prefetch: yes",
        # an upstream unbound finds down is otherwise left alone for infra-host-ttl (15 min):
        # after a CoreDNS outage the cache would keep serving stale answers while CoreDNS is
        # back; probing it keeps the return within one probe (the agent also flush_infra's)
        "    infra-keep-probing: yes",
        "    minimal-responses: yes",
        "    qname-minimisation: no",
        '    module-config: "iterator"',
        "    do-not-query-localhost: no",
        "    unblock-lan-zones: yes",
        "    insecure-lan-zones: yes",
        f'    domain-insecure: "{spec.cluster_domain}."',
        *(f'    local-zone: "{z}" nodefault' for z in UNBOUND_DEFAULT_ZONES),
        '    local-zone: "dnsguard.invalid." static',
        f"    local-data: '{HEALTH_NAME} 0 IN TXT \"{HEALTH_TXT}\"'",
        "",
        "remote-control:",
        "    control-enable: yes",
        f'    control-interface: "{state_dir / "unbound.ctl"}"',
        "    control-use-cert: no",
    ]
    cluster = tuple(_addr(e) for e in spec.cluster_upstreams)
    external = tuple(_addr(e) for e in spec.external_upstreams)
    # The cluster DNS gets every name over TCP: no UDP conntrack entries, no lost fragments, no
    # racing parallel queries on the way upstream. By default that includes names outside the
    # cluster domain ("."), so the Corefile's hosts, rewrite, stub domains and per-zone forwards
    # give pods the same answers as without the cache. Only --external-via node sends those to
    # the node's resolvers (NodeLocal DNSCache's behaviour), over UDP as the node itself asks
    # them; the reverse zones stay with the cluster DNS, which answers PTR for pods and Services.
    zones = [
        (f"{spec.cluster_domain}.", cluster, True),
        ("in-addr.arpa.", cluster, True),
        ("ip6.arpa.", cluster, True),
        (".", external, False) if external else (".", cluster, True),
    ]
    # operator's zones, sorted: UDP unless tcp: (see config.ForwardZone); unbound takes the
    # longest matching zone, so these win over "." and over each other's parents
    zones += [(f"{z.name}.", tuple(_addr(e) for e in z.addrs), z.tcp)
              for z in spec.forward_zones]
    for name, addrs, tcp in zones:
        lines += ["", "forward-zone:", f'    name: "{name}"']
        if tcp:
            lines.append("    forward-tcp-upstream: yes")
        lines += [f"    forward-addr: {a}" for a in addrs]
    return "\n".join(lines) + "\n"
