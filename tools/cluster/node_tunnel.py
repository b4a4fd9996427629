"""The API server's way to the kubelet (logs, exec, port-forward) across the VM boundary.

The node's address (10.0.2.15) exists only inside QEMU's user network; the host reaches
the kubelet only through the VM's forward of a loopback port. kube-apiserver sends its
traffic to the cluster through an egress selector: here an HTTP CONNECT proxy on a unix
socket (what konnectivity does in production) that maps the node's kubelet address to
that forward and refuses every other destination.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import socketserver
import threading
from pathlib import Path

EGRESS_CONFIG = """\
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: {socket}
"""


class NodeTunnel(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, socket_path: Path, routes: dict[str, tuple[str, int]]) -> None:
        """``routes``: "host:port" the API server asks for -> the loopback address to dial."""
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        self.routes = routes
        super().__init__(str(socket_path), _ConnectHandler)
        os.chmod(socket_path, 0o600)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def start(self) -> NodeTunnel:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _ConnectHandler(socketserver.StreamRequestHandler):
    server: NodeTunnel

    def handle(self) -> None:
        request = self.rfile.readline(4096).decode("latin-1").split()
        while self.rfile.readline(4096) not in (b"\r\n", b"\n", b""):
            pass
        if len(request) != 3 or request[0] != "CONNECT":
            self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return
        target = self.server.routes.get(request[1])
        if target is None:
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            return
        try:
            upstream = socket.create_connection(target, timeout=10)
        except OSError:
            self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            return
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()
        upstream.settimeout(None)
        with upstream:
            _relay(self.connection, upstream)


def _relay(left: socket.socket, right: socket.socket) -> None:
    """Copy both ways until either side closes or resets (the end of an exec or a log
    stream, not an error)."""
    with selectors.DefaultSelector() as selector:
        selector.register(left, selectors.EVENT_READ, right)
        selector.register(right, selectors.EVENT_READ, left)
        while True:
            for key, _ in selector.select():
                source: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = source.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    return
