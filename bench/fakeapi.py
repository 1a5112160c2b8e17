"""A fake Kubernetes API for the agent's footprint: DNS endpoints churning, or N Services with
external IPs.

``python -m bench.fakeapi KUBECONFIG --node NAME --cluster-ip IP --endpoint IP ... [--every S]
[--duration S] [--external-services N]`` runs `dnsguard.testing.fake_apiserver.FakeApiServer`
in the namespace the agent runs in (the agent must reach it on 127.0.0.1 there), publishes the
kube-dns Service, its EndpointSlice, the node and ``N`` Services with external IPs
(`external_service`), writes the kubeconfig (its appearance means "serving") and then:

* every ``--every`` seconds, drops the last DNS endpoint or puts it back: each change is a new
  plan for a node-local agent (new upstreams, an unbound reload);
* on SIGUSR1, moves the external IP of Service ``N // 2`` to `CHANGED_IP` (one Service change
  among N, for ``--external-to-cluster``'s partial sync) and prints ``changed <epoch>``.

It stops by itself after ``--duration``.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dnsguard.testing.fake_apiserver import FakeApiServer, service_object

__all__ = ["CHANGED_IP", "MAX_EXTERNAL", "changed_service", "external_ip", "external_service",
           "main"]

#: ClusterIPs of the external Services (inside the benchmark's 198.18.0.0/15)
EXT_CLUSTER_NET = ipaddress.ip_network("198.18.128.0/17")
#: their external and load-balancer IPs
EXT_IP_NET = ipaddress.ip_network("198.19.0.0/16")
#: where the changed Service's external IP moves to: the last address, never one of the N
CHANGED_IP = str(EXT_IP_NET.broadcast_address - 1)
MAX_EXTERNAL = EXT_CLUSTER_NET.num_addresses - 1


def external_ip(i: int) -> str:
    """Service ``i``'s external IP before any change."""
    return str(EXT_IP_NET.network_address + i)


def external_service(i: int, *, namespace: str | None = None,
                     ip: str | None = None) -> dict[str, Any]:
    """Service ``i``: one TCP port and one external IP (``ip``, default `external_ip`), as
    ``spec.externalIPs`` (even ``i``) or a LoadBalancer's ``status.loadBalancer.ingress`` (odd
    ``i``), so both ways reach the agent.

    Namespaces rotate over 50 (``ns0``..``ns49``) unless ``namespace`` is given.
    """
    if not 0 <= i < MAX_EXTERNAL:
        raise ValueError(f"external Service index {i} out of 0..{MAX_EXTERNAL - 1}")
    ext = ip or external_ip(i)
    obj = service_object(namespace or f"ns{i % 50}", f"svc{i}",
                         [str(EXT_CLUSTER_NET.network_address + i)],
                         ports=[("http", "TCP", 80)])
    if i % 2 == 0:
        obj["spec"]["externalIPs"] = [ext]
    else:
        obj["spec"]["type"] = "LoadBalancer"
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ext}]}}
    return obj


def changed_service(n: int) -> dict[str, Any]:
    """The one Service change among ``n``: Service ``n // 2`` moves to `CHANGED_IP`."""
    return external_service(n // 2, ip=CHANGED_IP)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fakeapi")
    p.add_argument("kubeconfig", type=Path)
    p.add_argument("--node", required=True)
    p.add_argument("--pod-cidr", required=True)
    p.add_argument("--cluster-ip", required=True)
    p.add_argument("--endpoint", action="append", required=True)
    p.add_argument("--every", type=float, default=0.0, help="seconds between changes; 0: none")
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--external-services", type=int, default=0, metavar="N",
                   help="also publish N Services with external IPs (SIGUSR1 changes one)")
    args = p.parse_args(argv)
    if not 0 <= args.external_services <= MAX_EXTERNAL:
        p.error(f"--external-services: 0..{MAX_EXTERNAL}")
    # SIGUSR1 is taken with sigtimedwait, never by a handler; blocked before the server's
    # threads start, so they inherit the mask and none of them can take it (and die of it)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    with FakeApiServer(bookmark_interval=0.5) as server:
        server.put_service("kube-system", "kube-dns", [args.cluster_ip])
        server.put_endpoint_slice("kube-system", "kube-dns-a", service="kube-dns",
                                  endpoints=list(args.endpoint))
        server.put_node(args.node, [args.pod_cidr])
        for i in range(args.external_services):
            server.apply("services", external_service(i))
        tmp = args.kubeconfig.with_suffix(".tmp")
        server.write_kubeconfig(tmp)
        tmp.replace(args.kubeconfig)  # atomic: its presence means the server is up
        print(f"serving {args.external_services} external Services", flush=True)
        end = time.monotonic() + args.duration
        next_churn = time.monotonic() + args.every if args.every > 0 else end
        changes = 0
        while (now := time.monotonic()) < end:
            signaled = signal.sigtimedwait({signal.SIGUSR1}, max(min(next_churn, end) - now, 0))
            if signaled and args.external_services:
                server.apply("services", changed_service(args.external_services))
                print(f"changed {time.time():.6f}", flush=True)
            if args.every > 0 and time.monotonic() >= next_churn:
                next_churn += args.every
                changes += 1
                eps = args.endpoint if changes % 2 == 0 else args.endpoint[:-1]
                server.put_endpoint_slice("kube-system", "kube-dns-a", service="kube-dns",
                                          endpoints=list(eps))
        print(f"changes {changes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
