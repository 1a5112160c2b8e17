"""The only code that talks to the Kubernetes API: list/watch -> `ClusterFacts`.

Layers, lowest first (imports only go down; nothing outside this package imports the client):

- `errors`: the exception hierarchy; client and urllib3 exceptions are mapped once, here.
- `backoff`: exponential backoff with jitter, and the stop-aware waiter it sleeps on.
- `extract`: pure functions from an object's JSON to the few fields the planner needs.
- `reflector`: generic list-then-watch of one kind and selector into a store of extracted values.
- `client`: the official client's configuration and the `ListWatch` of each kind we watch.
- `source`: `KubeSource` (reflectors on threads, `snapshot`/`wait_changed`/`status`) and
  `load_once` for one-shot commands.

`dnsguard.testing.fake_apiserver` speaks the same HTTP protocol in-process for tests.
"""

from dnsguard.kube.backoff import Backoff, Waiter, event_wait
from dnsguard.kube.errors import KubeApiError, KubeConfigError, KubeError, KubeExpired
from dnsguard.kube.reflector import ListWatch, Reflector
from dnsguard.kube.source import (
    READ_TIMEOUT,
    WATCH_TIMEOUT,
    ClusterFacts,
    KubeSource,
    load_once,
)

__all__ = [
    "READ_TIMEOUT",
    "WATCH_TIMEOUT",
    "Backoff",
    "ClusterFacts",
    "KubeApiError",
    "KubeConfigError",
    "KubeError",
    "KubeExpired",
    "KubeSource",
    "ListWatch",
    "Reflector",
    "Waiter",
    "event_wait",
    "load_once",
]
