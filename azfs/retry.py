"""The one retry helper for every remote call azfs makes.

A call is retried only when :func:`is_transient` says its failure may go away
(connection reset, timeout, HTTP 5xx, throttling 429/503), with exponential
backoff and full jitter, and never past a deadline: when the deadline comes
the last failure is re-raised as :class:`~azfs.errors.BackendUnavailable`.
Every attempt runs under its own timeout, so a dead endpoint can never hang
the caller.  Permanent failures (403, 404, 412...) are raised at once.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import trio

from azfs.errors import BackendUnavailable, TemporaryFailure

log = logging.getLogger(__name__)
T = TypeVar("T")

#: HTTP statuses worth retrying: timeouts, throttling, server errors.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: The Azure SDK's connection-level failures (matched by name: no SDK import here).
_SDK_TRANSIENT = frozenset({"ServiceRequestError", "ServiceResponseError",
                            "IncompleteReadError"})


def is_transient(exc: BaseException) -> bool:
    """True for failures that may succeed when the same call is repeated."""
    if isinstance(exc, TemporaryFailure | trio.TooSlowError | socket.timeout | TimeoutError):
        return True
    if isinstance(exc, ConnectionError | trio.BrokenResourceError):
        return True
    if any(cls.__name__ in _SDK_TRANSIENT for cls in type(exc).__mro__):
        return True
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    if isinstance(status, int) and status in TRANSIENT_STATUS:
        return True
    # http.client's protocol errors (RemoteDisconnected is a ConnectionError) and
    # plain OSErrors of sockets (EHOSTUNREACH, ENETUNREACH...) are transient.
    import http.client
    return isinstance(exc, http.client.HTTPException | OSError) and not isinstance(
        exc, FileNotFoundError | PermissionError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff schedule: ``base * 2**n`` capped at ``cap``, fully jittered."""

    deadline: float = 30.0
    attempt_timeout: float = 20.0
    base: float = 0.1
    cap: float = 2.0

    def delays(self) -> Iterator[float]:
        n = 0
        while True:
            yield random.uniform(0, min(self.cap, self.base * 2 ** n))
            n += 1


DEFAULT_POLICY = RetryPolicy()


async def retry(call: Callable[[], Awaitable[T]], what: str,
                policy: RetryPolicy = DEFAULT_POLICY) -> T:
    """Awaits ``call()`` until it succeeds, fails permanently, or the deadline passes."""
    deadline = trio.current_time() + policy.deadline
    delays = policy.delays()
    while True:
        remaining = deadline - trio.current_time()
        try:
            with trio.fail_after(max(0.001, min(policy.attempt_timeout, remaining))):
                return await call()
        except BaseException as exc:
            if not isinstance(exc, Exception) or not is_transient(exc):
                raise
            delay = next(delays)
            if trio.current_time() + delay >= deadline:
                log.warning("%s: giving up after %.0fs: %s", what, policy.deadline,
                            _describe(exc))
                raise BackendUnavailable(f"{what}: storage unreachable ({_describe(exc)})") \
                    from exc
            log.info("%s: transient failure, retrying in %.2fs: %s", what, delay,
                     _describe(exc))
            await trio.sleep(delay)


def retry_sync(call: Callable[[], T], what: str, policy: RetryPolicy = DEFAULT_POLICY) -> T:
    """:func:`retry` for blocking code (CLI tools); attempts must set their own timeouts."""
    deadline = time.monotonic() + policy.deadline
    delays = policy.delays()
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = next(delays)
            if time.monotonic() + delay >= deadline:
                raise BackendUnavailable(f"{what}: storage unreachable ({_describe(exc)})") \
                    from exc
            time.sleep(delay)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
