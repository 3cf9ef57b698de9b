"""A tiny TCP/UDP echo server, run inside a lab service namespace.

    python -m asgctl_lab.echo --tcp 0.0.0.0:80 --tcp [::]:80 --udp 0.0.0.0:53

Standard library only, so the lab needs no extra tools on the host.  It prints ``ready`` on
stdout once every socket is bound, so the lab can start many services in parallel and wait for
exactly the moment they can be probed.  It exits when its stdin reaches end-of-file: the lab
holds the other end of that pipe, so when the lab's process dies, even by SIGKILL, the servers
die with it and leave no process behind to keep a namespace alive.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import sys
import threading


def parse_endpoint(text: str) -> tuple[int, str, int]:
    """`host:port` or `[v6]:port` -> (family, host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def _bind(kind: int, endpoint: str) -> socket.socket:
    family, host, port = parse_endpoint(endpoint)
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # Separate v4 and v6 sockets: a dual-stack socket would answer v4 on a v6-only spec.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def _echo_stream(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def serve(tcp: list[str], udp: list[str]) -> None:
    """Bind everything, say ready, echo until stdin closes."""
    sel = selectors.DefaultSelector()
    for endpoint in tcp:
        sel.register(_bind(socket.SOCK_STREAM, endpoint), selectors.EVENT_READ, "tcp")
    for endpoint in udp:
        sel.register(_bind(socket.SOCK_DGRAM, endpoint), selectors.EVENT_READ, "udp")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                # stdin's buffer is a BufferedReader; typeshed calls it a BinaryIO, without read1.
                if not sys.stdin.buffer.read1(4096):  # type: ignore[union-attr]
                    return
            elif key.data == "tcp":
                conn, _ = key.fileobj.accept()  # type: ignore[union-attr]  # our listening socket
                threading.Thread(target=_echo_stream, args=(conn,), daemon=True).start()
            else:
                sock: socket.socket = key.fileobj  # type: ignore[assignment]  # registered socket
                try:
                    data, peer = sock.recvfrom(65536)
                    sock.sendto(data, peer)
                except OSError:
                    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--udp", action="append", default=[], metavar="HOST:PORT")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.tcp, args.udp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
