"""Typed errors of the Kubernetes layer; client exceptions become these once, at the boundary.

::

    KubeError                 anything this layer raises
    ├── KubeConfigError       no usable kubeconfig or in-cluster environment (an operator's fix)
    └── KubeApiError          one request failed; ``status`` is the HTTP code or None (transport)
        └── KubeExpired       410 Gone / "too old resource version": relist, not back off

`from_exception` is the only place that knows the official client's and urllib3's exception
types; callers branch on these classes and on ``status``/``retry_after``, never on message text.
"""

from __future__ import annotations

import http.client
import json

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

__all__ = ["TRANSPORT_ERRORS", "KubeApiError", "KubeConfigError", "KubeError", "KubeExpired",
           "from_exception", "from_status"]

#: The longest Retry-After we honour; a server asking for more still gets a retry this soon.
MAX_RETRY_AFTER = 60.0


#: What a request or a watch stream can raise below this layer; `from_exception` maps each.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    ApiException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
    json.JSONDecodeError)


class KubeError(Exception):
    """Base of every error from `dnsguard.kube`; the message is one line fit for a log."""


class KubeConfigError(KubeError):
    """Neither ``--kubeconfig`` nor the in-cluster service account environment is usable."""


class KubeApiError(KubeError):
    """A request to the API server failed.

    ``status`` is the HTTP status (or the ``code`` of a watch ERROR event), None when the
    request never got an answer (refused, reset, timed out). ``retry_after`` is the server's
    Retry-After in seconds when it sent one (429, some 5xx).
    """

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class KubeExpired(KubeApiError):
    """The resourceVersion we hold is older than the server's history: list again."""


def _retry_after(headers: object) -> float | None:
    get = getattr(headers, "get", None)
    raw = get("Retry-After") if callable(get) else None
    if raw is None:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(raw)))
    except (TypeError, ValueError):
        return None  # an HTTP date: rare from kube-apiserver; our own backoff applies


def _status_message(body: object) -> str:
    """The ``message`` of a metav1.Status body, or '' when the body is not one."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str) or not body.startswith("{"):
        return ""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    return str(doc.get("message", "")) if isinstance(doc, dict) else ""


def from_status(what: str, status: dict[str, object]) -> KubeApiError:
    """A watch ERROR event's metav1.Status as a typed error (410 and "Expired" -> KubeExpired)."""
    raw_code = status.get("code")
    code = raw_code if isinstance(raw_code, int) else None
    reason = str(status.get("reason", ""))
    message = f"{what}: {code or ''} {reason}: {status.get('message', '')}".replace("  ", " ")
    if code == 410 or reason in ("Expired", "Gone"):
        return KubeExpired(message, status=410)
    return KubeApiError(message, status=code)


def from_exception(what: str, exc: BaseException) -> KubeApiError:
    """Map a client, urllib3 or socket exception raised while doing ``what`` to a typed error."""
    if isinstance(exc, KubeApiError):
        return exc
    if isinstance(exc, ApiException):
        status = exc.status if isinstance(exc.status, int) and exc.status > 0 else None
        detail = _status_message(exc.body) or str(exc.reason or "").strip()
        message = f"{what}: HTTP {status or '?'} {detail}".rstrip()
        if status == 410:
            return KubeExpired(message, status=410)
        return KubeApiError(message, status=status, retry_after=_retry_after(exc.headers))
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return from_exception(what, exc.reason)
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return KubeApiError(f"{what}: no data from the API server within the read timeout")
    # NewConnectionError subclasses ConnectTimeoutError in urllib3, so it is tested first
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return KubeApiError(f"{what}: cannot connect to the API server: {exc}")
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return KubeApiError(f"{what}: connecting to the API server timed out")
    # anything else: a reset or cut connection, or a garbled JSON line from one
    text = str(exc) or type(exc).__name__
    return KubeApiError(f"{what}: connection to the API server failed: {text}")
