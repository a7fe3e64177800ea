"""Small blob requests on the event loop: HTTP/1.1 (h11) over trio streams.

The many-small-files path (a training loop opening hundreds of thousands of
112 KiB images) is bound by the daemon's CPU, and a request handed to a
worker thread costs more than its bytes: the hop to the thread and back,
and the GIL passed between that thread and the FUSE loop on every blocking
socket call.  Measured on 2 vCPUs, 8 concurrent GETs of 112 KiB: 430-550 µs
of daemon CPU per GET here against 760-815 µs through ``http.client`` in
threads (``bench/blob_small_files.py`` shows what it does to files/s).
Large ranges stay on threads, where the copy of megabytes out of the socket
runs beside the loop instead of in it.

:class:`LoopPool` keeps idle keep-alive connections per endpoint; a request
on a pooled connection that the server closed meanwhile is sent again once
on a fresh one (as ``http.client``'s path does).  Every socket operation has
a timeout; failures are the exceptions :func:`azfs.retry.is_transient`
retries (``ConnectionError``, ``TimeoutError``, ``trio.BrokenResourceError``).
"""

from __future__ import annotations

import contextlib
import http.client
import ssl

import h11
import trio

from azfs.errors import BackendUnavailable

_RECEIVE = 256 * 1024


def untrusted(host: str, exc: ssl.SSLCertVerificationError) -> BackendUnavailable:
    """A certificate that does not verify: permanent, so not retried."""
    return BackendUnavailable(f"TLS to {host}: {exc.verify_message or exc.reason}")


class _Conn:
    __slots__ = ("stream", "h11")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)


class _Stale(Exception):
    """A pooled connection the server had closed: nothing of the answer arrived."""


class LoopPool:
    """Keep-alive HTTP/1.1 connections to one host, used from the event loop."""

    def __init__(self, host: str, port: int | None, ssl_context: ssl.SSLContext | None,
                 timeout: float) -> None:
        self.host = host
        self.port = port or (443 if ssl_context is not None else 80)
        self.ssl_context = ssl_context
        self.timeout = timeout
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        with trio.fail_after(self.timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
            if self.ssl_context is not None:
                stream = trio.SSLStream(stream, self.ssl_context, server_hostname=self.host,
                                        https_compatible=True)
                try:
                    await stream.do_handshake()
                except BaseException as exc:
                    await trio.aclose_forcefully(stream)
                    if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                        raise untrusted(self.host, exc.__cause__) from None
                    raise
        return _Conn(stream)

    async def request(self, method: str, target: str, headers: dict[str, str]
                      ) -> tuple[int, http.client.HTTPMessage, bytearray]:
        """Status, headers and body of one request (the body read whole)."""
        pooled = self._idle.pop() if self._idle else None
        if pooled is not None:
            try:
                return await self._exchange(pooled, method, target, headers, pooled=True)
            except _Stale:
                pass
        return await self._exchange(await self._connect(), method, target, headers,
                                    pooled=False)

    async def _exchange(self, conn: _Conn, method: str, target: str, headers: dict[str, str],
                        pooled: bool) -> tuple[int, http.client.HTTPMessage, bytearray]:
        try:
            out = conn.h11.send(h11.Request(method=method, target=target,
                                            headers=[("Host", self.host), *headers.items()]))
            out += conn.h11.send(h11.EndOfMessage())
            with trio.fail_after(self.timeout):
                try:
                    await conn.stream.send_all(out)
                except trio.BrokenResourceError:
                    if pooled:
                        raise _Stale from None
                    raise
            answer = await self._receive(conn, method, pooled)
        except BaseException as exc:
            await trio.aclose_forcefully(conn.stream)
            if isinstance(exc, h11.ProtocolError):
                raise ConnectionError(f"HTTP protocol error: {exc}") from None
            if isinstance(exc, trio.TooSlowError):
                raise TimeoutError("the storage service did not answer in time") from None
            raise
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
        else:
            await trio.aclose_forcefully(conn.stream)
        return answer

    async def _receive(self, conn: _Conn, method: str, pooled: bool
                       ) -> tuple[int, http.client.HTTPMessage, bytearray]:
        status = 0
        message = http.client.HTTPMessage()
        body = bytearray()
        got = 0
        started = False
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(self.timeout):
                    try:
                        data = await conn.stream.receive_some(_RECEIVE)
                    except trio.BrokenResourceError:
                        if pooled and not started:
                            raise _Stale from None
                        raise
                if not data and pooled and not started:
                    raise _Stale
                started = started or bool(data)
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    message[name.decode("latin-1")] = value.decode("latin-1")
                length = message.get("Content-Length")
                if method != "HEAD" and length is not None and length.isdigit():
                    body = bytearray(int(length))
            elif isinstance(event, h11.Data):
                n = len(event.data)
                if got + n <= len(body):
                    body[got:got + n] = event.data
                else:
                    body[got:] = event.data
                got += n
            elif isinstance(event, h11.EndOfMessage):
                if got < len(body):
                    raise ConnectionError(f"the answer ended after {got} of {len(body)} bytes")
                return status, message, body
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the storage service closed the connection")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await trio.aclose_forcefully(conn.stream)
