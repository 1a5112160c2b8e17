"""Observe: turn settings plus what the node shows into `NodeFacts` and a backend.

An explicit ``--proxy-mode`` is trusted, with a warning when the node looks otherwise (a wrong
mode is the one mistake that breaks DNS, so it must be visible in the log). ``auto`` must find
evidence or fail with a message saying what was looked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dnsguard.config import ConfigError, Settings
from dnsguard.model import Backend, Family, IPAddress, NodeFacts
from dnsguard.netfilter.runner import Runner
from dnsguard.node.detect import detect_backend, detect_proxy_mode, node_families

__all__ = ["Observed", "observe"]

log = logging.getLogger("dnsguard.facts")


@dataclass(frozen=True)
class Observed:
    facts: NodeFacts
    backend: Backend
    notes: tuple[str, ...]


def observe(settings: Settings, runner: Runner, proc_root: Path = Path("/proc"), *,
            node_nameservers: tuple[IPAddress, ...] = ()) -> Observed:
    notes: list[str] = []
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
