"""API errors: every failure a client can see has an HTTP status and a stable code.

Services raise :class:`ApiError` (or a subclass); the app turns it into
``{"error": {"code": ..., "message": ...}}``.  Codes are part of the API and
never change meaning; messages are for humans and never contain secrets.
"""

from __future__ import annotations

from azfs.api_errors import ApiError, Conflict, NotFound, Unavailable

__all__ = ["ApiError", "Conflict", "NotFound", "Unavailable", "InvalidArgument",
           "Unauthenticated", "Forbidden", "AgentError", "CODES"]


class InvalidArgument(ApiError):
    status, code = 422, "invalid-argument"


class Unauthenticated(ApiError):
    status, code = 401, "unauthenticated"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class AgentError(ApiError):
    status, code = 502, "agent-error"


#: Every code the API can answer with, for the docs and the tests.
CODES = {
    "invalid-argument": "a field or path parameter is malformed (422)",
    "unauthenticated": "no or unknown bearer token (401)",
    "forbidden": "the caller may see the object but not do this (403)",
    "not-found": "no such route (404)",
    "vfolder-not-found": "no vfolder of that id/alias visible to the caller (404)",
    "user-not-found": "no such user (404)",
    "dataset-not-found": "no dataset of that name readable by the caller (404)",
    "kernel-not-found": "no kernel of that id visible to the caller (404)",
    "agent-not-found": "the target agent is not registered (404)",
    "volume-not-found": "no `requested` host volume of that name (404)",
    "vfolder-exists": "the owner already has a vfolder of that alias (409)",
    "vfolder-ambiguous": "an alias matches several vfolders; use the id (409)",
    "vfolder-in-use": "a live kernel exports the vfolder (409)",
    "vfolder-bad-state": "the vfolder's lifecycle state does not allow this (409)",
    "user-exists": "a user of that name exists (409)",
    "dataset-exists": "a dataset of that name exists (409)",
    "dataset-in-use": "a running kernel reads the dataset (409)",
    "conflict": "a concurrent request changed the same record; retry (409)",
    "kernel-exists": "a kernel of that id exists with a different request (409)",
    "reserved-name": "the alias would shadow a file of the container's home (422)",
    "no-volume": "no `requested` host volume is configured or reachable (503)",
    "volume-unavailable": "the host volume did not answer in time or failed (503)",
    "usage-unavailable": "the vfolder's usage cannot be known right now (503)",
    "sas-unavailable": "no key is configured for the dataset's storage account (503)",
    "agent-unreachable": "the agent did not answer (502)",
    "agent-down": "the agent was seen before but is no longer registered (503)",
    "agent-error": "the agent refused or failed the export (502)",
    "internal-error": "a bug; the manager's log has the details (500)",
}
