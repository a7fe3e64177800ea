"""The SAS a blob dataset is read with, and its renewal.

A :class:`SasManager` holds the current SAS (a :class:`~azfs.secret.Secret`)
and a *token source*: any callable, sync or async, that returns a fresh SAS
(a query string or a full SAS URL) -- the node's FUSE process passes
:func:`url_token_source` with the manager's renewal URL; ``azfs mount``
passes the SAS of its command line or one that re-reads ``--sas-file``.
Invariants:

* a new SAS replaces the current one only after a probe request with it
  succeeded, and the swap is a single assignment (readers see the old or the
  new token, never a mix); a failed probe keeps the old one;
* a failed renewal (source unreachable, refused, or a bad SAS) keeps the
  current SAS and is retried with back-off until one succeeds, also after
  the current SAS has expired;
* a refused request triggers at most one renewal at a time; if none helps,
  the caller gets :class:`~azfs.errors.AccessDenied` and one log line per
  minute says why (expired or refused); the daemon keeps running.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Hashable, Iterator
from pathlib import Path

import trio

from azfs.blob.url import normalize_sas
from azfs.errors import AccessDenied, AzfsError, TemporaryFailure, UserError
from azfs.retry import TRANSIENT_STATUS, RetryPolicy
from azfs.secret import Secret, redact

log = logging.getLogger(__name__)

TokenSource = Callable[[], "str | Secret | Awaitable[str | Secret]"]
Probe = Callable[[Secret], Awaitable[None]]


def sas_expiry(sas: Secret | str) -> dt.datetime | None:
    """The ``se=`` (signed expiry) of a SAS, or ``None`` if it has none."""
    text = sas.reveal() if isinstance(sas, Secret) else sas
    values = urllib.parse.parse_qs(text).get("se")
    if not values:
        return None
    try:
        when = dt.datetime.fromisoformat(values[0].replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def static_token_source(sas: Secret | str) -> TokenSource:
    """Always the same SAS (``azfs mount URL?SAS`` without ``--sas-file``)."""
    value = Secret(sas)
    return lambda: value


def file_token_source(path: Path) -> TokenSource:
    """Re-reads ``path`` on every renewal, so an admin can drop a fresh SAS there."""
    async def read() -> Secret:
        try:
            text = await trio.to_thread.run_sync(Path(path).read_text)
        except OSError as exc:
            raise AccessDenied(f"cannot read the SAS file {path}: {exc.strerror}") from exc
        return Secret(text.strip())
    return read


def url_token_source(url: str, *, timeout: float = 30.0,
                     headers: dict[str, str] | None = None) -> TokenSource:
    """GETs ``url`` (the manager's per-kernel SAS endpoint) for a fresh SAS.

    The answer is the SAS itself (query string or SAS URL) as text, or JSON
    with a ``sas`` or ``sas_url`` field.  A source that cannot be reached, times
    out or answers 5xx/429 is :class:`~azfs.errors.TemporaryFailure` (the
    renewer retries it); any other refusal is :class:`~azfs.errors.AccessDenied`.
    Messages never carry the URL: its query holds the kernel's key.
    """
    import httpx

    async def read() -> Secret:
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.get(url, headers=headers or {})
        except httpx.HTTPError as exc:
            raise TemporaryFailure(
                f"the SAS source did not answer ({type(exc).__name__})") from None
        if response.status_code in TRANSIENT_STATUS:
            raise TemporaryFailure(f"the SAS source answered {response.status_code}")
        if response.status_code != 200:
            raise AccessDenied(f"the SAS source answered {response.status_code}")
        text = response.text.strip()
        if "json" in response.headers.get("Content-Type", "") or text.startswith("{"):
            try:
                data = json.loads(text)
                text = str(data.get("sas") or data.get("sas_url") or "")
            except (ValueError, AttributeError):
                raise AccessDenied("the SAS source sent malformed JSON") from None
        return Secret(text.strip())
    return read


class TokenPool:
    """The token sources of every kernel reading one dataset through one backend.

    The node's FUSE process reads a dataset through one backend whatever the
    number of kernels (one listing cache, one page cache), but each kernel
    brings its own SAS and renewal URL, which ends with it.  The pool asks the
    most recently added source first (the kernel likely to live longest) and
    the others if it fails; a removed source is never asked again.
    """

    def __init__(self) -> None:
        self._sources: dict[Hashable, TokenSource] = {}

    def add(self, owner: Hashable, source: TokenSource) -> None:
        self._sources.pop(owner, None)
        self._sources[owner] = source

    def remove(self, owner: Hashable) -> None:
        self._sources.pop(owner, None)

    def __len__(self) -> int:
        return len(self._sources)

    async def __call__(self) -> str | Secret:
        first: AzfsError | None = None
        for source in reversed(list(self._sources.values())):
            try:
                return await fetch(source)
            except AzfsError as exc:
                first = first or exc
        raise first or AccessDenied("no kernel that reads this dataset is attached")


async def fetch(source: TokenSource) -> str | Secret:
    """What a token source gives, whether it is sync or async."""
    value = source()
    if inspect.isawaitable(value):
        value = await value
    return value


class SasManager:
    """The current SAS of one blob source, renewed before expiry and on refusal."""

    def __init__(self, initial: Secret | None, source: TokenSource | None, *, what: str,
                 renew_before: float = 300.0, retry_interval: float = 30.0) -> None:
        self._current = Secret(normalize_sas(initial)) if initial else None
        self._source = source
        self._what = what
        self._probe: Probe | None = None
        self._lock = trio.Lock()
        self._last_denied_log = -1e9
        self.renew_before = renew_before
        self.retry_interval = retry_interval
        #: a token source that takes longer than this counts as a failed renewal
        self.fetch_timeout = 60.0
        self.renewals = 0
        self.failed_renewals = 0

    def set_probe(self, probe: Probe) -> None:
        self._probe = probe

    @property
    def current(self) -> Secret:
        if self._current is None:
            raise AccessDenied(f"no SAS for {self._what}")
        return self._current

    @property
    def expiry(self) -> dt.datetime | None:
        return sas_expiry(self._current) if self._current else None

    def expired(self) -> bool:
        when = self.expiry
        return when is not None and when <= dt.datetime.now(dt.UTC)

    async def _fetch(self) -> Secret:
        if self._source is None:
            raise AccessDenied("no token source to renew the SAS from")
        value = await fetch(self._source)
        try:
            return Secret(normalize_sas(value))
        except UserError as exc:
            raise AccessDenied(f"the token source gave an unusable SAS: {exc}") from exc

    async def start(self) -> None:
        """Obtains the first SAS from the source if none was given."""
        if self._current is None:
            await self.renew("initial")
            if self._current is None:
                raise AccessDenied(f"no usable SAS for {self._what}")

    async def renew(self, reason: str) -> bool:
        """Fetches, probes and swaps in a new SAS; True if the SAS changed.

        Never raises for a failed renewal (it is counted and logged): the
        token source may be unreachable for a while, and the caller retries.
        """
        async with self._lock:
            old = self._current
            try:
                with trio.fail_after(self.fetch_timeout):
                    new = await self._fetch()
                    if new == old:
                        return False
                    if self._probe is not None:
                        await self._probe(new)
            except Exception as exc:  # noqa: BLE001 - any source failure keeps the old SAS
                self.failed_renewals += 1
                why = str(exc) if isinstance(exc, AzfsError) else \
                    f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("SAS renewal for %s (%s) failed, keeping the current SAS: %s",
                            self._what, reason, redact(why))
                return False
            self._current = new
            self.renewals += 1
            log.info("SAS for %s renewed (%s); new expiry %s", self._what, reason,
                     self.expiry.isoformat() if self.expiry else "none")
            return True

    async def refused(self, used: Secret) -> Secret:
        """Called when ``used`` was refused: a fresh SAS to retry with, or AccessDenied."""
        if self._current is not None and self._current != used:
            return self._current  # renewed meanwhile by another request
        if self._source is not None and await self.renew("request refused"):
            return self.current
        now = trio.current_time()
        if now - self._last_denied_log >= 60.0:
            self._last_denied_log = now
            if self.expired():
                log.error("the SAS for %s expired at %s and no fresh one could be obtained;"
                          " reads fail with EACCES until it is renewed", self._what,
                          self.expiry.isoformat() if self.expiry else "?")
            else:
                log.error("the SAS for %s was refused by the storage service (forged,"
                          " revoked, or lacking READ|LIST); reads fail with EACCES",
                          self._what)
        if self.expired():
            raise AccessDenied(f"the SAS for {self._what} has expired")
        raise AccessDenied(f"the storage service refused the SAS for {self._what}")

    def seconds_until_renewal(self) -> float:
        when = self.expiry
        if when is None:
            return 3600.0
        left = (when - dt.datetime.now(dt.UTC)).total_seconds() - self.renew_before
        return max(0.0, left)

    def _short_sas_pause(self) -> float:
        when = self.expiry
        left = (when - dt.datetime.now(dt.UTC)).total_seconds() if when else 0.0
        return min(self.retry_interval, max(1.0, left / 2))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background task: renews ahead of expiry for as long as the backend lives.

        A failed renewal is retried with jittered exponential back-off capped
        at ``retry_interval``, before expiry and after it: a manager that was
        down for an hour gives a working dataset again as soon as it answers.
        """
        task_status.started()
        delays: Iterator[float] | None = None
        while True:
            due = self.seconds_until_renewal()
            if due > 0:
                delays = None  # renewed (here or by a refused request): a fresh schedule
                await trio.sleep(due)
                continue
            if self._source is not None:
                reason = "expired" if self.expired() else "ahead of expiry"
                if await self.renew(reason):
                    if self.seconds_until_renewal() <= 0:
                        # a SAS that lives less than renew_before: do not spin on the source
                        await trio.sleep(self._short_sas_pause())
                    continue
            if delays is None:
                delays = RetryPolicy(base=1.0, cap=self.retry_interval).delays()
            await trio.sleep(next(delays))
