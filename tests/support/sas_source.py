"""A SAS source on loopback, as the manager's per-kernel renewal URL serves it.

It answers ``{"sas": ..., "expires_at": ...}`` with whatever SAS the test set,
can be taken down (the port then refuses connections) and brought back on
the same port, so a test sees the renewer through a real outage.
"""

from __future__ import annotations

import http.server
import json
import threading


class SasSource:
    """``GET /sas`` → the current SAS as JSON; :meth:`stop`/:meth:`start` an outage."""

    def __init__(self, sas: str) -> None:
        self.sas = sas
        self.requests = 0
        self.port = 0
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sas?key=kernel-key"

    def start(self) -> SasSource:
        source = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                source.requests += 1
                body = json.dumps({"sas": source.sas, "expires_at": None}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
