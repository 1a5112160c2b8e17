"""A fake Kubernetes API that churns the cluster DNS endpoints, for the agent footprint.

``python -m bench.fakeapi KUBECONFIG --node NAME --cluster-ip IP --endpoint IP ... [--every S]
[--duration S]`` runs `dnsguard.testing.fake_apiserver.FakeApiServer` in the lab node's
namespace (the agent must reach it on 127.0.0.1 there), publishes the kube-dns Service, its
EndpointSlice and the node, writes the kubeconfig (its appearance means "serving") and then,
every ``--every`` seconds, drops the last endpoint or puts it back: each change is a new plan
for the agent (new upstreams, an unbound reload). It stops by itself after ``--duration``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dnsguard.testing.fake_apiserver import FakeApiServer

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fakeapi")
    p.add_argument("kubeconfig", type=Path)
    p.add_argument("--node", required=True)
    p.add_argument("--pod-cidr", required=True)
    p.add_argument("--cluster-ip", required=True)
    p.add_argument("--endpoint", action="append", required=True)
    p.add_argument("--every", type=float, default=0.0, help="seconds between changes; 0: none")
    p.add_argument("--duration", type=float, default=120.0)
    args = p.parse_args(argv)
    with FakeApiServer(bookmark_interval=0.5) as server:
        server.put_service("kube-system", "kube-dns", [args.cluster_ip])
        server.put_endpoint_slice("kube-system", "kube-dns-a", service="kube-dns",
                                  endpoints=list(args.endpoint))
        server.put_node(args.node, [args.pod_cidr])
        tmp = args.kubeconfig.with_suffix(".tmp")
        server.write_kubeconfig(tmp)
        tmp.replace(args.kubeconfig)  # atomic: its presence means the server is up
        end = time.monotonic() + args.duration
        changes = 0
        while time.monotonic() < end:
            left = max(end - time.monotonic(), 0.0)
            time.sleep(min(args.every, left) if args.every > 0 else min(1.0, left))
            if args.every > 0 and time.monotonic() < end:
                changes += 1
                eps = args.endpoint if changes % 2 == 0 else args.endpoint[:-1]
                server.put_endpoint_slice("kube-system", "kube-dns-a", service="kube-dns",
                                          endpoints=list(eps))
        print(f"changes {changes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
