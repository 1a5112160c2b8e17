"""Observe: turn settings plus what the node shows into `NodeFacts` and a backend.

An explicit ``--proxy-mode`` is trusted, with a warning when the node looks otherwise (a wrong
mode is the one mistake that breaks DNS, so it must be visible in the log). ``auto`` must find
evidence or fail with a message saying what was looked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from dnsguard.config import ConfigError, Settings
from dnsguard.kube import ClusterFacts, KubeSource, load_once
from dnsguard.model import Backend, Family, IPAddress, NodeFacts
from dnsguard.netfilter.runner import Runner
from dnsguard.node.detect import detect_backend, detect_proxy_mode, node_families

__all__ = ["Observed", "kube_source", "load_cluster", "observe", "with_cluster"]

log = logging.getLogger("dnsguard.facts")


@dataclass(frozen=True)
class Observed:
    facts: NodeFacts
    backend: Backend
    notes: tuple[str, ...]


def observe(settings: Settings, runner: Runner, proc_root: Path = Path("/proc"), *,
            node_nameservers: tuple[IPAddress, ...] = ()) -> Observed:
    notes: list[str] = []
    if settings.external_to_cluster and not uses_api(settings):
        raise ConfigError("--external-to-cluster needs the Kubernetes API for the Services: "
                          "pass --kubeconfig, or run in a pod")
    families = node_families(proc_root)
    for ip in settings.dns_ips:
        if Family.of(ip) not in families:
            raise ConfigError(f"invalid --dns-ip {ip}: IPv6 is disabled on this node "
                              f"({proc_root}/net/if_inet6 is missing)")

    detected = detect_proxy_mode(runner, proc_root)
    if settings.proxy_mode == "auto":
        if detected is None:
            raise ConfigError(
                "--proxy-mode auto found no kube-proxy on this node (no kube-ipvs0 link or IPVS "
                "services, no nft table kube-proxy, no KUBE-SERVICES chain): pass --proxy-mode")
        mode = detected.value
        notes.append(f"proxy mode {mode.value} detected: {detected.evidence}")
    else:
        mode = settings.proxy_mode
        if detected is None:
            notes.append(f"proxy mode {mode.value} as given (no kube-proxy rules seen yet)")
        elif detected.value is not mode:
            msg = (f"--proxy-mode {mode.value} given, but the node looks like "
                   f"{detected.value.value} mode ({detected.evidence}); trusting the flag")
            log.warning("%s", msg)
            notes.append(msg)
        else:
            notes.append(f"proxy mode {mode.value} as given, confirmed: {detected.evidence}")

    if settings.backend == "auto":
        b = detect_backend(runner, mode)
        backend = b.value
        notes.append(f"backend {backend.value} detected: {b.evidence}")
    else:
        backend = settings.backend
        notes.append(f"backend {backend.value} as given")

    facts = NodeFacts(proxy_mode=mode, dns_ips=settings.dns_ips, pod_cidrs=settings.pod_cidrs,
                      families=families, node_nameservers=node_nameservers)
    return Observed(facts, backend, tuple(notes))


def uses_api(settings: Settings, env: Mapping[str, str] | None = None) -> bool:
    """The API is asked when a kubeconfig is given or we run in a pod (in-cluster config)."""
    env = os.environ if env is None else env
    return settings.kubeconfig is not None or "KUBERNETES_SERVICE_HOST" in env


def _kube_args(settings: Settings) -> dict[str, object]:
    return {"kubeconfig": str(settings.kubeconfig) if settings.kubeconfig else None,
            "dns_services": settings.dns_services, "node_name": settings.node_name,
            "external": settings.external_to_cluster}


def load_cluster(settings: Settings) -> ClusterFacts | None:
    """One list of the API for one-shot commands; None when the API is not in use."""
    if not uses_api(settings):
        return None
    return load_once(**_kube_args(settings))  # type: ignore[arg-type]


def kube_source(settings: Settings) -> KubeSource | None:
    """A watching source for the agent; None when the API is not in use."""
    if not uses_api(settings):
        return None
    return KubeSource(**_kube_args(settings))  # type: ignore[arg-type]


def with_cluster(settings: Settings, obs: Observed,
                 cluster: ClusterFacts | None) -> tuple[Settings, NodeFacts]:
    """Fill what the flags did not give from the API's facts; flags always win."""
    if cluster is None:
        return settings, obs.facts
    fams = obs.facts.families
    eff = replace(
        settings,
        dns_ips=settings.dns_ips or tuple(ip for ip in cluster.dns_ips if Family.of(ip) in fams),
        pod_cidrs=settings.pod_cidrs or tuple(c for c in cluster.pod_cidrs
                                              if Family.of(c) in fams),
        upstreams=settings.upstreams or tuple(e for e in cluster.dns_endpoints
                                              if Family.of(e[0]) in fams),
    )
    facts = replace(obs.facts, dns_ips=eff.dns_ips, pod_cidrs=eff.pod_cidrs,
                    dns_endpoints=tuple(ip for ip, _ in cluster.dns_endpoints),
                    external_services=cluster.external_services, node_ips=cluster.node_ips,
                    api_server_ips=cluster.api_server_ips)
    return eff, facts
