"""The control API: FastAPI over hypercorn's trio worker, on the agent's unix socket.

Routes (OpenAPI at ``/openapi.json``)::

    PUT    /v1/kernels/{kernel_id}   export (body: azfs.export.ExportRequest)
    DELETE /v1/kernels/{kernel_id}   unexport (204, also when already gone)
    GET    /v1/kernels               recorded exports
    GET    /v1/kernels/{kernel_id}   one export (404 kernel-not-found)
    PUT    /v1/kernels/{kernel_id}/vfolders/{alias}   attach a vfolder to a running kernel
    DELETE /v1/kernels/{kernel_id}/vfolders/{alias}   detach it (204, also when already gone)
    POST   /v1/fuse/restart          replace the fusehost, re-bind every kernel (upgrade)
    POST   /v1/kernels/{kernel_id}/refresh   its blob datasets list their containers again
    GET    /v1/volumes               host volumes, mounted or not, with refcounts
    GET    /v1/health                200 when everything works, 503 when degraded
    GET    /metrics                  Prometheus text format

Every error is ``{"error": {"code": CODE, "message": TEXT}}`` with a code of
:data:`agentd.errors.CODES`; no traceback and no secret reaches a client.
Bodies over ``max_body_bytes`` get 413 before they are read.  Answers never
echo a request body: it may hold a dataset SAS.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentd.agent import Agent
from agentd.errors import CODES, ApiError, BadRequest, NotFoundError, Unavailable
from agentd.fuseclient import FuseHostError, FuseHostUnavailable
from agentd.metrics import render_metrics
from azfs.export import (
    ExportRequest,
    ExportResponse,
    OciMount,
    VfolderExport,
    validate_component,
    validate_kernel_id,
)
from azfs.secret import Secret, redact

log = logging.getLogger("agentd.api")


class KernelInfo(BaseModel):
    kernel_id: str
    created: float
    vfolders: list[dict[str, Any]]
    mounts: list[OciMount]


class KernelList(BaseModel):
    kernels: list[KernelInfo]


class VolumeInfo(BaseModel):
    name: str
    fstype: str | None
    at: str | None
    mounted: bool
    path: str | None
    refcount: int
    error: str | None = None


class VolumeList(BaseModel):
    volumes: list[VolumeInfo]


class FuseRestart(BaseModel):
    reason: str
    at: float
    window: float
    views: int
    rebound: int
    failed: int
    old_pid: int | None
    pid: int | None
    restarts: int


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": redact(message)}},
                        status_code=status)


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 409, 413, 500, 502, 503)}


def create_app(agent: Agent) -> FastAPI:
    app = FastAPI(
        title="azfs agent", version="1",
        description="Node agent control API. Error codes: " +
                    "; ".join(f"`{k}`: {v}" for k, v in CODES.items()))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{where}: {msg}" if where else msg)
        return error_response(400, "invalid-request", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(FuseHostUnavailable)
    async def _fusehost(request: Request, exc: FuseHostUnavailable) -> JSONResponse:
        return error_response(503, "fusehost-unavailable", str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal-error", "internal error; see the agent log")

    def kernel_id_ok(kernel_id: str) -> str:
        try:
            return validate_kernel_id(kernel_id)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid-kernel-id") from None

    @app.put("/v1/kernels/{kernel_id}", response_model=ExportResponse, responses=_ERRORS,
             summary="Export vfolders to a kernel (idempotent for the same body)")
    async def put_kernel(kernel_id: str, body: ExportRequest) -> ExportResponse:
        return await agent.service.export(kernel_id_ok(kernel_id), body)

    @app.delete("/v1/kernels/{kernel_id}", status_code=204, responses=_ERRORS,
                summary="Remove a kernel's exports (idempotent)")
    async def delete_kernel(kernel_id: str) -> Response:
        await agent.service.unexport(kernel_id_ok(kernel_id))
        return Response(status_code=204)

    def alias_ok(alias: str) -> str:
        try:
            return validate_component(alias, "alias")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    @app.put("/v1/kernels/{kernel_id}/vfolders/{alias}", response_model=ExportResponse,
             responses=_ERRORS, summary="Attach a vfolder to a running kernel (idempotent)")
    async def attach_vfolder(kernel_id: str, alias: str, body: VfolderExport
                             ) -> ExportResponse:
        if alias_ok(alias) != body.alias:
            raise BadRequest(f"the body's alias {body.alias!r} is not the path's {alias!r}")
        return await agent.service.attach_vfolder(kernel_id_ok(kernel_id), body)

    @app.delete("/v1/kernels/{kernel_id}/vfolders/{alias}", status_code=204,
                responses=_ERRORS, summary="Detach a vfolder from a running kernel")
    async def detach_vfolder(kernel_id: str, alias: str) -> Response:
        await agent.service.detach_vfolder(kernel_id_ok(kernel_id), alias_ok(alias))
        return Response(status_code=204)

    @app.post("/v1/fuse/restart", response_model=FuseRestart, responses=_ERRORS,
              summary="Replace the FUSE process and re-bind every kernel's vfolders")
    async def restart_fuse() -> FuseRestart:
        try:
            return FuseRestart(**await agent.restart_fusehost())
        except RuntimeError as exc:  # the new fusehost did not start: see its log
            raise Unavailable(str(exc), code="fusehost-unavailable") from None

    @app.get("/v1/kernels", response_model=KernelList)
    async def list_kernels() -> KernelList:
        return KernelList(kernels=[_info(k, r) for k, r in sorted(agent.journal.kernels.items())])

    @app.get("/v1/kernels/{kernel_id}", response_model=KernelInfo, responses=_ERRORS)
    async def get_kernel(kernel_id: str) -> KernelInfo:
        record = agent.journal.kernels.get(kernel_id_ok(kernel_id))
        if record is None:
            raise NotFoundError(f"kernel {kernel_id} has no export", code="kernel-not-found")
        return _info(kernel_id, record)

    @app.post("/v1/kernels/{kernel_id}/refresh", responses=_ERRORS,
              summary="Make the kernel's blob datasets list their containers again now")
    async def refresh_kernel(kernel_id: str) -> dict[str, Any]:
        record = agent.journal.kernels.get(kernel_id_ok(kernel_id))
        if record is None:
            raise NotFoundError(f"kernel {kernel_id} has no export", code="kernel-not-found")
        refreshed = []
        for view in record["views"]:
            if view["backend"].get("kind") != "blob":
                continue
            try:
                await agent.client.refresh(view["path"])
            except FuseHostError as exc:  # detached meanwhile: nothing cached to forget
                log.info("refresh of %s: %s", "/".join(view["path"]), exc)
                continue
            refreshed.append(view["path"][-1])
        return {"kernel_id": kernel_id, "refreshed": refreshed}

    @app.get("/v1/volumes", response_model=VolumeList)
    async def list_volumes() -> VolumeList:
        return VolumeList(volumes=[VolumeInfo(**v) for v in await agent.service.volume_status()])

    @app.get("/v1/health", responses={503: {"description": "degraded"}})
    async def health() -> JSONResponse:
        body = await agent.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        try:
            stats = await agent.client.stats()
        except (FuseHostUnavailable, FuseHostError):
            stats = None
        text, content_type = render_metrics(agent, stats)
        return Response(content=text, media_type=content_type)

    return app


def _info(kernel_id: str, record: dict[str, Any]) -> KernelInfo:
    request = record["request"]
    vfolders = [{"alias": v["alias"], "kind": v.get("kind", "posix"), "mode": v.get("mode"),
                 "volume": v.get("volume"), "path": v.get("path"),
                 "vfolder_id": v.get("vfolder_id")} for v in request.get("vfolders", [])]
    return KernelInfo(kernel_id=kernel_id, created=record.get("created", 0.0),
                      vfolders=vfolders, mounts=record["response"]["mounts"])


# ---- ASGI middleware ---------------------------------------------------------------------
class _TooLarge(ApiError):
    status, code = 413, "body-too-large"


class BodyLimit:
    """Answers 413 to bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    await _send_error(send, 413, "body-too-large",
                                      f"request body over {self.limit} bytes")
                    return
        seen = 0
        exceeded = False
        replaced = False

        async def limited_receive() -> dict:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise _TooLarge(f"request body over {self.limit} bytes")
            return message

        async def guarded_send(message: dict) -> None:
            # whatever the app made of the aborted body read, the answer is 413
            nonlocal replaced
            if exceeded:
                if not replaced:
                    replaced = True
                    await _send_error(send, 413, "body-too-large",
                                      f"request body over {self.limit} bytes")
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            await guarded_send({})


class BearerAuth:
    """Requires ``Authorization: Bearer <secret>`` (the TCP listener for a remote manager)."""

    def __init__(self, app: Any, secret: Secret) -> None:
        self.app = app
        self.secret = secret

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    given = value
            want = b"Bearer " + self.secret.reveal().encode()
            if not hmac.compare_digest(given, want):
                await _send_error(send, 401, "unauthorized", "a valid bearer token is required")
                return
        await self.app(scope, receive, send)


async def _send_error(send: Any, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
