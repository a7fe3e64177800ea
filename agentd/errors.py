"""The agent API's errors: a stable ``code``, an HTTP status and a message safe to show."""

from __future__ import annotations

from azfs.api_errors import ApiError, Conflict, Unavailable
from azfs.api_errors import NotFound as NotFoundError

__all__ = ["ApiError", "BadRequest", "Conflict", "NotFoundError", "Unavailable", "CODES"]


class BadRequest(ApiError):
    status, code = 400, "invalid-request"


#: every code the API answers with, for the docs and the OpenAPI description
CODES = {
    "invalid-request": "the body or a parameter is malformed (400)",
    "invalid-kernel-id": "the kernel id is not 1-128 of [A-Za-z0-9_.-] (400)",
    "unknown-volume": "a vfolder names a host volume the volume config does not have (400)",
    "path-outside-volume": "a vfolder path leaves its volume (.., a symlink) (400)",
    "vfolder-not-found": "a vfolder directory does not exist in its volume (404)",
    "kernel-not-found": "no export for this kernel (404)",
    "kernel-conflict": "the kernel is exported with a different request (409)",
    "alias-in-use": "the kernel already has a vfolder with this alias or container path (409)",
    "alias-not-found": "the kernel has no vfolder with this alias (404)",
    "not-attachable": "only container paths under /home/work reach a running kernel (400)",
    "kernel-home-failed": "the kernel's home or a bind in it could not be mounted (500)",
    "body-too-large": "the request body exceeds the agent's limit (413)",
    "unauthorized": "missing or wrong bearer token on the TCP listener (401)",
    "volume-mount-failed": "a host volume could not be mounted (503)",
    "dataset-unavailable": "a blob dataset could not be opened (SAS refused, unreachable) (502)",
    "fusehost-unavailable": "the FUSE process does not answer (503)",
    "internal-error": "a bug; the agent log has the details (500)",
}
