"""HTTP endpoint for Prometheus metrics and the liveness/readiness probe."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from zerofs_csi.observability.readiness import Readiness, State

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host.strip("[]") or "0.0.0.0"), int(port)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return  # scrapes every few seconds would drown the log


class MetricsServer:
    """Serves /metrics and /healthz (200 only when ready).

    /metrics is prometheus_client's own WSGI app: the exposition format the scraper asks
    for in ``Accept`` (OpenMetrics or the Prometheus text format), gzip when accepted.
    """

    def __init__(
        self, address: str, readiness: Readiness, registry: CollectorRegistry = REGISTRY
    ) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics_app(environ, start_response)
            if path == "/healthz":
                state = readiness.state
                if state is State.READY:
                    status, body = "200 OK", b"ok\n"
                else:
                    status = "503 Service Unavailable"
                    body = f"{readiness.problem or state.value}\n".encode()
            else:
                status, body = "404 Not Found", b"not found\n"
            start_response(
                status,
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
            )
            return [body]

        host, port = split_host_port(address)
        self._httpd = make_server(
            host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
