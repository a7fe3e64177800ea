"""Errors of the HTTP APIs (manager REST, agent control socket).

Services raise :class:`ApiError` (or a subclass); each app turns it into
``{"error": {"code": ..., "message": ...}}`` with the error's HTTP status.
Codes are part of an API and never change meaning; messages are for humans
and never contain secrets.  Each daemon lists its codes in its own module.
"""

from __future__ import annotations


class ApiError(Exception):
    status = 400
    code = "bad-request"

    def __init__(self, message: str, *, code: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class NotFound(ApiError):
    status, code = 404, "not-found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class Unavailable(ApiError):
    status, code = 503, "unavailable"
