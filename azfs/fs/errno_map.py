"""The one place where errors become errnos: the FUSE edge.

:func:`fuse_op` wraps every Operations handler, so that a handler raises
nothing but ``FUSEError``: pyfuse3 ends its main loop on any other exception.
Unexpected exceptions are logged with their traceback and answered ``EIO``.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from azfs import errors
from azfs.fs.stats import OpStats

log = logging.getLogger("azfs.fs")

_ERRNO: dict[type[errors.AzfsError], int] = {
    errors.NotFound: errno.ENOENT,
    errors.AlreadyExists: errno.EEXIST,
    errors.ReadOnly: errno.EROFS,
    errors.QuotaExceeded: errno.EDQUOT,
    errors.AccessDenied: errno.EACCES,
    errors.StaleObject: errno.ESTALE,
    errors.NotSupported: errno.EOPNOTSUPP,
    errors.InvalidArgument: errno.EINVAL,
    errors.TemporaryFailure: errno.EAGAIN,
    errors.VolumeTimeout: errno.ETIMEDOUT,
    errors.VolumeDegraded: errno.EIO,
    errors.BackendUnavailable: errno.EIO,
}


def to_errno(exc: BaseException) -> int:
    """The errno for an exception raised below the FUSE layer."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    for cls in type(exc).__mro__:
        if cls in _ERRNO:
            return _ERRNO[cls]
    return errno.EIO


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_EXPECTED = (OSError, errors.AzfsError)


def fuse_op(stats: OpStats) -> Callable[[F], F]:
    """Decorator for a handler: counts it, times it, converts its errors."""

    def wrap(fn: F) -> F:
        name = fn.__name__

        @functools.wraps(fn)
        async def handler(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            except pyfuse3.FUSEError as exc:
                stats.error(name, exc.errno)
                raise
            except _EXPECTED as exc:
                code = to_errno(exc)
                stats.error(name, code)
                if code in (errno.EIO, errno.EACCES, errno.ESTALE, errno.ETIMEDOUT) \
                        and not isinstance(exc, errors.VolumeDegraded):
                    # (refusals of a degraded volume: its transition was logged once)
                    log.warning("%s: %s", name, exc)
                raise pyfuse3.FUSEError(code) from None
            except Exception:
                stats.error(name, errno.EIO)
                log.exception("%s: unexpected error, answered EIO", name)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                stats.observe(name, time.perf_counter() - start)

        return handler  # type: ignore[return-value]

    return wrap
