"""The Kubernetes API client, and API failures as CSI errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config

from zerofs_csi import errors

# Connect and read timeouts of every request that is not a watch: no CSI call may wait
# forever on an API server that stopped answering.
REQUEST_TIMEOUT = (5.0, 30.0)


def make_api_client(kubeconfig: Path | None = None, host: str | None = None) -> client.ApiClient:
    """An API client from, in order: ``host`` (an unauthenticated URL, for tests), a
    kubeconfig file, the in-cluster service account, the default kubeconfig."""
    configuration = client.Configuration()
    if host is not None:
        configuration.host = host
    elif kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        try:
            config.load_kube_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as exc:
            raise errors.FailedPrecondition(
                "no Kubernetes API configuration: not running in a pod and no kubeconfig "
                f"found ({exc})"
            ) from None
    return client.ApiClient(configuration)


def _status_text(exc: client.ApiException) -> str:
    """The API's reason and message for a failed call, from its Status body."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return f"{body.get('reason') or exc.reason}: {body['message']}"
    return str(exc.reason or exc.status)


def api_failure(exc: Exception, action: str, *, quote_server: bool = True) -> errors.CsiError:
    """Map a failed API call to a CSI error saying what was being done.

    ``quote_server=False`` leaves out the server's message: for calls whose body
    carried secret values, which a validation message could echo.
    """
    if isinstance(exc, client.ApiException):
        detail = _status_text(exc) if quote_server else str(exc.reason or exc.status)
        message = f"{action}: Kubernetes API answered {exc.status} {detail}"
        status = exc.status or 0
        if status == 404:
            return errors.NotFound(message)
        if status == 409:
            return errors.Aborted(message)
        if status in (401, 403):
            return errors.FailedPrecondition(
                message + " (check the node plugin's RBAC Role, see zerofs_csi.kube.rbac)"
            )
        if status in (400, 422):
            return errors.InvalidArgument(message)
        if status == 429 or status >= 500:
            return errors.Unavailable(message)
        return errors.Internal(message)
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return errors.Unavailable(f"{action}: cannot reach the Kubernetes API: {exc}")
    return errors.Internal(f"{action}: {exc}")


def is_status(exc: BaseException, status: int) -> bool:
    return isinstance(exc, client.ApiException) and exc.status == status


Obj = dict[str, Any]


def call_json(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
    """Call a generated API method and return the response body as plain JSON.

    Plain dicts (camelCase keys, as the API serves them) instead of the client's
    models, whose every field is optional: the driver reads a few fields and builds
    its manifests as dicts too. Failures still raise ``ApiException``.
    """
    kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
    response = method(*args, _preload_content=False, **kwargs)
    body = json.loads(response.data or b"{}")
    if not isinstance(body, dict):
        raise client.ApiException(status=0, reason="the API answered with something not an object")
    return body


# Objects per page of a listing: bounded responses however many records a namespace holds.
LIST_PAGE = 500


def listed(method: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Iterator[Obj]:
    """Every object of a list call, page by page; a failure is a CSI error listing
    ``what``."""
    token: str | None = None
    while True:
        try:
            page = call_json(method, *args, limit=LIST_PAGE, _continue=token, **kwargs)
        except Exception as exc:
            raise api_failure(exc, f"listing {what}") from None
        yield from page.get("items") or []
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return
