"""The reflector of every Service (``--external-to-cluster``) under 10,000 Services.

What this proves, through the official client against the in-process fake API server: a
paginated list of 10k Services delivers every Service with external or load-balancer IPs, with
the right ClusterIPs, ports and external IPs (dual-stack ones too), and stores nothing for the
others; a watch update and a delete are reflected; the memory the source retains per stored
Service is a small fraction of the Service parsed from JSON, which is what keeping whole objects
would cost (the extractor keeps a few fields; about 1/12 of the bytes, under half the JSON
text), and a relist after 410 Gone replaces the store without growing it.

Memory is measured two ways, both without slowing the 10k list (tracemalloc would, about
fourfold): the deep size in bytes of what the reflector stores, and the interpreter's allocated
blocks (`sys.getallocatedblocks`, every thread, so a copy kept anywhere else in the process shows
too), each against the same Services parsed from JSON, which is what a reflector keeping whole
objects would hold.

What the fake cannot prove: a real API server's list latency, page sizes and memory under 10k
objects (its consistent reads come from the watch cache), protobuf, HTTP/2, API priority and
fairness throttling a large list, or when a real server answers 410. The sizes are Python's
view: the client's C-level and the kernel's socket buffers are not counted, nor is how much of
the freed memory the allocator returns to the OS (RSS).
"""

from __future__ import annotations

import enum
import gc
import ipaddress
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dnsguard.kube import Backoff, KubeSource
from dnsguard.model import ExternalService, IPAddress, Proto, ServicePort
from dnsguard.testing.fake_apiserver import FakeApiServer
from tests.support.kube import wait_facts

N = 10_000
ip = ipaddress.ip_address


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def service(i: int, *, lb_ip: str | None = None) -> tuple[dict[str, Any], ExternalService | None]:
    """Service ``i`` as the API server sends it, and what the reflector should keep of it.

    One in ten has no external address (ClusterIP only), one in ten only a hostname ingress;
    the rest have spec.externalIPs, a load-balancer ingress IP, or both; every fourth is
    dual-stack. Metadata carries what real Services do (labels, kubectl's last-applied
    annotation, managedFields), none of which the planner needs.
    """
    ns, name = f"team{i % 37}", f"svc-{i:05d}"
    v4, v6 = f"198.18.{i // 256}.{i % 256}", f"fd00:198:18:1::{i:x}"
    ext4, ext6 = f"198.19.{i // 256}.{i % 256}", f"fd00:198:18:2::{i:x}"
    dual = i % 4 == 0
    cluster = [v4, v6] if dual else [v4]
    external: list[str] = []
    ingress: list[dict[str, str]] = []
    kind = i % 10
    if kind == 1:
        ingress = [{"hostname": f"{name}.elb.example"}]
    elif kind != 0:
        if kind % 3 != 1:
            external = [ext4, ext6] if dual else [ext4]
        if kind % 3 != 0:
            ingress = [{"ip": lb_ip or ext4}] + ([{"ip": ext6}] if dual else [])
    ports = [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
             {"name": "https", "protocol": "TCP", "port": 443, "targetPort": 8443}]
    if i % 5 == 2:
        ports.append({"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353})
    spec = {"type": "LoadBalancer" if ingress else "ClusterIP", "clusterIP": v4,
            "clusterIPs": cluster, "ipFamilies": ["IPv4", "IPv6"] if dual else ["IPv4"],
            "ipFamilyPolicy": "PreferDualStack" if dual else "SingleStack",
            "externalIPs": external, "ports": ports, "sessionAffinity": "None",
            "selector": {"app.kubernetes.io/name": name},
            "internalTrafficPolicy": "Cluster", "externalTrafficPolicy": "Cluster"}
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": ns,
              "app.kubernetes.io/managed-by": "Helm"}
    obj = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "namespace": ns, "name": name, "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": json.dumps(
                {"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": name, "namespace": ns, "labels": labels},
                 "spec": {"ports": ports, "selector": spec["selector"]}})},
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                               "apiVersion": "v1", "time": "2026-11-01T10:00:00Z",
                               "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:spec": {f"k:{{\"port\":{p['port']}}}": {
                                   "f:name": {}, "f:port": {}, "f:protocol": {},
                                   "f:targetPort": {}} for p in ports}}}],
        },
        "spec": spec,
        "status": {"loadBalancer": {"ingress": ingress}},
    }
    ext_ips: list[IPAddress] = [ip(a) for a in external]
    ext_ips += [ip(g["ip"]) for g in ingress if "ip" in g and ip(g["ip"]) not in ext_ips]
    if not ext_ips:
        return obj, None
    kept = ExternalService(f"{ns}/{name}", tuple(ip(a) for a in cluster),
                           tuple(ServicePort(Proto(str(p["protocol"]).lower()), int(p["port"]))
                                 for p in ports),
                           tuple(ext_ips), lb_ips=tuple(ip(g["ip"]) for g in ingress if "ip" in g))
    return obj, kept


@pytest.fixture(scope="module")
def services() -> tuple[list[dict[str, Any]], dict[str, ExternalService]]:
    objs, want = [], {}
    for i in range(N):
        obj, kept = service(i)
        objs.append(obj)
        if kept is not None:
            want[kept.key] = kept
    return objs, want


@pytest.fixture
def server(services: tuple[list[dict[str, Any]], dict[str, ExternalService]],
           ) -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.5) as s:
        s.put_service("kube-system", "kube-dns", ["198.18.250.10"])
        for obj in services[0]:
            s.apply("services", obj)
        yield s


def undated(facts: Any) -> dict[str, ExternalService]:
    """The Services by key, without the server-assigned creationTimestamp and uid."""
    return {s.key: replace(s, created="", uid="") for s in facts.external_services}


def deep_size(root: object) -> int:
    """Bytes of ``root`` and everything it references, each object once: about, as it leaves out
    the small attribute arrays of 3.11 instances, and enum members (shared by every value)."""
    seen: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type | enum.Enum):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        # get_referents skips a dict's string keys; for an instance it does not materialize
        # a __dict__ as reading o.__dict__ would
        stack += [*o.keys(), *o.values()] if isinstance(o, dict) else gc.get_referents(o)
    return total


def blocks() -> int:
    """Memory blocks the interpreter holds, after collecting garbage."""
    gc.collect()
    return sys.getallocatedblocks()


def test_ten_thousand_services_arrive_small_and_a_relist_does_not_grow_them(
        server: FakeApiServer, services: tuple[list[dict[str, Any]], dict[str, ExternalService]],
        tmp_path: Path) -> None:
    objs, want = services
    # the Services as a reflector keeping whole objects would hold them: parsed from JSON
    sample = [json.dumps(o) for o in objs[::20]]
    json_bytes = sum(map(len, sample)) / len(sample)
    before = blocks()
    parsed = [json.loads(text) for text in sample]
    raw_blocks = (blocks() - before) / len(sample)
    raw_bytes = deep_size(parsed) / len(sample)
    del parsed

    # the 10k objects built for the test and held by the fake server stay alive throughout:
    # out of the collector's way, each gc.collect() is quick
    gc.freeze()
    kc = str(server.write_kubeconfig(tmp_path / "kc"))
    src = KubeSource(kubeconfig=kc, dns_services=[("kube-system", "kube-dns")], node_name=None,
                     read_timeout=10.0, watch_timeout=60,
                     backoff=Backoff(initial=0.02, maximum=0.1), external=True)
    ext = next(r for r in src.reflectors if r.name == "services (all)")
    try:
        start = blocks()
        src.start()
        facts = wait_facts(src, lambda f: len(f.external_services) == len(want), timeout=60)
        got = {s.key: s for s in facts.external_services}
        assert all(s.created and s.uid for s in got.values())  # the server's, for claims
        assert undated(facts) == want  # every field of every Service with an external IP
        assert not any(k.startswith("kube-system/") for k in got)
        assert sum(1 for s in want.values() if len(s.cluster_ips) == 2) > 1000
        del facts, got
        synced = blocks()
        stored_bytes = deep_size(ext._store) / len(want)
        stored_blocks = (synced - start) / len(want)
        print(f"\n{N} Services, {len(want)} stored; one Service: {json_bytes:.0f} B of JSON, "
              f"{raw_bytes:.0f} B and {raw_blocks:.0f} blocks parsed; stored: "
              f"{stored_bytes:.0f} B, process: {stored_blocks:.1f} blocks per stored Service")
        assert stored_bytes < raw_bytes / 3, (stored_bytes, raw_bytes)
        assert stored_blocks < raw_blocks / 3, (stored_blocks, raw_blocks)

        # a watch update (a new load-balancer IP) and a delete
        moved_obj, moved = service(1234, lb_ip="198.19.250.4")
        assert moved is not None and moved.key in want and moved != want[moved.key]
        server.apply("services", moved_obj)
        gone = next(k for k in want if k != moved.key)
        server.delete("services", *gone.split("/"))
        after = wait_facts(src, lambda f: gone not in {s.key for s in f.external_services},
                           timeout=10)
        assert undated(after) == {k: v for k, v in want.items() if k != gone} | {moved.key: moved}
        del after

        # relist: changes while the watch is away and the server forgot its history -> 410
        relists = ext.status()["relists"]
        settled = blocks()
        with server.down():
            back_obj, back = service(1234)
            server.apply("services", back_obj)
            server.compact()
        final = wait_facts(src, lambda f: ext.status()["relists"] != relists
                           and back in undated(f).values(), timeout=60)
        assert undated(final) == {k: v for k, v in want.items() if k != gone}
        del final
        grown = blocks() - settled
        print(f"the relist changed the process by {grown / len(want):+.2f} blocks per stored "
              "Service")
        assert grown < 0.1 * (synced - start), (grown, synced - start)
    finally:
        src.stop()
        gc.unfreeze()
