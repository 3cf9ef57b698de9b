"""The agent's small HTTP endpoints (metrics, the push webhook): a stdlib server on a daemon
thread, started and stopped with the agent's other sidecars.

One place for what both need: the address family chosen from the host (`::1`, `[::]` and
other IPv6 literals need AF_INET6), the bound address read back (port 0 picks a free one),
and a stop that ends the serving thread and closes the socket.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer


class BackgroundServer:
    """`handler` served on (host, port) from a daemon thread named `name`.

    `threaded`: a thread per request (metrics scrapes are cheap and read-only); otherwise one
    request at a time, so a flood of connections costs one thread.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: type[BaseHTTPRequestHandler],
        *,
        name: str,
        threaded: bool = False,
    ) -> None:
        base: type[HTTPServer] = ThreadingHTTPServer if threaded else HTTPServer
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type(f"{name.title()}Server", (base,), {"address_family": family})
        self._server: HTTPServer = server_class((host, port), handler)
        if isinstance(self._server, ThreadingHTTPServer):
            self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
