"""The blob data path: List Blobs, Get Blob Properties and range GETs over HTTP.

Chosen by measurement (see docs/PERFORMANCE.md): blocking ``http.client``
connections driven from worker threads, reading bodies with ``readinto``
into one preallocated buffer, beat both the Azure SDK's ``download_blob``
and httpx on the event loop by a wide margin for multi-MiB ranges.  Each
request runs in a thread limited by one daemon-wide
:class:`trio.CapacityLimiter`, every socket operation has a timeout, and
every call goes through :func:`azfs.retry.retry` (so a dead endpoint ends in
:class:`~azfs.errors.BackendUnavailable`, never a hang).

Status mapping: 403 → the SAS is renewed once, then
:class:`~azfs.errors.AccessDenied`; 404 → :class:`~azfs.errors.NotFound`;
412 (the ``If-Match`` ETag no longer matches) →
:class:`~azfs.errors.StaleObject`; 408/429/5xx → retried.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import functools
import http.client
import ssl
import sys
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import trio

from azfs.blob.sas import SasManager
from azfs.blob.url import BlobSource
from azfs.errors import AccessDenied, BackendUnavailable, NotFound, StaleObject, TemporaryFailure
from azfs.retry import TRANSIENT_STATUS, RetryPolicy, retry
from azfs.secret import Secret

API_VERSION = "2021-08-06"

#: Threads doing blob HTTP for the whole daemon (shared by all mounts).
HTTP_LIMITER = trio.CapacityLimiter(32)


@dataclass(slots=True)
class BlobProps:
    """What azfs needs of one blob (from a listing or a HEAD)."""

    name: str
    size: int
    etag: str
    mtime_ns: int
    content_type: str = ""
    is_folder: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Listing:
    """One level of a hierarchical listing: sub-prefixes and blobs."""

    prefixes: list[str]
    blobs: list[BlobProps]


class _Denied(Exception):
    """A 403 from the service; turned into a renewal or AccessDenied."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(slots=True)
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytearray


def _http_date_ns(value: str | None) -> int:
    if not value:
        return 0
    try:
        return int(email.utils.parsedate_to_datetime(value).timestamp() * 1e9)
    except (TypeError, ValueError):
        return 0


class BlobHttp:
    """HTTP access to one container, authorized by the SAS of a :class:`SasManager`."""

    def __init__(self, source: BlobSource, sas: SasManager, *,
                 policy: RetryPolicy | None = None, socket_timeout: float = 15.0,
                 limiter: trio.CapacityLimiter | None = None,
                 list_page_size: int = 5000) -> None:
        self.source = source
        self.sas = sas
        self.policy = policy or RetryPolicy()
        self.socket_timeout = socket_timeout
        self.limiter = limiter or HTTP_LIMITER
        self.list_page_size = list_page_size
        split = urllib.parse.urlsplit(source.account_url)
        self._https = split.scheme == "https"
        self._host = split.hostname or ""
        self._port = split.port
        self._base_path = split.path.rstrip("/") + "/" + urllib.parse.quote(source.container)
        self._pool: list[http.client.HTTPConnection] = []
        self._pool_lock = threading.Lock()
        self._ssl = ssl.create_default_context() if self._https else None
        self.requests = 0
        self.bytes_received = 0
        #: successful requests by kind (data GETs are what a warm cache must avoid)
        self.data_gets = 0
        self.heads = 0
        self.lists = 0

    # ---- connections (called in worker threads) ---------------------------
    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port,
                                               timeout=self.socket_timeout,
                                               context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.socket_timeout)

    def _request_sync(self, method: str, target: str, headers: dict[str, str]) -> _Response:
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        fresh = conn is None
        conn = conn or self._connect()
        try:
            try:
                conn.request(method, target, headers=headers)
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as exc:
                # permanent: refused at once with its reason, not retried as an outage
                raise BackendUnavailable(f"TLS to {self._host}: "
                                         f"{exc.verify_message or exc.reason}") from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if fresh:
                    raise
                # A pooled keep-alive connection the server closed meanwhile.
                conn.close()
                conn = self._connect()
                conn.request(method, target, headers=headers)
                resp = conn.getresponse()
            body = self._read_body(resp, method)
        except BaseException:
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        else:
            with self._pool_lock:
                self._pool.append(conn)
        return _Response(resp.status, resp.headers, body)

    @staticmethod
    def _read_body(resp: http.client.HTTPResponse, method: str) -> bytearray:
        if method == "HEAD":
            resp.read()
            return bytearray()
        length = resp.getheader("Content-Length")
        if length is None:
            return bytearray(resp.read())
        total = int(length)
        buf = bytearray(total)
        view = memoryview(buf)
        got = 0
        while got < total:
            n = resp.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(bytes(view[:got]), total - got)
            got += n
        return buf

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()

    # ---- one authorized, retried request ------------------------------------
    def _target(self, blob: str | None, query: dict[str, str], sas: Secret) -> str:
        path = self._base_path
        if blob is not None:
            path += "/" + urllib.parse.quote(blob, safe="/~")
        params = urllib.parse.urlencode(query)
        tail = "&".join(p for p in (params, sas.reveal()) if p)
        return f"{path}?{tail}"

    async def _call(self, method: str, blob: str | None, query: dict[str, str],
                    headers: dict[str, str], what: str, sas: Secret | None = None) -> _Response:
        """Sends one request with retries; with ``sas`` given, uses exactly that SAS."""
        headers = {"x-ms-version": API_VERSION, **headers}

        async def attempt(token: Secret) -> _Response:
            target = self._target(blob, query, token)
            resp = await trio.to_thread.run_sync(
                self._request_sync, method, target, headers,
                limiter=self.limiter, abandon_on_cancel=True)
            self.requests += 1
            self.bytes_received += len(resp.body)
            return self._check(resp, what)

        token = sas or self.sas.current
        for _ in range(2):
            try:
                return await retry(functools.partial(attempt, token), what, self.policy)
            except _Denied as exc:
                if sas is not None:
                    raise AccessDenied(f"{what}: the SAS was refused ({exc.code})") from None
                token = await self.sas.refused(token)
        raise AccessDenied(f"{what}: the storage service refused the renewed SAS")

    @staticmethod
    def _check(resp: _Response, what: str) -> _Response:
        status = resp.status
        if status < 300:
            return resp
        code = resp.headers.get("x-ms-error-code", "") or str(status)
        if status == 403:
            raise _Denied(code)
        if status == 404:
            raise NotFound(f"{what}: not found ({code})")
        if status == 412:
            raise StaleObject(f"{what}: the blob changed since it was opened")
        if status in TRANSIENT_STATUS:
            exc = TemporaryFailure(f"{what}: HTTP {status} {code}")
            exc.status_code = status  # type: ignore[attr-defined]
            raise exc
        raise BackendUnavailable(f"{what}: unexpected HTTP {status} {code}")

    # ---- the operations ---------------------------------------------------------
    async def list_level(self, prefix: str) -> Listing:
        """All blobs and sub-prefixes directly under ``prefix`` (follows markers)."""
        result = Listing([], [])
        marker = ""
        while True:
            query = {"restype": "container", "comp": "list", "delimiter": "/",
                     "include": "metadata", "maxresults": str(self.list_page_size)}
            if prefix:
                query["prefix"] = prefix
            if marker:
                query["marker"] = marker
            resp = await self._call("GET", None, query, {}, f"list {self.source.display}")
            self.lists += 1
            marker = _parse_listing(bytes(resp.body), result)
            if not marker:
                return result

    async def probe(self, sas: Secret) -> None:
        """Checks that ``sas`` can list the source (used before swapping a new SAS in)."""
        query = {"restype": "container", "comp": "list", "maxresults": "1"}
        if self.source.prefix:
            query["prefix"] = self.source.prefix
        await self._call("GET", None, query, {}, "SAS probe", sas=sas)

    async def properties(self, name: str) -> BlobProps:
        resp = await self._call("HEAD", name, {}, {}, f"properties of {name!r}")
        self.heads += 1
        h = resp.headers
        meta = {k[len("x-ms-meta-"):].lower(): v for k, v in h.items()
                if k.lower().startswith("x-ms-meta-")}
        return BlobProps(name=name, size=int(h.get("Content-Length", "0")),
                         etag=h.get("ETag", ""), mtime_ns=_http_date_ns(h.get("Last-Modified")),
                         content_type=h.get("Content-Type", ""),
                         is_folder=meta.get("hdi_isfolder", "").lower() == "true",
                         metadata=meta)

    async def read_range(self, name: str, start: int, length: int, etag: str) -> bytearray:
        """``length`` bytes from ``start`` of the blob version ``etag`` (StaleObject if gone)."""
        headers = {"x-ms-range": f"bytes={start}-{start + length - 1}"}
        if etag:
            headers["If-Match"] = etag
        try:
            resp = await self._call("GET", name, {}, headers, f"read {name!r}")
        except NotFound:
            if not etag:
                raise
            raise StaleObject(f"read {name!r}: the blob was deleted since it was opened") \
                from None
        self.data_gets += 1
        if resp.status == 200 and start == 0 and len(resp.body) > length:
            del resp.body[length:]
        got_etag = resp.headers.get("ETag")
        if etag and got_etag and got_etag != etag:
            raise StaleObject(f"read {name!r}: the blob changed since it was opened")
        if len(resp.body) != length:
            raise StaleObject(f"read {name!r}: got {len(resp.body)} bytes of {length};"
                              " the blob changed size")
        return resp.body


def _text(elem: ET.Element | None, tag: str) -> str:
    if elem is None:
        return ""
    child = elem.find(tag)
    return child.text or "" if child is not None else ""


def _name(elem: ET.Element) -> str:
    node = elem.find("Name")
    text = (node.text or "") if node is not None else ""
    if node is not None and node.get("Encoded") == "true":
        text = urllib.parse.unquote(text)
    return text


def _quoted(etag: str) -> str:
    """An ETag as HTTP headers carry it: a listing gives it without the quotes."""
    if not etag or etag.startswith(('"', 'W/"')):
        return etag
    return f'"{etag}"'


#: the metadata of every blob listed without any (shared: never changed)
_NO_METADATA: dict[str, str] = {}


def _parse_listing(body: bytes, into: Listing) -> str:
    """Adds one List Blobs page to ``into``; returns the next marker ('' at the end)."""
    root = ET.fromstring(body)
    blobs = root.find("Blobs")
    if blobs is not None:
        for elem in blobs:
            if elem.tag == "BlobPrefix":
                into.prefixes.append(_name(elem))
            elif elem.tag == "Blob":
                props = elem.find("Properties")
                meta_elem = elem.find("Metadata")
                meta = {c.tag.lower(): c.text or "" for c in meta_elem} \
                    if meta_elem is not None and len(meta_elem) else _NO_METADATA
                length = _text(props, "Content-Length")
                into.blobs.append(BlobProps(
                    name=_name(elem), size=int(length or 0),
                    etag=_quoted(_text(props, "Etag")),
                    mtime_ns=_http_date_ns(_text(props, "Last-Modified")),
                    content_type=sys.intern(_text(props, "Content-Type")),
                    is_folder=meta.get("hdi_isfolder", "").lower() == "true",
                    metadata=meta))
    return _text(root, "NextMarker")


def now_ns() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1e9)
