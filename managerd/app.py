"""The manager's REST API (FastAPI on hypercorn's trio worker).

Routes are thin: parse, authenticate, call a service, shape the answer.
Every error leaves as ``{"error": {"code", "message"}}`` with a stable code
(see :data:`managerd.errors.CODES`); an unexpected exception is logged with
its traceback and answered ``internal-error`` without details.  String input
is checked for control characters and invalid Unicode before it can reach
the database.

(No ``from __future__ import annotations`` here: FastAPI reads the route
annotations at runtime, including the ``Who`` dependency defined inside
:func:`create_app`.)
"""

import logging
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from azfs import __version__
from managerd import auth
from managerd import schemas as S
from managerd.auth import Principal
from managerd.errors import ApiError, Forbidden, Unauthenticated
from managerd.metrics import ManagerMetrics, MetricsMiddleware
from managerd.services.kernels import DatasetRequest, KernelRequest, VfolderRequest
from managerd.state import Manager

log = logging.getLogger(__name__)

MAX_INT = 2**63 - 1


def _clean(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_clean)]
Ref = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f/]+$",
                          description="vfolder id or alias")]
Name = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
KernelId = Annotated[str, Path(min_length=1, max_length=128,
                               pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserCreate(_Body):
    name: Text = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    admin: bool = False
    uid: int = Field(default=1000, ge=0, le=2**32 - 2)
    gid: int = Field(default=1000, ge=0, le=2**32 - 2)


class UserUpdate(_Body):
    admin: bool | None = None
    uid: int | None = Field(default=None, ge=0, le=2**32 - 2)
    gid: int | None = Field(default=None, ge=0, le=2**32 - 2)


class TokenCreate(_Body):
    label: Text = Field(default="", max_length=64)


class VfolderCreate(_Body):
    alias: Text = Field(min_length=1, max_length=64)
    volume: Text | None = Field(default=None, min_length=1, max_length=64,
                                description="host volume; default: most free space")
    usage_mode: Literal["general", "data", "model"] = "general"
    permission: Literal["ro", "rw"] = "rw"
    dotfolder: bool = Field(default=False,
                            description="allow a reserved dot-name such as .ssh")


class VfolderRename(_Body):
    alias: Text = Field(min_length=1, max_length=64)
    dotfolder: bool = False


class QuotaSet(_Body):
    quota_bytes: int | None = Field(default=None, ge=0, le=MAX_INT)
    quota_files: int | None = Field(default=None, ge=0, le=MAX_INT)


class ShareSet(_Body):
    permission: Literal["ro", "rw", "rw-delete"] = "ro"


class DatasetCreate(_Body):
    name: Text = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    account_url: Text = Field(min_length=1, max_length=255, pattern=r"^https?://",
                              description="blob endpoint, e.g. https://ACCOUNT.blob.core.windows.net")
    container: Text = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")
    prefix: Text = Field(default="", max_length=1024)
    visibility: Literal["shared", "private"] = "private"
    users: list[Annotated[Text, Field(max_length=64)]] = Field(default_factory=list,
                                                                max_length=1000)


class SasRequest(_Body):
    ttl: int | None = Field(default=None, ge=1, le=86400, description="seconds")
    blob: Text | None = Field(default=None, max_length=1024,
                              description="one blob (relative to the dataset's prefix)")


class AgentRegister(_Body):
    socket: Text | None = Field(default=None, max_length=1024, pattern=r"^/")
    url: Text | None = Field(default=None, max_length=1024, pattern=r"^https?://")
    ttl: int = Field(default=60, ge=0, le=86400, description="seconds; 0: no expiry")


class VfolderItem(_Body):
    vfolder: Text = Field(min_length=1, max_length=64, description="vfolder id or alias")
    mode: Literal["ro", "rw"] | None = None
    target: Text | None = Field(default=None, max_length=1024)
    alias: Text | None = Field(default=None, max_length=64)


class DatasetItem(_Body):
    dataset: Text = Field(min_length=1, max_length=64)
    target: Text | None = Field(default=None, max_length=1024)
    alias: Text | None = Field(default=None, max_length=64)


class KernelBody(_Body):
    kernel_id: Text = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    agent: Text = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    vfolders: list[VfolderItem] = Field(default_factory=list, max_length=64)
    datasets: list[DatasetItem] = Field(default_factory=list, max_length=64)
    dotfolders: bool = Field(default=True, description="also export the owner's dot-folders")
    owner: Text | None = Field(default=None, min_length=1, max_length=64,
                               description="admins: the user the kernel runs for")

    def to_request(self) -> KernelRequest:
        return KernelRequest(
            kernel_id=self.kernel_id, agent=self.agent, dotfolders=self.dotfolders,
            owner=self.owner,
            vfolders=[VfolderRequest(**v.model_dump()) for v in self.vfolders],
            datasets=[DatasetRequest(**d.model_dump()) for d in self.datasets])


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": S.ErrorBody} for status in (401, 403, 404, 409, 422, 502, 503)}

_bearer = HTTPBearer(auto_error=False, description="API token")


def create_app(manager: Manager) -> FastAPI:
    app = FastAPI(title="azfs manager", version=__version__, responses=ERRORS,
                  description="vfolders, datasets, kernels and users of an azfs cluster")
    app.state.manager = manager
    _install_error_handlers(app)
    metrics = ManagerMetrics(manager.db, lambda: manager.leader.is_leader)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    async def principal(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if credentials is None:
            raise Unauthenticated("missing 'Authorization: Bearer <token>' header")
        token = credentials.credentials
        if not token or len(token) > 256 or not token.isascii():
            raise Unauthenticated("malformed bearer token")
        return await manager.db.read(auth.lookup, token)

    Who = Annotated[Principal, Depends(principal)]
    m = manager

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse,
             summary="Prometheus metrics (aggregate counts only; no authentication)")
    async def prometheus() -> Response:
        return Response(await metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/health", tags=["meta"],
             response_model=S.Health, response_model_exclude_unset=True)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "leader": m.leader.is_leader}

    # -- users -----------------------------------------------------------------

    @app.get("/v1/users/me", tags=["users"],
             response_model=S.UserOut, response_model_exclude_unset=True)
    async def whoami(who: Who) -> dict:
        return await m.users.get(who, who.name)

    @app.post("/v1/users", status_code=201, tags=["users"],
             response_model=S.UserWithToken, response_model_exclude_unset=True)
    async def create_user(who: Who, body: UserCreate) -> dict:
        return await m.users.create(who, body.name, body.admin, body.uid, body.gid)

    @app.get("/v1/users", tags=["users"],
             response_model=list[S.UserOut], response_model_exclude_unset=True)
    async def list_users(who: Who) -> list[dict]:
        return await m.users.list(who)

    @app.get("/v1/users/{name}", tags=["users"],
             response_model=S.UserOut, response_model_exclude_unset=True)
    async def get_user(who: Who, name: Name) -> dict:
        return await m.users.get(who, name)

    @app.patch("/v1/users/{name}", tags=["users"],
             response_model=S.UserOut, response_model_exclude_unset=True)
    async def update_user(who: Who, name: Name, body: UserUpdate) -> dict:
        return await m.users.update(who, name, admin=body.admin, uid=body.uid, gid=body.gid)

    @app.post("/v1/users/{name}/tokens", status_code=201, tags=["users"],
             response_model=S.TokenOut, response_model_exclude_unset=True)
    async def issue_token(who: Who, name: Name, body: TokenCreate) -> dict:
        return await m.users.issue_token(who, name, body.label)

    @app.delete("/v1/users/{name}/tokens", status_code=204, tags=["users"])
    async def revoke_tokens(who: Who, name: Name) -> Response:
        await m.users.revoke_tokens(who, name)
        return Response(status_code=204)

    # -- vfolders --------------------------------------------------------------

    @app.post("/v1/vfolders", status_code=201, tags=["vfolders"],
             response_model=S.VfolderOut, response_model_exclude_unset=True)
    async def create_vfolder(who: Who, body: VfolderCreate) -> dict:
        return await m.vfolders.create(who, body.alias, volume=body.volume,
                                       usage_mode=body.usage_mode, permission=body.permission,
                                       dotfolder=body.dotfolder)

    @app.get("/v1/vfolders", tags=["vfolders"],
             response_model=list[S.VfolderOut], response_model_exclude_unset=True)
    async def list_vfolders(who: Who, all: Annotated[bool, Query()] = False,
                            trash: Annotated[bool, Query()] = False) -> list[dict]:
        return await m.vfolders.list(who, everyone=all, trash=trash)

    @app.get("/v1/vfolders/{ref}", tags=["vfolders"],
             response_model=S.VfolderInfo, response_model_exclude_unset=True)
    async def vfolder_info(who: Who, ref: Ref) -> dict:
        return await m.vfolders.info(who, ref)

    @app.get("/v1/vfolders/{ref}/usage", tags=["vfolders"],
             response_model=S.UsageOut, response_model_exclude_unset=True)
    async def vfolder_usage(who: Who, ref: Ref) -> dict:
        return await m.vfolders.usage(who, ref)

    @app.patch("/v1/vfolders/{ref}", tags=["vfolders"],
             response_model=S.VfolderOut, response_model_exclude_unset=True)
    async def rename_vfolder(who: Who, ref: Ref, body: VfolderRename) -> dict:
        return await m.vfolders.rename(who, ref, body.alias, body.dotfolder)

    @app.put("/v1/vfolders/{ref}/quota", tags=["vfolders"],
             response_model=S.VfolderOut, response_model_exclude_unset=True)
    async def set_quota(who: Who, ref: Ref, body: QuotaSet) -> dict:
        return await m.vfolders.set_quota(who, ref, body.quota_bytes, body.quota_files)

    @app.put("/v1/vfolders/{ref}/shares/{user}", tags=["vfolders"],
             response_model=S.VfolderOut, response_model_exclude_unset=True)
    async def share_vfolder(who: Who, ref: Ref, user: Name, body: ShareSet) -> dict:
        return await m.vfolders.share(who, ref, user, body.permission)

    @app.delete("/v1/vfolders/{ref}/shares/{user}", status_code=204, tags=["vfolders"])
    async def unshare_vfolder(who: Who, ref: Ref, user: Name) -> Response:
        await m.vfolders.unshare(who, ref, user)
        return Response(status_code=204)

    @app.delete("/v1/vfolders/{ref}", status_code=204, tags=["vfolders"],
                summary="Move a vfolder to the trash")
    async def trash_vfolder(who: Who, ref: Ref) -> Response:
        await m.vfolders.trash(who, ref)
        return Response(status_code=204)

    @app.post("/v1/vfolders/{ref}/restore", tags=["vfolders"],
             response_model=S.VfolderOut, response_model_exclude_unset=True)
    async def restore_vfolder(who: Who, ref: Ref) -> dict:
        return await m.vfolders.restore(who, ref)

    @app.post("/v1/vfolders/{ref}/purge", status_code=204, tags=["vfolders"],
              summary="Remove a trashed vfolder and its data for good",
              responses={202: {"description": "still removing (slow storage); the "
                                              "vfolder is delete-ongoing until done"}})
    async def purge_vfolder(who: Who, ref: Ref) -> Response:
        if await m.vfolders.purge(who, ref):
            return Response(status_code=204)
        return JSONResponse({"status": "delete-ongoing"}, status_code=202)

    # -- datasets --------------------------------------------------------------

    @app.post("/v1/datasets", status_code=201, tags=["datasets"],
             response_model=S.DatasetOut, response_model_exclude_unset=True)
    async def register_dataset(who: Who, body: DatasetCreate) -> dict:
        return await m.datasets.register(who, body.name, body.account_url, body.container,
                                         body.prefix, body.visibility, body.users)

    @app.get("/v1/datasets", tags=["datasets"],
             response_model=list[S.DatasetOut], response_model_exclude_unset=True)
    async def list_datasets(who: Who) -> list[dict]:
        return await m.datasets.list(who)

    @app.get("/v1/datasets/{name}", tags=["datasets"],
             response_model=S.DatasetOut, response_model_exclude_unset=True)
    async def dataset_info(who: Who, name: Name) -> dict:
        return await m.datasets.info(who, name)

    @app.delete("/v1/datasets/{name}", status_code=204, tags=["datasets"])
    async def remove_dataset(who: Who, name: Name) -> Response:
        await m.datasets.remove(who, name)
        return Response(status_code=204)

    @app.put("/v1/datasets/{name}/users/{user}", tags=["datasets"],
             response_model=S.DatasetOut, response_model_exclude_unset=True)
    async def grant_dataset(who: Who, name: Name, user: Name) -> dict:
        return await m.datasets.set_access(who, name, [user], grant=True)

    @app.delete("/v1/datasets/{name}/users/{user}", tags=["datasets"],
             response_model=S.DatasetOut, response_model_exclude_unset=True)
    async def revoke_dataset(who: Who, name: Name, user: Name) -> dict:
        return await m.datasets.set_access(who, name, [user], grant=False)

    @app.post("/v1/datasets/{name}/sas", tags=["datasets"],
              summary="Issue a short-lived read-only SAS",
             response_model=S.SasOut, response_model_exclude_unset=True)
    async def dataset_sas(who: Who, name: Name, body: SasRequest | None = None) -> dict:
        body = body or SasRequest()
        return await m.datasets.issue_sas(who, name, body.ttl, body.blob)

    # -- kernels ---------------------------------------------------------------

    @app.post("/v1/kernels", status_code=201, tags=["kernels"],
              responses={200: {"description": "a retried create of the same kernel"}},
             response_model=S.KernelOut, response_model_exclude_unset=True)
    async def create_kernel(who: Who, body: KernelBody) -> Any:
        kernel, created = await m.kernels.create(who, body.to_request())
        return JSONResponse(kernel, status_code=201 if created else 200)

    @app.get("/v1/kernels", tags=["kernels"],
             response_model=list[S.KernelOut], response_model_exclude_unset=True)
    async def list_kernels(who: Who, all: Annotated[bool, Query()] = False) -> list[dict]:
        return await m.kernels.list(who, everyone=all)

    @app.get("/v1/kernels/{kernel_id}", tags=["kernels"],
             response_model=S.KernelOut, response_model_exclude_unset=True)
    async def kernel_info(who: Who, kernel_id: KernelId) -> dict:
        return await m.kernels.info(who, kernel_id)

    @app.delete("/v1/kernels/{kernel_id}", status_code=204, tags=["kernels"])
    async def destroy_kernel(who: Who, kernel_id: KernelId,
                             force: Annotated[bool, Query(
                                 description="admins: forget it even if the agent is "
                                             "unreachable")] = False) -> Response:
        await m.kernels.destroy(who, kernel_id, force)
        return Response(status_code=204)

    @app.post("/v1/kernels/{kernel_id}/vfolders", tags=["kernels"],
              summary="Attach a vfolder to a running kernel",
              description="Checked as for a kernel create, for the kernel's owner; the "
                          "vfolder appears at its path in the running container.",
              response_model=S.KernelOut, response_model_exclude_unset=True,
              responses=ERRORS)
    async def attach_vfolder(who: Who, kernel_id: KernelId, body: VfolderItem) -> dict:
        return await m.kernels.attach(who, kernel_id, VfolderRequest(**body.model_dump()))

    @app.delete("/v1/kernels/{kernel_id}/vfolders/{alias}", tags=["kernels"],
                summary="Detach a vfolder from a running kernel (twice is fine)",
                response_model=S.KernelOut, response_model_exclude_unset=True,
                responses=ERRORS)
    async def detach_vfolder(who: Who, kernel_id: KernelId, alias: Ref) -> dict:
        return await m.kernels.detach(who, kernel_id, alias)

    @app.get("/v1/kernels/{kernel_id}/datasets/{alias}/sas", tags=["kernels"],
             summary="SAS renewal for the agent serving a kernel's dataset",
             description="Authenticated by the key in the URL the agent was given "
                         "(no bearer token); answers a fresh read-only SAS.",
             response_model=S.RenewedSas, response_model_exclude_unset=True)
    async def renew_kernel_sas(kernel_id: KernelId, alias: Ref,
                               key: Annotated[str, Query(min_length=1, max_length=128,
                                                         pattern=r"^[A-Za-z0-9_-]+$")]) -> dict:
        return await m.kernels.renew_sas(kernel_id, alias, key)

    # -- agents and volumes (admin) ----------------------------------------------

    @app.put("/v1/agents/{name}", tags=["agents"],
             response_model=S.AgentOut, response_model_exclude_unset=True)
    async def register_agent(who: Who, name: Name, body: AgentRegister) -> dict:
        return await m.agents.register(who, name, body.socket, body.url, body.ttl)

    @app.get("/v1/agents", tags=["agents"],
             response_model=list[S.AgentOut], response_model_exclude_unset=True)
    async def list_agents(who: Who) -> list[dict]:
        return await m.agents.list(who)

    @app.delete("/v1/agents/{name}", status_code=204, tags=["agents"])
    async def remove_agent(who: Who, name: Name) -> Response:
        await m.agents.remove(who, name)
        return Response(status_code=204)

    @app.get("/v1/volumes", tags=["volumes"],
             response_model=list[S.VolumeOut], response_model_exclude_unset=True)
    async def list_volumes(who: Who) -> list[dict]:
        if not who.is_admin:
            raise Forbidden("only admins list host volumes")
        out = []
        for name in await m.volumes.requested():
            try:
                out.append({"name": name, "free_bytes": await m.volumes.free_bytes(name)})
            except ApiError as exc:
                out.append({"name": name, "free_bytes": None, "error": exc.body()["error"]})
        return out

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return JSONResponse(
            {"error": {"code": "invalid-argument",
                       "message": f"{where}: {message}" if where else message}},
            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return JSONResponse({"error": {"code": "internal-error",
                                       "message": "internal error; see the manager's log"}},
                            status_code=500)
