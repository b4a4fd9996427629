"""An in-process stand-in for the Kubernetes API server, for hosts without one.

It is a real HTTP server on 127.0.0.1 speaking the REST paths the driver uses (core/v1
pods, pods/status, secrets, configmaps, events, namespaces; apps/v1 daemonsets), so the
unmodified ``kubernetes`` client talks to it. Semantics follow the API server's:

- every write bumps a cluster-wide resourceVersion; objects get uid and
  creationTimestamp; create of an existing name is 409 AlreadyExists, a missing object
  404 NotFound, an update with a stale resourceVersion 409 Conflict;
- deleting a pod first writes deletionTimestamp/deletionGracePeriodSeconds (watchers
  see MODIFIED), then, once the grace is 0, removes it (DELETED). A pod bound to a node
  gets its grace period and stays until a delete with grace 0 (the kubelet's final
  delete), as on a cluster whose kubelet has not yet confirmed the shutdown; unbound or
  finished pods get grace 0. Other kinds go at once;
- lists honour ``limit`` and ``continue`` (pages in etcd key order);
- watches (``?watch=true``) stream ADDED/MODIFIED/DELETED JSON lines from a given
  resourceVersion, filtered by fieldSelector and labelSelector, with objects moving
  in or out of a selector reported as ADDED/DELETED; a resourceVersion older than the
  retained history is answered with an ERROR event of code 410.

One deliberate difference: an update without metadata.resourceVersion is refused with
422, where the real server accepts an unconditional update of a Secret. The driver
must never overwrite blindly, and this makes a test fail if it does.

Every served request is recorded as a ``Call`` (RBAC verb name, apiGroup, resource,
the client's User-Agent), for the test that checks the node plugin's RBAC rules.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]


class Call(NamedTuple):
    verb: str  # as RBAC names it: get, list, watch, create, update, delete
    api_group: str
    resource: str  # with its subresource: pods/status
    user_agent: str


@dataclass(frozen=True)
class Kind:
    group: str  # "" for the core group
    version: str
    resource: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = {
    ("", "pods"): Kind("", "v1", "pods", "Pod"),
    ("", "secrets"): Kind("", "v1", "secrets", "Secret"),
    ("", "configmaps"): Kind("", "v1", "configmaps", "ConfigMap"),
    ("", "events"): Kind("", "v1", "events", "Event"),
    ("", "namespaces"): Kind("", "v1", "namespaces", "Namespace", namespaced=False),
    ("apps", "daemonsets"): Kind("apps", "v1", "daemonsets", "DaemonSet"),
    ("storage.k8s.io", "csinodes"): Kind(
        "storage.k8s.io", "v1", "csinodes", "CSINode", namespaced=False
    ),
    # The driver's custom resource (charts/zerofs-csi/crds/checkpointrequests.yaml).
    ("zerofs.csi.driver", "checkpointrequests"): Kind(
        "zerofs.csi.driver", "v1alpha1", "checkpointrequests", "CheckpointRequest"
    ),
}
# Kinds with a status subresource: a PUT there changes only the status.
WITH_STATUS = frozenset({"Pod", "CheckpointRequest"})
# Read-only subresources other than status, by kind.
READ_ONLY_SUBRESOURCES = {"Pod": frozenset({"log"})}

# Kubernetes' defaults for fields the driver reads back (pkg/apis/core/v1/defaults.go).
DEFAULT_TERMINATION_GRACE_SECONDS = 30
# How many watch events are kept for watches that resume from a resourceVersion.
HISTORY_LIMIT = 10_000
# Metadata a client sets; everything else in metadata belongs to the server.
_USER_METADATA = ("labels", "annotations", "ownerReferences", "finalizers")

_PATH = re.compile(
    r"^/(?:api/(?P<core_version>v1)|apis/(?P<group>[a-z0-9.-]+)/(?P<version>v[0-9a-z]+))"
    r"(?:/namespaces/(?P<namespace>[a-z0-9-]+))?"
    r"/(?P<resource>[a-z]+)(?:/(?P<name>[a-z0-9.-]+)(?:/(?P<subresource>[a-z]+))?)?$"
)
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


def now_rfc3339(offset_seconds: float = 0.0) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=offset_seconds)
    return moment.strftime(RFC3339)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{kind.resource} "{name}" not found',
        {"name": name, "kind": kind.resource},
    )


# ---------------------------------------------------------------- selectors


def _field_value(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def field_selector(text: str) -> Callable[[Obj], bool]:
    """``a.b=v,c!=w`` over dotted paths (metadata.name, spec.nodeName, involvedObject.uid)."""
    terms: list[tuple[str, bool, str]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in term:
            path, _, value = term.partition("!=")
            terms.append((path, False, value))
        else:
            path, _, value = term.partition("==" if "==" in term else "=")
            terms.append((path, True, value))
    return lambda obj: all((_field_value(obj, p) == v) == eq for p, eq, v in terms)


def _split_terms(text: str) -> list[str]:
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    return [t.strip() for t in terms if t.strip()]


_SET_TERM = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)$")


def label_selector(text: str) -> Callable[[Obj], bool]:
    """Equality (=, ==, !=), set (in, notin) and existence (k, !k) requirements."""
    # Each requirement: (key, operator, values) with operator in, notin, exists, absent.
    requirements: list[tuple[str, str, frozenset[str]]] = []
    for term in _split_terms(text):
        match = _SET_TERM.match(term)
        if match:
            values = frozenset(v.strip() for v in match["values"].split(","))
            requirements.append((match["key"], match["op"], values))
        elif "!=" in term:
            key, _, value = term.partition("!=")
            requirements.append((key.strip(), "notin", frozenset({value.strip()})))
        elif "=" in term:
            key, _, value = term.partition("==" if "==" in term else "=")
            requirements.append((key.strip(), "in", frozenset({value.strip()})))
        elif term.startswith("!"):
            requirements.append((term[1:].strip(), "absent", frozenset()))
        else:
            requirements.append((term, "exists", frozenset()))

    def matches(obj: Obj) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        for key, operator, values in requirements:
            present = key in labels
            ok = {
                "in": present and labels.get(key) in values,
                "notin": labels.get(key) not in values,
                "exists": present,
                "absent": not present,
            }[operator]
            if not ok:
                return False
        return True

    return matches


# ---------------------------------------------------------------- the store


@dataclass
class WatchEvent:
    resource_version: int
    kind: Kind
    namespace: str
    type: str  # ADDED, MODIFIED, DELETED
    old: Obj | None
    new: Obj


class Store:
    """Objects by (kind, namespace, name), with a history of changes for watches."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.objects: dict[tuple[Kind, str, str], Obj] = {}
        self.history: list[WatchEvent] = []
        self.revision = 1
        self.closed = False
        # Called (with the lock released) before a PUT is applied: tests inject a
        # concurrent writer here. Arguments: resource, namespace, name.
        self.before_update: list[Callable[[str, str, str], None]] = []

    def _bump(self) -> str:
        self.revision += 1
        return str(self.revision)

    def _record(self, kind: Kind, ns: str, type_: str, old: Obj | None, new: Obj) -> None:
        self.history.append(
            WatchEvent(int(new["metadata"]["resourceVersion"]), kind, ns, type_, old, new)
        )
        del self.history[:-HISTORY_LIMIT]
        self.lock.notify_all()

    def get(self, kind: Kind, ns: str, name: str) -> Obj:
        with self.lock:
            obj = self.objects.get((kind, ns, name))
            if obj is None:
                raise not_found(kind, name)
            return copy.deepcopy(obj)

    def list(
        self,
        kind: Kind,
        ns: str | None,
        matches: Callable[[Obj], bool],
        *,
        limit: int = 0,
        token: str = "",
        filtered: bool = True,
    ) -> Obj:
        """Objects in the order of their etcd keys ("namespace/name"); with ``limit`` a
        page of them and a continue token for the rest. ``filtered``: a selector applies,
        so the number of remaining items is unknown (as the etcd store leaves it). Unlike
        the real server, later pages show the current objects, not a snapshot."""
        revision, after = _parse_continue(token) if token else (0, "")
        with self.lock:
            keyed = sorted(
                (f"{n}/{name}", obj)
                for (k, n, name), obj in self.objects.items()
                if k is kind and (ns is None or n == ns)
            )
            items = [(key, obj) for key, obj in keyed if key > after and matches(obj)]
            meta: Obj = {"resourceVersion": str(revision or self.revision)}
            if 0 < limit < len(items):
                meta["continue"] = _continue_token(revision or self.revision, items[limit - 1][0])
                if not filtered:
                    meta["remainingItemCount"] = len(items) - limit
                items = items[:limit]
            return {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": meta,
                "items": [copy.deepcopy(obj) for _, obj in items],
            }

    def _check_namespace(self, kind: Kind, ns: str) -> None:
        if kind.namespaced and (KINDS[("", "namespaces")], "", ns) not in self.objects:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')

    def create(self, kind: Kind, ns: str, body: Obj) -> Obj:
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name", "")
        if not _NAME.match(name):
            raise ApiError(422, "Invalid", f"{kind.kind} {name!r} is invalid: metadata.name")
        if meta.get("resourceVersion"):
            raise ApiError(
                422, "Invalid", "metadata.resourceVersion: must be unset to create an object"
            )
        with self.lock:
            self._check_namespace(kind, ns)
            if (kind, ns, name) in self.objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{kind.resource} "{name}" already exists',
                    {"name": name, "kind": kind.resource},
                )
            obj = copy.deepcopy(body)
            obj["kind"], obj["apiVersion"] = kind.kind, kind.api_version
            meta = obj["metadata"]
            if kind.namespaced:
                meta["namespace"] = ns
            meta.update(
                uid=str(uuid.uuid4()),
                creationTimestamp=now_rfc3339(),
                resourceVersion=self._bump(),
                generation=1,
            )
            _apply_defaults(kind, obj)
            self.objects[(kind, ns, name)] = obj
            self._record(kind, ns, "ADDED", None, obj)
            return copy.deepcopy(obj)

    def update(self, kind: Kind, ns: str, name: str, body: Obj, subresource: str) -> Obj:
        for hook in list(self.before_update):
            hook(kind.resource, ns, name)
        with self.lock:
            current = self.objects.get((kind, ns, name))
            if current is None:
                raise not_found(kind, name)
            meta = body.get("metadata") or {}
            if meta.get("name", name) != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
            wanted_version = meta.get("resourceVersion")
            if not wanted_version:
                raise ApiError(
                    422,
                    "Invalid",
                    f'{kind.kind} "{name}" is invalid: metadata.resourceVersion: Invalid value: '
                    "0x0: must be specified for an update",
                )
            if wanted_version != current["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {kind.resource} "{name}": the object '
                    "has been modified; please apply your changes to the latest version and "
                    "try again",
                    {"name": name, "kind": kind.resource},
                )
            if subresource == "status":
                new = copy.deepcopy(current)
                new["status"] = copy.deepcopy(body.get("status") or {})
            else:
                if kind.kind == "Pod" and body.get("spec") != current.get("spec"):
                    raise ApiError(
                        422,
                        "Invalid",
                        f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change '
                        "fields other than the allowed mutable ones",
                    )
                # A PUT replaces the object; the server keeps its own metadata and status.
                new = copy.deepcopy(body)
                new["kind"], new["apiVersion"] = kind.kind, kind.api_version
                new["metadata"] = {
                    key: copy.deepcopy(value)
                    for key, value in current["metadata"].items()
                    if key not in _USER_METADATA
                }
                for key in _USER_METADATA:
                    if meta.get(key):
                        new["metadata"][key] = copy.deepcopy(meta[key])
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
                if kind.kind in ("Secret", "ConfigMap"):
                    _fold_string_data(new)
            new["metadata"]["resourceVersion"] = self._bump()
            self.objects[(kind, ns, name)] = new
            self._record(kind, ns, "MODIFIED", current, new)
            return copy.deepcopy(new)

    def _mark_deleting(
        self, kind: Kind, ns: str, current: Obj, grace: int, deadline: datetime, generations: int
    ) -> Obj:
        new = copy.deepcopy(current)
        meta = new["metadata"]
        meta["deletionTimestamp"] = deadline.strftime(RFC3339)
        meta["deletionGracePeriodSeconds"] = grace
        if generations and meta.get("generation"):
            meta["generation"] += generations
        meta["resourceVersion"] = self._bump()
        self.objects[(kind, ns, meta["name"])] = new
        self._record(kind, ns, "MODIFIED", current, new)
        return new

    def delete(self, kind: Kind, ns: str, name: str, grace: int | None, options: Obj) -> Obj:
        with self.lock:
            current = self.objects.get((kind, ns, name))
            if current is None:
                raise not_found(kind, name)
            preconditions = options.get("preconditions") or {}
            for field_name in ("uid", "resourceVersion"):
                wanted = preconditions.get(field_name)
                if wanted and wanted != current["metadata"].get(field_name):
                    raise ApiError(
                        409,
                        "Conflict",
                        f"Precondition failed: {field_name} in precondition: {wanted}, "
                        f"{field_name} in object meta: {current['metadata'].get(field_name)}",
                    )
            meta = current["metadata"]
            if kind.kind == "Pod":
                # Pods delete gracefully (rest.BeforeDelete): the deletion is written
                # first, even with grace 0, and the pod goes once its grace is 0.
                pending = meta.get("deletionGracePeriodSeconds")
                if not meta.get("deletionTimestamp"):
                    grace = _pod_grace(current, grace)
                    deadline = datetime.now(UTC) + timedelta(seconds=grace)
                    current = self._mark_deleting(kind, ns, current, grace, deadline, 1)
                elif pending:
                    # Only a shorter grace changes an earlier graceful delete.
                    if grace is None or _at_least_one(grace) >= pending:
                        return copy.deepcopy(current)
                    grace = _at_least_one(grace)
                    started = _parse_rfc3339(meta["deletionTimestamp"]) - timedelta(seconds=pending)
                    deadline = started + timedelta(seconds=grace)
                    now = datetime.now(UTC)
                    if deadline < now:
                        deadline, grace = now, min(grace, 1)
                    current = self._mark_deleting(kind, ns, current, grace, deadline, 0)
                if current["metadata"]["deletionGracePeriodSeconds"] > 0:
                    return copy.deepcopy(current)
            del self.objects[(kind, ns, name)]
            gone = copy.deepcopy(current)
            gone["metadata"]["resourceVersion"] = self._bump()
            self._record(kind, ns, "DELETED", current, gone)
            if kind.kind == "Pod":
                return copy.deepcopy(gone)
            return {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": name, "kind": kind.resource, "uid": meta["uid"]},
            }


def _at_least_one(grace: int) -> int:
    # A negative grace period means one second (rest.BeforeDelete).
    return 1 if grace < 0 else grace


def _pod_grace(pod: Obj, requested: int | None) -> int:
    # A pod no kubelet runs (unbound, or already finished) needs no graceful shutdown
    # (pkg/registry/core/pod/strategy.go, CheckGracefulDelete).
    if not pod.get("spec", {}).get("nodeName"):
        return 0
    if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        return 0
    if requested is None:
        spec_grace = pod["spec"].get("terminationGracePeriodSeconds")
        requested = DEFAULT_TERMINATION_GRACE_SECONDS if spec_grace is None else spec_grace
    return _at_least_one(int(requested))


def _parse_rfc3339(text: str) -> datetime:
    return datetime.strptime(text, RFC3339).replace(tzinfo=UTC)


def _fold_string_data(obj: Obj) -> None:
    string_data = obj.pop("stringData", None) or {}
    data = obj.setdefault("data", {})
    for key, value in string_data.items():
        data[key] = base64.b64encode(value.encode()).decode()


def _apply_defaults(kind: Kind, obj: Obj) -> None:
    if kind.kind == "Pod":
        spec = obj.setdefault("spec", {})
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE_SECONDS)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        if not spec.get("containers"):
            raise ApiError(422, "Invalid", "spec.containers: Required value")
        for container in spec["containers"] + spec.get("initContainers", []):
            if not container.get("name") or not container.get("image"):
                raise ApiError(422, "Invalid", "spec.containers: name and image are required")
    elif kind.kind in ("Secret", "ConfigMap"):
        _fold_string_data(obj)
        if kind.kind == "Secret":
            obj.setdefault("type", "Opaque")
    elif kind.kind == "Namespace":
        obj["status"] = {"phase": "Active"}


# ---------------------------------------------------------------- HTTP


class FakeApiServer:
    """Start with ``start()``; ``url`` is the API server address for a client."""

    def __init__(self) -> None:
        self.store = Store()
        self.calls: list[Call] = []
        self._calls_lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fake-apiserver", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.store.lock:
            self.store.closed = True
            self.store.lock.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def record(self, verb: str, kind: Kind, subresource: str | None, user_agent: str) -> None:
        resource = f"{kind.resource}/{subresource}" if subresource else kind.resource
        with self._calls_lock:
            self.calls.append(Call(verb, kind.group, resource, user_agent))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._serve("PUT")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

            def do_PATCH(self) -> None:  # noqa: N802
                self._serve("PATCH")

            def _serve(self, method: str) -> None:
                try:
                    self._dispatch(method)
                except ApiError as exc:
                    self._send_json(exc.code, exc.status())
                except (ValueError, KeyError, TypeError) as exc:
                    self._send_json(400, ApiError(400, "BadRequest", str(exc)).status())
                except (BrokenPipeError, ConnectionResetError):
                    # The client went away (a watch it stopped reading): nothing to answer.
                    self.close_connection = True

            def _body(self) -> Obj:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                return json.loads(raw) if raw.strip() else {}

            def _dispatch(self, method: str) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                match = _PATH.match(url.path)
                if match is None:
                    raise ApiError(404, "NotFound", f"the server could not find {url.path}")
                group = match["group"] or ""
                kind = KINDS.get((group, match["resource"]))
                if kind is None:
                    raise ApiError(404, "NotFound", f"the server could not find {url.path}")
                ns = match["namespace"] or ""
                name = match["name"]
                sub = match["subresource"]
                if kind.namespaced and not ns and method != "GET":
                    raise ApiError(404, "NotFound", "namespace required")
                if kind.kind == "Namespace" and name is None and method == "POST":
                    ns = ""
                readable = READ_ONLY_SUBRESOURCES.get(kind.kind, frozenset())
                if sub is not None and method == "GET" and sub in readable:
                    pass
                elif sub is not None and (kind.kind not in WITH_STATUS or sub != "status"):
                    raise ApiError(404, "NotFound", f"no subresource {sub}")
                store = server.store
                scope = ns if kind.namespaced else ""
                agent = self.headers.get("User-Agent", "")

                if method == "GET" and name is None:
                    matches = _matcher(query)
                    if query.get("watch") in ("true", "1"):
                        server.record("watch", kind, None, agent)
                        self._watch(kind, ns if kind.namespaced and ns else None, query, matches)
                    else:
                        server.record("list", kind, None, agent)
                        listed = store.list(
                            kind,
                            ns or None,
                            matches,
                            limit=int(query.get("limit") or 0),
                            token=query.get("continue") or "",
                            filtered=bool(query.get("labelSelector") or query.get("fieldSelector")),
                        )
                        self._send_json(200, listed)
                elif method == "GET" and sub == "log":
                    server.record("get", kind, sub, agent)
                    # No kubelet here: as the real server answers for a pod on no node.
                    store.get(kind, scope, name)
                    raise ApiError(400, "BadRequest", f"pod {name} does not have a host assigned")
                elif method == "GET":
                    server.record("get", kind, sub, agent)
                    self._send_json(200, store.get(kind, scope, name))
                elif method == "POST" and name is None:
                    server.record("create", kind, None, agent)
                    self._send_json(201, store.create(kind, scope, self._body()))
                elif method == "PUT" and name is not None:
                    server.record("update", kind, sub, agent)
                    self._send_json(200, store.update(kind, scope, name, self._body(), sub or ""))
                elif method == "DELETE" and name is not None:
                    server.record("delete", kind, None, agent)
                    options = self._body()
                    grace = query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
                    result = store.delete(
                        kind, scope, name, None if grace is None else int(grace), options
                    )
                    self._send_json(200, result)
                else:
                    raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

            def _send_json(self, code: int, body: Obj) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _watch(
                self, kind: Kind, ns: str | None, query: dict[str, str], matches: Matcher
            ) -> None:
                store = server.store
                timeout = float(query.get("timeoutSeconds") or 1800)
                deadline = time.monotonic() + timeout
                since = query.get("resourceVersion") or ""
                with store.lock:
                    if since in ("", "0"):
                        initial = store.list(kind, ns, matches)
                        position = int(initial["metadata"]["resourceVersion"])
                        pending = [("ADDED", obj) for obj in initial["items"]]
                    else:
                        position = int(since)
                        oldest = store.history[0].resource_version if store.history else 0
                        pending = []
                        if position < oldest - 1:
                            pending = [("ERROR", _gone(since))]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    while True:
                        for type_, obj in pending:
                            self._chunk(json.dumps({"type": type_, "object": obj}).encode() + b"\n")
                            if type_ == "ERROR":
                                raise _WatchEnded
                        pending = []
                        with store.lock:
                            while not store.closed:
                                fresh = [e for e in store.history if e.resource_version > position]
                                remaining = deadline - time.monotonic()
                                if fresh or remaining <= 0:
                                    break
                                store.lock.wait(min(remaining, 1.0))
                            if store.closed or (not fresh and deadline <= time.monotonic()):
                                raise _WatchEnded
                            for event in fresh:
                                position = event.resource_version
                                seen = _visible(event, kind, ns, matches)
                                if seen is not None:
                                    pending.append(seen)
                except _WatchEnded:
                    self._chunk(b"")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        return Handler


Matcher = Callable[[Obj], bool]


class _WatchEnded(Exception):
    pass


def _continue_token(revision: int, last_key: str) -> str:
    return base64.urlsafe_b64encode(
        json.dumps({"rv": revision, "start": last_key}).encode()
    ).decode()


def _parse_continue(token: str) -> tuple[int, str]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(decoded["rv"]), str(decoded["start"])
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "BadRequest", f"continue key is not valid: {token!r}") from None


def _gone(since: str) -> Obj:
    return ApiError(410, "Expired", f"too old resource version: {since}").status()


def _matcher(query: dict[str, str]) -> Matcher:
    by_field = field_selector(query.get("fieldSelector", ""))
    by_label = label_selector(query.get("labelSelector", ""))
    return lambda obj: by_field(obj) and by_label(obj)


def _visible(
    event: WatchEvent, kind: Kind, ns: str | None, matches: Matcher
) -> tuple[str, Obj] | None:
    """How a watcher with these filters sees a change, or None if it does not."""
    if event.kind is not kind or (ns is not None and event.namespace != ns):
        return None
    now_matches = matches(event.new)
    before = event.old is not None and matches(event.old)
    if event.type == "ADDED":
        return ("ADDED", copy.deepcopy(event.new)) if now_matches else None
    if event.type == "DELETED":
        return ("DELETED", copy.deepcopy(event.new)) if before else None
    if before and now_matches:
        return ("MODIFIED", copy.deepcopy(event.new))
    if now_matches:
        return ("ADDED", copy.deepcopy(event.new))
    if before:
        return ("DELETED", copy.deepcopy(event.new))
    return None
