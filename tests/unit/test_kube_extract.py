"""The pure parts of dnsguard.kube: extractors, backoff, and the error mapping at the boundary."""

from __future__ import annotations

import ipaddress

import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from dnsguard.kube import Backoff, KubeApiError, KubeExpired
from dnsguard.kube.errors import from_exception, from_status
from dnsguard.kube.extract import (
    node_pod_cidrs,
    object_key,
    service_cluster_ips,
    slice_dns_endpoints,
)
from dnsguard.testing.fake_apiserver import endpoint_slice_object, node_object, service_object

ip = ipaddress.ip_address
net = ipaddress.ip_network


class TestServiceClusterIPs:
    def test_dual_stack_keeps_primary_family_first(self):
        svc = service_object("kube-system", "kube-dns", ["fd00::a", "10.96.0.10"])
        assert service_cluster_ips(svc) == (ip("fd00::a"), ip("10.96.0.10"))

    def test_older_objects_with_only_cluster_ip(self):
        svc = {"metadata": {"name": "x"}, "spec": {"clusterIP": "10.96.0.10"}}
        assert service_cluster_ips(svc) == (ip("10.96.0.10"),)

    def test_headless_and_external_name_have_none(self):
        assert service_cluster_ips(service_object("ns", "x", ["None"])) == ()
        assert service_cluster_ips({"metadata": {"name": "x"},
                                    "spec": {"type": "ExternalName"}}) == ()

    def test_garbage_address_is_skipped_not_fatal(self):
        svc = {"metadata": {"name": "x"}, "spec": {"clusterIPs": ["bogus", "10.96.0.10"]}}
        assert service_cluster_ips(svc) == (ip("10.96.0.10"),)


class TestSliceEndpoints:
    def test_ready_endpoints_on_the_udp_dns_port_sorted(self):
        s = endpoint_slice_object("kube-system", "a", service="kube-dns",
                                  endpoints=["10.244.2.9", ("10.244.1.7", False), "10.244.0.5",
                                             ("10.244.3.3", None)])
        # ready=None means "unknown": the API says consumers treat it as ready
        assert slice_dns_endpoints(s) == ((ip("10.244.0.5"), 53), (ip("10.244.2.9"), 53),
                                          (ip("10.244.3.3"), 53))

    def test_dns_port_named_dns_wins_over_other_udp_53(self):
        s = endpoint_slice_object("ns", "a", service="kube-dns", endpoints=["10.0.0.1"],
                                  ports=[("other", "UDP", 53), ("dns", "UDP", 1053),
                                         ("dns-tcp", "TCP", 1053)])
        assert slice_dns_endpoints(s) == ((ip("10.0.0.1"), 1053),)

    def test_unnamed_udp_53_is_accepted(self):
        s = endpoint_slice_object("ns", "a", service="x", endpoints=["10.0.0.1"],
                                  ports=[("", "UDP", 53)])
        assert slice_dns_endpoints(s) == ((ip("10.0.0.1"), 53),)

    def test_port_protocol_defaults_to_tcp(self):
        s = endpoint_slice_object("ns", "a", service="x", endpoints=["10.0.0.1"], ports=[])
        s["ports"] = [{"name": "dns", "port": 53}]  # no protocol: TCP by the API's default
        assert slice_dns_endpoints(s) == ()

    def test_fqdn_slices_and_slices_without_dns_port_contribute_nothing(self):
        fqdn = endpoint_slice_object("ns", "a", service="x", endpoints=["10.0.0.1"],
                                     address_type="FQDN")
        no_port = endpoint_slice_object("ns", "b", service="x", endpoints=["10.0.0.1"],
                                        ports=[("metrics", "TCP", 9153)])
        assert slice_dns_endpoints(fqdn) == slice_dns_endpoints(no_port) == ()

    def test_ipv6(self):
        s = endpoint_slice_object("ns", "a", service="x", endpoints=["fd00::5"])
        assert s["addressType"] == "IPv6"
        assert slice_dns_endpoints(s) == ((ip("fd00::5"), 53),)


class TestNodePodCIDRs:
    def test_pod_cidrs_both_families(self):
        n = node_object("n1", ["10.244.1.0/24", "fd00:1::/64"])
        assert node_pod_cidrs(n) == (net("10.244.1.0/24"), net("fd00:1::/64"))

    def test_single_pod_cidr_of_older_nodes_and_unassigned(self):
        assert node_pod_cidrs({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.1.0.0/24"}}) \
            == (net("10.1.0.0/24"),)
        assert node_pod_cidrs(node_object("n1")) == ()

    def test_host_bits_set_is_skipped(self):
        assert node_pod_cidrs({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.1.0.5/24"}}) == ()


def test_object_key_namespaced_and_cluster_scoped():
    assert object_key(service_object("kube-system", "kube-dns", ["10.96.0.10"])) == \
        "kube-system/kube-dns"
    assert object_key(node_object("n1")) == "n1"


class TestBackoff:
    def test_doubles_to_the_cap_with_jitter_on_top(self):
        b = Backoff(initial=1.0, maximum=8.0, jitter=0.5, rand=lambda: 1.0)
        assert [b.delay(n) for n in range(1, 7)] == [1.5, 3.0, 6.0, 12.0, 12.0, 12.0]

    def test_retry_after_is_a_floor(self):
        b = Backoff(initial=0.5, rand=lambda: 0.0)
        assert b.delay(1, at_least=7.0) == 7.0
        assert b.delay(1, at_least=0.1) == 0.5

    def test_jitter_spreads_clients(self):
        values = iter([0.0, 0.99])
        b = Backoff(initial=2.0, jitter=0.5, rand=lambda: next(values))
        assert b.delay(1) != b.delay(1)


class _Headers(dict[str, str]):
    pass


class TestErrorMapping:
    def test_410_is_expired(self):
        exc = ApiException(status=410, reason="Gone")
        assert isinstance(from_exception("list x", exc), KubeExpired)

    def test_429_carries_retry_after_capped(self):
        exc = ApiException(status=429, reason="Too Many Requests")
        exc.headers = _Headers({"Retry-After": "3"})
        err = from_exception("watch x", exc)
        assert (type(err), err.status, err.retry_after) == (KubeApiError, 429, 3.0)
        exc.headers = _Headers({"Retry-After": "86400"})
        assert from_exception("watch x", exc).retry_after == 60.0

    def test_status_body_message_is_used(self):
        exc = ApiException(status=403, reason="Forbidden")
        exc.body = ('{"kind":"Status","message":"services is forbidden: User \\"x\\" cannot '
                    'list resource \\"services\\""}')
        assert "cannot list resource" in str(from_exception("list x", exc))

    def test_transport_errors_have_no_status(self):
        err = from_exception("watch x", urllib3.exceptions.ReadTimeoutError(None, "/", "t"))
        assert err.status is None and "read timeout" in str(err)
        err = from_exception("list x", ConnectionRefusedError(111, "refused"))
        assert err.status is None and "refused" in str(err)

    def test_watch_error_event(self):
        gone = {"kind": "Status", "code": 410, "reason": "Expired",
                "message": "too old resource version: 1 (5)"}
        assert isinstance(from_status("watch x", gone), KubeExpired)
        other = from_status("watch x", {"code": 500, "reason": "InternalError", "message": "m"})
        assert type(other) is KubeApiError and other.status == 500


@pytest.mark.parametrize("doc", [{}, {"metadata": {}}])
def test_extractors_tolerate_empty_objects(doc):
    assert service_cluster_ips(doc) == ()
    assert slice_dns_endpoints(doc) == ()
    assert node_pod_cidrs(doc) == ()
