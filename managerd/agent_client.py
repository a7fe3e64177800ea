"""HTTP client for a node agent's control API (the export contract of azfs.export).

Same host: the agent's unix socket.  Other hosts: TCP with the shared secret
as a bearer token; over ``https://`` the agent's certificate is verified
(against the manager's ``agent_ca_file``, else the system's trust).  Every
call has a deadline; failures become ``agent-unreachable`` (no answer, or a
certificate that does not verify) or ``agent-error`` (the agent refused).
"""

from __future__ import annotations

import functools
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from azfs.export import ExportRequest, ExportResponse, VfolderExport
from azfs.secret import Secret, redact
from managerd.errors import AgentError

log = logging.getLogger(__name__)
#: seconds to open a connection to an agent (a host that is down answers nothing)
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class AgentAddress:
    name: str
    socket: Path | None = None
    url: str | None = None
    secret: Secret | None = None
    #: verifying TLS context for https URLs (None: httpx's default, also verifying)
    tls: ssl.SSLContext | None = None


class AgentUnreachable(AgentError):
    code = "agent-unreachable"


class AgentClient:
    def __init__(self, address: AgentAddress, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout

    def _client(self) -> httpx.AsyncClient:
        headers = {}
        if self.address.socket is not None:
            # no TLS on a unix socket; the shared context only spares httpx building one
            transport = httpx.AsyncHTTPTransport(uds=str(self.address.socket),
                                                 verify=_default_tls())
            base = "http://agent"
        else:
            transport = httpx.AsyncHTTPTransport(
                verify=self.address.tls if self.address.tls is not None else _default_tls())
            base = str(self.address.url).rstrip("/")
            if self.address.secret:
                headers["Authorization"] = f"Bearer {self.address.secret.reveal()}"
        # a dead node must fail a call fast: connecting gets a short deadline of its own
        timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT))
        return httpx.AsyncClient(transport=transport, base_url=base, headers=headers,
                                 timeout=timeout)

    async def export(self, kernel_id: str, request: ExportRequest) -> ExportResponse:
        """``PUT /v1/kernels/{kernel_id}``: the agent presents the vfolders to the kernel."""
        response = await self._call("PUT", f"/v1/kernels/{kernel_id}",
                                    json=request.model_dump(mode="json", exclude_none=True))
        try:
            return ExportResponse.model_validate(response.json())
        except (ValueError, ValidationError):
            raise AgentError(f"agent {self.address.name!r} sent a malformed answer") from None

    async def attach(self, kernel_id: str, vfolder: VfolderExport) -> ExportResponse:
        """``PUT /v1/kernels/{kernel_id}/vfolders/{alias}``: one more vfolder, live."""
        response = await self._call(
            "PUT", f"/v1/kernels/{kernel_id}/vfolders/{quote(vfolder.alias, safe='')}",
            json=vfolder.model_dump(mode="json", exclude_none=True))
        try:
            return ExportResponse.model_validate(response.json())
        except (ValueError, ValidationError):
            raise AgentError(f"agent {self.address.name!r} sent a malformed answer") from None

    async def detach(self, kernel_id: str, alias: str) -> None:
        """``DELETE /v1/kernels/{kernel_id}/vfolders/{alias}``; a gone kernel is fine."""
        await self._call("DELETE", f"/v1/kernels/{kernel_id}/vfolders/{quote(alias, safe='')}",
                         missing_ok=True)

    async def unexport(self, kernel_id: str) -> None:
        """``DELETE /v1/kernels/{kernel_id}``; an unknown kernel is already gone."""
        await self._call("DELETE", f"/v1/kernels/{kernel_id}", missing_ok=True)

    async def kernel_ids(self) -> set[str]:
        """``GET /v1/kernels``: the kernels the agent's journal holds."""
        response = await self._call("GET", "/v1/kernels")
        try:
            return {str(k["kernel_id"]) for k in response.json()["kernels"]}
        except (ValueError, KeyError, TypeError):
            raise AgentError(f"agent {self.address.name!r} sent a malformed answer") from None

    async def _call(self, method: str, path: str, *, missing_ok: bool = False,
                    **kwargs: object) -> httpx.Response:
        name = self.address.name
        try:
            async with self._client() as client:
                response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.TimeoutException:
            raise AgentUnreachable(f"agent {name!r} did not answer in {self.timeout:g}s") \
                from None
        except (httpx.HTTPError, OSError) as exc:
            raise AgentUnreachable(f"agent {name!r} is unreachable: {_reason(exc)}") from None
        if response.status_code == 404 and missing_ok:
            return response
        if response.status_code >= 400:
            raise AgentError(f"agent {name!r} answered {response.status_code}: "
                             f"{_agent_message(response)}")
        return response


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """httpx's verifying default, built once: loading the CA bundle costs about 0.1 s
    of CPU, which a client per call would pay on every kernel create."""
    return httpx.create_ssl_context()


def _reason(exc: BaseException) -> str:
    """The first non-empty message down the chain (trio's TLS errors wrap the real one)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if str(seen):
            return redact(str(seen))
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def _agent_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message") or error.get("detail") if isinstance(error, dict) \
            else error
    except ValueError:
        message = response.text
    return redact(str(message))[:500]
