"""The official client, configured once: where the API is, how we authenticate, how we connect.

``retries`` is off in urllib3 because the reflector owns retrying (with backoff and jitter and
a relist when needed); two retry layers would hide failures from status and multiply load.
TCP keepalive is on so a peer that vanished (node rebooted, NAT entry dropped) is noticed by
the kernel even between the read timeouts.
"""

from __future__ import annotations

import functools
import socket

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException
from urllib3.connection import HTTPConnection

from dnsguard.kube.errors import KubeConfigError
from dnsguard.kube.reflector import ListWatch

__all__ = ["all_services", "endpoint_slices_of", "new_api_client", "node", "service"]

#: The label every EndpointSlice controller puts on the slices of a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _keepalive() -> list[tuple[int, int, int]]:
    opts = [*HTTPConnection.default_socket_options, (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; elsewhere the system defaults apply
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return opts


def new_api_client(kubeconfig: str | None, *, pool_size: int = 8) -> client.ApiClient:
    """An ApiClient from ``kubeconfig``, or from the pod's service account when it is None."""
    cfg = client.Configuration()
    try:
        if kubeconfig is not None:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=cfg, persist_config=False)
        else:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=cfg)
    except (ConfigException, OSError, ValueError) as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else (
            "in-cluster config (no --kubeconfig given; is this running in a pod with a "
            "service account?)")
        raise KubeConfigError(f"cannot use {where}: {exc}") from exc
    cfg.retries = False
    cfg.connection_pool_maxsize = max(pool_size, 2)
    cfg.socket_options = _keepalive()
    return client.ApiClient(cfg)


def service(api: client.ApiClient, namespace: str, name: str) -> ListWatch:
    """One Service by name: a field-selected list/watch, so we see it created and deleted."""
    return ListWatch(
        kind="services",
        list_fn=functools.partial(client.CoreV1Api(api).list_namespaced_service, namespace),
        field_selector=f"metadata.name={name}")


def endpoint_slices_of(api: client.ApiClient, namespace: str, service_name: str) -> ListWatch:
    """Every EndpointSlice of one Service (one per family, more past 100 endpoints)."""
    return ListWatch(
        kind="endpointslices",
        list_fn=functools.partial(client.DiscoveryV1Api(api).list_namespaced_endpoint_slice,
                                  namespace),
        label_selector=f"{SERVICE_NAME_LABEL}={service_name}")


def node(api: client.ApiClient, name: str) -> ListWatch:
    """This node only, as kubelet and kube-proxy watch it: list/watch with a name selector."""
    return ListWatch(kind="nodes", list_fn=client.CoreV1Api(api).list_node,
                     field_selector=f"metadata.name={name}")


def all_services(api: client.ApiClient) -> ListWatch:
    """Every Service in the cluster (paginated list, then one watch)."""
    return ListWatch(kind="services",
                     list_fn=client.CoreV1Api(api).list_service_for_all_namespaces)
