"""Domain errors raised by azfs backends and services.

Backends raise these (or plain ``OSError`` for failures of local system calls,
which already carry an errno).  They are turned into an errno only at the FUSE
edge (:func:`azfs.fs.errno_map.to_errno`) and into HTTP codes only in the APIs,
so the library never has to know which edge it is serving.
"""

from __future__ import annotations


class AzfsError(Exception):
    """Base of all azfs domain errors; ``str()`` is safe to show to a user."""


class UserError(AzfsError):
    """A request that cannot be done as asked; the CLI prints it and exits 1."""

    exit_code = 1


class NotFound(AzfsError):
    """The named object does not exist."""


class AlreadyExists(AzfsError):
    """An object of that name exists already."""


class ReadOnly(AzfsError):
    """A modification of something that is read-only (a ro view, a dataset)."""


class QuotaExceeded(AzfsError):
    """The operation would take a vfolder beyond its byte or file quota."""


class AccessDenied(AzfsError):
    """The remote store refused the credentials (e.g. an expired or forged SAS)."""


class StaleObject(AzfsError):
    """The object changed under an open handle (e.g. a blob replaced mid-read)."""


class NotSupported(AzfsError):
    """The backend cannot do this operation at all."""


class InvalidArgument(AzfsError):
    """A malformed argument (a name with '/', a negative offset, ...)."""


class TemporaryFailure(AzfsError):
    """A remote call failed in a way that may succeed if retried."""


class BackendUnavailable(AzfsError):
    """The store could not be reached within the deadline (retries exhausted)."""


class VolumeTimeout(BackendUnavailable):
    """A call on a host volume did not return within its deadline (``ETIMEDOUT``)."""


class VolumeDegraded(BackendUnavailable):
    """A degraded host volume: calls are refused at once until a probe succeeds (``EIO``)."""
