"""The official client, configured once, and the collections we list and watch through it.

``retries`` is off in urllib3 because the reflector owns retrying (with backoff and jitter and
a relist when needed); two retry layers would hide failures from status and multiply load.
TCP keepalive is on so a peer that vanished (node rebooted, NAT entry dropped) is noticed by
the kernel even between the read timeouts.

`Collection` issues the same GET a generated method such as ``CoreV1Api.list_namespaced_service``
would (same query parameters, ``Accept``, BearerToken auth with the client's token refresh,
non-2xx raised as the client's ApiException), through the client's own ``param_serialize`` and
``call_api``. It exists because importing a generated API module is expensive: ``CoreV1Api``
alone adds about 20 MiB of RSS in kubernetes 37 (a validator per method), a third of the
agent's footprint, on every node. Generated methods still work as a `ListWatch.list_fn`.
"""

from __future__ import annotations

import socket
from typing import Any

import yaml  # type: ignore[import-untyped]  # kubernetes depends on PyYAML; no stubs here
from kubernetes.client.api_client import ApiClient
from kubernetes.client.configuration import Configuration
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config, kube_config
from kubernetes.config.config_exception import ConfigException
from urllib3.connection import HTTPConnection

from dnsguard.kube.errors import KubeConfigError
from dnsguard.kube.reflector import ListWatch

__all__ = ["Collection", "all_services", "endpoint_slices_of", "new_api_client", "node",
           "service"]

#: The label every EndpointSlice controller puts on the slices of a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

#: Keyword (as the generated methods name it) -> query parameter.
_QUERY = {
    "field_selector": "fieldSelector",
    "label_selector": "labelSelector",
    "resource_version": "resourceVersion",
    "resource_version_match": "resourceVersionMatch",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "timeout_seconds": "timeoutSeconds",
    "watch": "watch",
    "limit": "limit",
    "_continue": "continue",
}


def _keepalive() -> list[tuple[int, int, int]]:
    opts = [*HTTPConnection.default_socket_options, (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; elsewhere the system defaults apply
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return opts


def new_api_client(kubeconfig: str | None, *, pool_size: int = 8) -> ApiClient:
    """An ApiClient from ``kubeconfig``, or from the pod's service account when it is None."""
    cfg = Configuration()
    try:
        if kubeconfig is not None:
            kube_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=cfg, persist_config=False)
        else:
            incluster_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=cfg)
    except (ConfigException, OSError, ValueError, yaml.YAMLError) as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else (
            "in-cluster config (no --kubeconfig given; is this running in a pod with a "
            "service account?)")
        # one line: a YAML error spans several
        raise KubeConfigError(f"cannot use {where}: {' '.join(str(exc).split())}") from exc
    cfg.retries = False
    cfg.connection_pool_maxsize = max(pool_size, 2)
    cfg.socket_options = _keepalive()
    return ApiClient(cfg)


class Collection:
    """``GET path`` for list and watch, called like a generated list method (see module doc)."""

    def __init__(self, api: ApiClient, path: str) -> None:
        self.api = api
        self.path = path

    def __call__(self, *, _preload_content: bool = False,
                 _request_timeout: tuple[float, float] | float | None = None,
                 **params: object) -> Any:
        """The raw urllib3 response (status 2xx); other statuses raise ApiException."""
        if _preload_content:
            raise ValueError("Collection returns the raw response; pass _preload_content=False")
        query = [(_QUERY[k], str(v).lower() if isinstance(v, bool) else v)
                 for k, v in params.items() if v is not None]
        method, url, headers, body, post = self.api.param_serialize(
            method="GET", resource_path=self.path, query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        resp = self.api.call_api(method, url, header_params=headers, body=body,
                                 post_params=post, _request_timeout=_request_timeout)
        if not 200 <= resp.status <= 299:
            resp.read()  # type: ignore[no-untyped-call]
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return resp.response


def service(api: ApiClient, namespace: str, name: str) -> ListWatch:
    """One Service by name: a field-selected list/watch, so we see it created and deleted."""
    return ListWatch(kind="services",
                     list_fn=Collection(api, f"/api/v1/namespaces/{namespace}/services"),
                     field_selector=f"metadata.name={name}")


def endpoint_slices_of(api: ApiClient, namespace: str, service_name: str) -> ListWatch:
    """Every EndpointSlice of one Service (one per family, more past 100 endpoints)."""
    return ListWatch(
        kind="endpointslices",
        list_fn=Collection(api, f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"),
        label_selector=f"{SERVICE_NAME_LABEL}={service_name}")


def node(api: ApiClient, name: str) -> ListWatch:
    """This node only, as kubelet and kube-proxy watch it: list/watch with a name selector."""
    return ListWatch(kind="nodes", list_fn=Collection(api, "/api/v1/nodes"),
                     field_selector=f"metadata.name={name}")


def all_nodes(api: ApiClient) -> ListWatch:
    """Every Node in the cluster (for their addresses; paginated list, then one watch)."""
    return ListWatch(kind="nodes", list_fn=Collection(api, "/api/v1/nodes"))


def all_services(api: ApiClient) -> ListWatch:
    """Every Service in the cluster (paginated list, then one watch)."""
    return ListWatch(kind="services", list_fn=Collection(api, "/api/v1/services"))
