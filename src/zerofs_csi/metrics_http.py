"""HTTP endpoint for Prometheus metrics and the liveness/readiness probe."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from zerofs_csi.readiness import Readiness, State


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host.strip("[]") or "0.0.0.0"), int(port)


class MetricsServer:
    """Serves /metrics (Prometheus text format) and /healthz (200 only when ready)."""

    def __init__(
        self, address: str, readiness: Readiness, registry: CollectorRegistry = REGISTRY
    ) -> None:
        readiness_ref, registry_ref = readiness, registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?", 1)[0] == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry_ref))
                elif self.path == "/healthz":
                    state = readiness_ref.state
                    if state is State.READY:
                        self._send(200, "text/plain", b"ok\n")
                    else:
                        detail = readiness_ref.problem or state.value
                        self._send(503, "text/plain", f"{detail}\n".encode())
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # scrapes every few seconds would drown the log

        self._httpd = ThreadingHTTPServer(split_host_port(address), Handler)
        self._httpd.daemon_threads = True
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
