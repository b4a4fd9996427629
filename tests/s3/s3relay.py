"""An HTTP relay in front of radosgw that answers chosen S3 requests with an error itself.

A client pointed at the relay talks to the real radosgw behind it (requests are passed
on unchanged, so their signatures still hold), except for the requests a refusal
matches, which get the S3 error a throttled or failing store would send. So the
client's own retries meet real error responses over a real connection.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Headers about one hop, which the relay does not pass on (RFC 9110, 7.6.1).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "expect"}
)


@dataclass
class Refusal:
    """Answer ``status``/``code`` to ``times`` requests (None: every one) with this
    method whose query string names ``query`` (``delete`` is DeleteObjects,
    ``list-type`` ListObjectsV2)."""

    method: str
    query: str
    status: int
    code: str
    times: int | None = None
    answered: int = 0

    def matches(self, method: str, path: str) -> bool:
        if method != self.method or (self.times is not None and self.answered >= self.times):
            return False
        query = urllib.parse.urlsplit(path).query
        return self.query in urllib.parse.parse_qs(query, keep_blank_values=True)


@dataclass
class S3Relay:
    upstream: str
    refusals: list[Refusal] = field(default_factory=list)
    # (method, path, status) of every request, in the order they came.
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    endpoint: str = ""

    def refuse(self, refusal: Refusal) -> Refusal:
        self.refusals.append(refusal)
        return refusal

    def statuses(self, method: str, query: str) -> list[int]:
        return [
            status
            for seen, path, status in self.requests
            if seen == method
            and query
            in urllib.parse.parse_qs(urllib.parse.urlsplit(path).query, keep_blank_values=True)
        ]


def _handler(relay: S3Relay, lock: threading.Lock) -> type[http.server.BaseHTTPRequestHandler]:
    upstream = urllib.parse.urlsplit(relay.upstream)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with lock:
                refusal = next(
                    (r for r in relay.refusals if r.matches(self.command, self.path)), None
                )
                if refusal is not None:
                    refusal.answered += 1
            if refusal is not None:
                status, headers, payload = self._error(refusal)
            else:
                status, headers, payload = self._forward(body)
            with lock:
                relay.requests.append((self.command, self.path, status))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _error(self, refusal: Refusal) -> tuple[int, list[tuple[str, str]], bytes]:
            payload = (
                '<?xml version="1.0" encoding="UTF-8"?><Error>'
                f"<Code>{refusal.code}</Code><Message>refused by the test relay</Message>"
                "</Error>"
            ).encode()
            return refusal.status, [("Content-Type", "application/xml")], payload

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            try:
                headers = {
                    name: value
                    for name, value in self.headers.items()
                    if name.lower() not in HOP_BY_HOP
                }
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                kept = [
                    (name, value)
                    for name, value in response.getheaders()
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length"
                ]
                return response.status, kept, payload
            finally:
                connection.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    return Handler


@contextmanager
def s3_relay(upstream: str) -> Iterator[S3Relay]:
    """A relay to ``upstream`` (an http:// endpoint) on a free loopback port."""
    relay = S3Relay(upstream)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(relay, threading.Lock()))
    server.daemon_threads = True
    relay.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="s3-relay", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
