"""Cluster facts from the API: the DNS Services' ClusterIPs, their ready endpoints, this node's
pod CIDRs, kept current by reflectors and read as one immutable `ClusterFacts`.

There is one reflector per watched thing: a name-selected Service watch and a label-selected
EndpointSlice watch per ``--dns-service``, and a name-selected Node watch. Each runs on its own
daemon thread and wakes `wait_changed` when a stored value changes, so the agent re-plans
within a second of a change without polling.

Failure policy: facts are never withdrawn because the API cannot be reached. `snapshot` keeps
returning what the reflectors last saw (a half-open connection ends at the read timeout, a
refused one backs off and retries), and `status` says the source is disconnected, since when,
and why. Tearing rules down because the control plane is away would turn an API outage into a
DNS outage on every node.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from dnsguard.kube import client as kclient
from dnsguard.kube.backoff import Backoff, Waiter, event_wait
from dnsguard.kube.extract import (
    endpoint_key,
    node_addresses,
    node_pod_cidrs,
    service_cluster_ips,
    service_external,
    slice_dns_endpoints,
)
from dnsguard.kube.reflector import ListWatch, Reflector
from dnsguard.model import ExternalService, IPAddress, IPNetwork

__all__ = ["READ_TIMEOUT", "WATCH_TIMEOUT", "ClusterFacts", "KubeSource", "load_once"]

log = logging.getLogger("dnsguard.kube")

#: Client read timeout (seconds) for every request, watches included: longer than the API
#: server's one-minute bookmark period so an idle healthy watch never trips it, and the longest
#: a half-open connection can keep facts stale before we reconnect.
READ_TIMEOUT = 90.0
#: Server-side ``timeoutSeconds`` of a watch, randomised to [T, 2T) per watch (as client-go).
WATCH_TIMEOUT = 300

Endpoint = tuple[IPAddress, int]
T = TypeVar("T")


@dataclass(frozen=True)
class ClusterFacts:
    """What the API says, in a stable order so equal facts compare (and render) equal."""

    #: ClusterIPs of the watched DNS Services (every family), in --dns-service order, deduplicated
    dns_ips: tuple[IPAddress, ...]
    #: ready endpoints of those Services on their UDP "dns" port, sorted (IPv4 first)
    dns_endpoints: tuple[Endpoint, ...]
    #: this node's spec.podCIDRs (or spec.podCIDR); () without --node-name or before assignment
    pod_cidrs: tuple[IPNetwork, ...]
    #: "what@resourceVersion" per reflector, for logs
    resource_versions: str
    #: Services with external or load-balancer IPs, by namespace/name (with external=True)
    external_services: tuple[ExternalService, ...] = ()
    #: every Node's addresses, sorted (with external=True): never claimable as external IPs
    node_ips: tuple[IPAddress, ...] = ()
    #: the API server's addresses (kubeconfig host, $KUBERNETES_SERVICE_HOST), when IPs
    api_server_ips: tuple[IPAddress, ...] = ()


def _dedup(values: Sequence[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(values))


def _api_server_ips(host: str | None, env: Mapping[str, str] | None = None,
                    ) -> tuple[IPAddress, ...]:
    """The API server's addresses we know: the client's host (kubeconfig or in-cluster) and
    the kubernetes Service's ClusterIP from the pod environment, when they are IPs."""
    env = os.environ if env is None else env
    hostname = urlsplit(host or "").hostname
    found: list[IPAddress] = []
    for raw in (hostname, env.get("KUBERNETES_SERVICE_HOST")):
        try:
            ip = ipaddress.ip_address(raw or "")
        except ValueError:
            continue
        if ip not in found:
            found.append(ip)
    return tuple(found)


class KubeSource:
    """Watches the DNS Services, their EndpointSlices and this node; see the module docstring.

    ``kubeconfig`` None means in-cluster config (the pod's service account). ``backoff``,
    ``wait`` and ``rand`` are for tests: they replace the retry policy, the (stop-aware) sleep
    and the jitter source.
    """

    def __init__(self, *, kubeconfig: str | None, dns_services: Sequence[tuple[str, str]],
                 node_name: str | None, read_timeout: float = READ_TIMEOUT,
                 watch_timeout: int = WATCH_TIMEOUT, backoff: Backoff | None = None,
                 wait: Waiter = event_wait, rand: Callable[[], float] | None = None,
                 external: bool = False) -> None:
        self.dns_services = _dedup(list(dns_services))
        self.node_name = node_name
        self._api = kclient.new_api_client(kubeconfig,
                                           pool_size=2 * len(self.dns_services) + 4)
        self._cond = threading.Condition()
        self._generation = 0
        self._seen = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._missing: set[str] = set()
        self._warn_lock = threading.Lock()

        extra: dict[str, Any] = {"rand": rand} if rand is not None else {}

        def reflector(name: str, lw: ListWatch, extract: Callable[..., T | None],
                      ) -> Reflector[T]:
            return Reflector(name, lw, extract, read_timeout=read_timeout,
                             watch_timeout=watch_timeout, backoff=backoff, wait=wait,
                             on_change=self._changed, **extra)

        self._services: list[Reflector[tuple[IPAddress, ...]]] = []
        self._slices: list[Reflector[tuple[Endpoint, ...]]] = []
        for ns, name in self.dns_services:
            self._services.append(reflector(
                f"service {ns}/{name}", kclient.service(self._api, ns, name),
                service_cluster_ips))
            self._slices.append(reflector(
                f"endpointslices {ns}/{name}", kclient.endpoint_slices_of(self._api, ns, name),
                slice_dns_endpoints))
        self._node: Reflector[tuple[IPNetwork, ...]] | None = None
        if node_name:
            self._node = reflector(f"node {node_name}", kclient.node(self._api, node_name),
                                   node_pod_cidrs)
        #: every Service, for --external-to-cluster; stores only those with external IPs
        self._external: Reflector[ExternalService] | None = None
        if external:
            self._external = reflector("services (all)", kclient.all_services(self._api),
                                       service_external)
        #: every Node's addresses, for --external-to-cluster: a Service must not claim one
        self._nodes: Reflector[tuple[IPAddress, ...]] | None = None
        if external:
            self._nodes = reflector("nodes (all)", kclient.all_nodes(self._api), node_addresses)
        self._api_ips = _api_server_ips(self._api.configuration.host)

    @property
    def reflectors(self) -> list[Reflector[Any]]:
        found: list[Reflector[Any]] = [*self._services, *self._slices]
        return found + [r for r in (self._node, self._external, self._nodes) if r is not None]

    def _changed(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """One daemon thread per reflector; returns at once (see `snapshot`, `wait_changed`)."""
        for r in self.reflectors:
            t = threading.Thread(target=r.run, args=(self._stop,), daemon=True,
                                 name=f"dnsguard-kube {r.name}")
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the reflectors, interrupting blocked reads, and close the connections."""
        self._stop.set()
        for r in self.reflectors:
            r.interrupt()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        self._api.close()  # type: ignore[no-untyped-call]

    def list_all(self) -> None:
        """List every reflector once, in this thread (no watch); raises KubeApiError."""
        for r in self.reflectors:
            r.list_once()

    # -- reading ------------------------------------------------------------------------------
    def snapshot(self) -> ClusterFacts | None:
        """The latest facts, marked seen by `wait_changed`; None until every reflector listed.

        For the one loop that acts on changes (the agent). Anything else that only reads
        (status, metrics, doctor) uses `peek`, or it would swallow the agent's wake-up.
        """
        with self._cond:
            # read the generation before the stores: a change landing in between makes the
            # next wait_changed return at once (harmless), never get lost
            self._seen = self._generation
        return self.peek()

    def peek(self) -> ClusterFacts | None:
        """The latest facts without marking them seen; None until every reflector listed."""
        if not all(r.synced for r in self.reflectors):
            return None
        self._warn_missing()
        dns_ips = _dedup([ip for r in self._services for v in r.values() for ip in v])
        endpoints = sorted({ep for r in self._slices for v in r.values() for ep in v},
                           key=endpoint_key)
        cidrs = _dedup([c for v in self._node.values() for c in v]) if self._node else ()
        rvs = ", ".join(f"{r.name}@{r.resource_version}" for r in self.reflectors)
        ext = tuple(v for _, v in sorted(self._external.items().items())) \
            if self._external else ()
        nodes = tuple(sorted({ip for v in self._nodes.values() for ip in v},
                             key=lambda ip: (ip.version, int(ip)))) if self._nodes else ()
        return ClusterFacts(dns_ips, tuple(endpoints), cidrs, rvs, ext, nodes, self._api_ips)

    def _warn_missing(self) -> None:
        """Log once when a watched Service or the node goes missing, once when it is back."""
        now = {r.name for r in self.reflectors
               if r.lw.kind != "endpointslices" and r not in (self._external, self._nodes)
               and not r.items()}
        with self._warn_lock:
            for name in sorted(now - self._missing):
                log.warning("%s does not exist (yet): its facts are empty", name)
            for name in sorted(self._missing - now):
                log.info("%s exists again", name)
            self._missing = now

    def wait_changed(self, timeout: float) -> bool:
        """Block until the facts changed since the last `snapshot` (True) or ``timeout`` (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != self._seen, timeout)

    def status(self) -> dict[str, object]:
        """For ``dnsguard status`` and metrics: connected?, synced?, last error, per reflector."""
        per = {r.name: r.status() for r in self.reflectors}
        errors = [e for r in self.reflectors if (e := r.last_error()) is not None]
        last_at, last = max(errors) if errors else (None, "")
        connected = all(r.connected for r in self.reflectors)
        synced = all(r.synced for r in self.reflectors)
        return {
            "connected": connected,
            "synced": synced,
            # facts are being served from memory while the API is away
            "stale": synced and not connected,
            "last_error": last,
            "last_error_at": last_at,
            "reflectors": per,
        }


#: Read timeout of one-shot commands: a person is waiting, and there is no watch to keep alive.
LOAD_READ_TIMEOUT = 15.0


def load_once(*, kubeconfig: str | None, dns_services: Sequence[tuple[str, str]],
              node_name: str | None, read_timeout: float = LOAD_READ_TIMEOUT,
              watch_timeout: int = WATCH_TIMEOUT, external: bool = False) -> ClusterFacts:
    """List once, no watch: facts for one-shot commands (plan, apply, status, doctor, cleanup).

    Raises `KubeConfigError` or `KubeApiError` (no retries: a one-shot command reports and
    exits, the operator re-runs it). ``watch_timeout`` is accepted for symmetry and unused.
    """
    source = KubeSource(kubeconfig=kubeconfig, dns_services=dns_services, node_name=node_name,
                        read_timeout=read_timeout, watch_timeout=watch_timeout,
                        backoff=Backoff(), wait=event_wait, external=external)
    try:
        source.list_all()
        facts = source.snapshot()
    finally:
        source.stop()
    assert facts is not None  # every reflector has listed
    return facts
