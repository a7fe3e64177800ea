"""A loopback TCP port that forwards every connection to a unix socket, byte for byte.

For tools that speak HTTP only over TCP (the schemathesis CLI) against an
API served on a unix socket: each accepted connection gets a connection of
its own to the socket and two pump threads; nothing is parsed or changed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _serve(listener: socket.socket, target: Path, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except OSError:
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(str(target))
        except OSError:
            client.close()
            upstream.close()
            continue

        def run(a: socket.socket = client, b: socket.socket = upstream) -> None:
            other = threading.Thread(target=_pump, args=(b, a), daemon=True)
            other.start()
            _pump(a, b)
            other.join()
            a.close()
            b.close()

        threading.Thread(target=run, daemon=True).start()


@contextlib.contextmanager
def tcp_to_unix(target: Path) -> Iterator[int]:
    """Forwards a free port of 127.0.0.1 to the unix socket ``target``; yields the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(listener, target, stop), daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
