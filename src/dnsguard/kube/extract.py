"""Pure extractors: from one API object (a JSON dict as the server sent it) to the few fields
the planner needs, as small frozen values.

Reflectors store only these values, never the objects: a Service or an EndpointSlice weighs
kilobytes as JSON and far more as the client's model objects, while what dnsguard plans from is
a handful of addresses. That keeps a watch of every Service in a 10k-Service cluster at a few
megabytes. Malformed fields are skipped with a warning instead of failing the whole object:
one odd EndpointSlice must not blank out every DNS upstream.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from dnsguard.model import DNS_PORT, ExternalService, IPAddress, IPNetwork, Proto, ServicePort

__all__ = ["endpoint_key", "node_addresses", "node_pod_cidrs", "object_key",
           "service_cluster_ips", "service_external", "slice_dns_endpoints"]

log = logging.getLogger("dnsguard.kube")

Endpoint = tuple[IPAddress, int]

#: The port of the kube-dns Service that carries UDP DNS (CoreDNS and kube-dns both name it so).
DNS_PORT_NAME = "dns"


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` (``name`` for cluster-scoped objects): the store key of an object."""
    meta = _dict(obj.get("metadata"))
    ns, name = meta.get("namespace") or "", meta.get("name") or ""
    return f"{ns}/{name}" if ns else str(name)


def _ip(raw: object, what: str) -> IPAddress | None:
    """An address, or None (logged): ``ipaddress`` takes a zone ID of any text (``%...``,
    newlines included), which no API address has and no rule or config may carry."""
    text = str(raw)
    try:
        if "%" in text:
            raise ValueError(text)
        return ipaddress.ip_address(text)
    except ValueError:
        log.warning("ignoring %s %r: not an IP address", what, raw)
        return None


def endpoint_key(ep: Endpoint) -> tuple[int, int, int]:
    """Sort key for endpoints of both families (IPv4 first; addresses compare as integers)."""
    return (ep[0].version, int(ep[0]), ep[1])


def service_cluster_ips(obj: Mapping[str, Any]) -> tuple[IPAddress, ...]:
    """A Service's ClusterIPs, primary family first; () for headless and ExternalName."""
    spec = _dict(obj.get("spec"))
    raw = spec.get("clusterIPs") or [spec.get("clusterIP")]
    ips: list[IPAddress] = []
    for value in raw if isinstance(raw, list) else []:
        if value in (None, "", "None"):  # "None" is how a headless Service says it has none
            continue
        ip = _ip(value, f"clusterIP of Service {object_key(obj)}")
        if ip is not None and ip not in ips:
            ips.append(ip)
    return tuple(ips)


def _dns_port(ports: Iterable[object]) -> int | None:
    """The UDP port named "dns", else any UDP port 53; EndpointPort.protocol defaults to TCP."""
    fallback = None
    for p in ports:
        port = _dict(p)
        number, proto = port.get("port"), port.get("protocol") or "TCP"
        if proto != "UDP" or not isinstance(number, int):
            continue
        if port.get("name") == DNS_PORT_NAME:
            return number
        if number == DNS_PORT:
            fallback = number
    return fallback


def slice_dns_endpoints(obj: Mapping[str, Any]) -> tuple[Endpoint, ...]:
    """Ready (address, UDP DNS port) pairs of one EndpointSlice, sorted.

    ``conditions.ready`` unset means ready, as the API documents for consumers; terminating
    endpoints are never ready. FQDN slices and slices without a DNS port contribute nothing.
    """
    if obj.get("addressType") not in ("IPv4", "IPv6"):
        return ()
    ports = obj.get("ports")
    port = _dns_port(ports if isinstance(ports, list) else [])
    if port is None:
        return ()
    out: set[Endpoint] = set()
    endpoints = obj.get("endpoints")
    for raw in endpoints if isinstance(endpoints, list) else []:
        ep = _dict(raw)
        if _dict(ep.get("conditions")).get("ready") is False:
            continue
        addresses = ep.get("addresses")
        for addr in addresses if isinstance(addresses, list) else []:
            ip = _ip(addr, f"endpoint of EndpointSlice {object_key(obj)}")
            if ip is not None:
                out.add((ip, port))
    return tuple(sorted(out, key=endpoint_key))


def node_pod_cidrs(obj: Mapping[str, Any]) -> tuple[IPNetwork, ...]:
    """A Node's ``spec.podCIDRs`` (or the older single ``spec.podCIDR``); () until assigned."""
    spec = _dict(obj.get("spec"))
    raw = spec.get("podCIDRs") or [spec.get("podCIDR")]
    cidrs: list[IPNetwork] = []
    for value in raw if isinstance(raw, list) else []:
        if not value:
            continue
        try:
            # no zone ID (free text ipaddress keeps), no /0 (every address is no pod range)
            if "%" in str(value):
                raise ValueError(value)
            net = ipaddress.ip_network(str(value), strict=True)
            if net.prefixlen == 0:
                raise ValueError(value)
        except ValueError:
            log.warning("ignoring podCIDR %r of Node %s: not a pod range", value,
                        object_key(obj))
            continue
        if net not in cidrs:
            cidrs.append(net)
    return tuple(cidrs)


def node_addresses(obj: Mapping[str, Any]) -> tuple[IPAddress, ...]:
    """A Node's addresses from ``status.addresses`` (InternalIP, ExternalIP; not Hostname)."""
    raw = _dict(obj.get("status")).get("addresses")
    ips: list[IPAddress] = []
    for a in raw if isinstance(raw, list) else []:
        entry = _dict(a)
        if entry.get("type") in ("InternalIP", "ExternalIP") and entry.get("address"):
            ip = _ip(entry["address"], f"address of Node {object_key(obj)}")
            if ip is not None and ip not in ips:
                ips.append(ip)
    return tuple(ips)


def _ips(values: Iterable[object], what: str) -> list[IPAddress]:
    out: list[IPAddress] = []
    for value in values:
        ip = _ip(value, what) if value else None
        if ip is not None and ip not in out:
            out.append(ip)
    return out


def service_external(obj: Mapping[str, Any]) -> ExternalService | None:
    """ClusterIPs, TCP/UDP ports and external IPs of a Service that has any; else None.

    External IPs are ``spec.externalIPs`` and ``status.loadBalancer.ingress[].ip`` (hostname-only
    ingress has no address to match). An ingress with ``ipMode: Proxy`` is left out: its load
    balancer proxies the traffic and must see it (KEP-1860), so dnsguard does not short-circuit
    it. None keeps the Service out of the store entirely, so a cluster of 10k ClusterIP-only
    Services costs the reflector nothing per Service.
    """
    spec, status, meta = (_dict(obj.get(k)) for k in ("spec", "status", "metadata"))
    key = object_key(obj)
    ingress = _dict(status.get("loadBalancer")).get("ingress")
    entries = [_dict(i) for i in (ingress if isinstance(ingress, list) else [])]
    what = f"external IP of Service {key}"
    proxied = _ips([i.get("ip") for i in entries if i.get("ipMode") == "Proxy"], what)
    lb = [ip for ip in _ips([i.get("ip") for i in entries], what) if ip not in proxied]
    spec_ips = _ips(list(spec.get("externalIPs") or []), what)
    external = [ip for ip in dict.fromkeys([*spec_ips, *lb]) if ip not in proxied]
    if not external:
        return None
    cluster_ips = service_cluster_ips(obj)
    ports: list[ServicePort] = []
    raw_ports = spec.get("ports")
    for p in raw_ports if isinstance(raw_ports, list) else []:
        port = _dict(p)
        number, proto = port.get("port"), str(port.get("protocol") or "TCP").lower()
        if isinstance(number, int) and proto in ("tcp", "udp"):  # SCTP: not planned
            sp = ServicePort(Proto(proto), number)
            if sp not in ports:
                ports.append(sp)
    if not cluster_ips or not ports:
        return None
    created, uid = meta.get("creationTimestamp"), meta.get("uid")
    return ExternalService(key, cluster_ips, tuple(ports), tuple(external), lb_ips=tuple(lb),
                           created=created if isinstance(created, str) else "",
                           uid=uid if isinstance(uid, str) else "")
