"""A synchronous client of the manager's REST API, and the calls built on it.

No printing here: the CLI renders what these return, the node tooling
(``azfs up``, ``azfs demo``) uses them directly.  Over ``https://`` the
manager's certificate and host name are always verified, against
``ca_file`` (a cluster's own CA) or else the system's trust; there is no
switch to turn verification off.  Failures are typed: :class:`ManagerUnreachable`
when no answer came, :class:`ManagerError` (with the API's stable ``code``
and the HTTP ``status``) when the manager refused; both are
:class:`~azfs.errors.UserError` with a one-line message, so an unhandled
one still reaches a user as a line, never a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from azfs.blob.url import parse_blob_url
from azfs.errors import UserError
from azfs.secret import Secret, redact

DEFAULT_URL = "http://127.0.0.1:8630"


class ManagerUnreachable(UserError):
    """No answer from the manager (connection refused, TLS not trusted, timeout)."""


class ManagerError(UserError):
    """The manager answered with an error; ``code`` is the API's stable code."""

    def __init__(self, message: str, code: str | int, status: int) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.status = status


class ManagerClient:
    """A thin synchronous client of the manager; see the module docstring for errors."""

    def __init__(self, url: str, token: Secret | None, timeout: float = 60.0,
                 ca_file: str | Path | None = None) -> None:
        from azfs.tls import client_context

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token.reveal()}"} if token else {}
        verify = client_context(ca_file, what="manager TLS") \
            if self.url.startswith("https://") else True
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  verify=verify)

    def call(self, method: str, path: str, body: Any = None,
             params: dict[str, Any] | None = None) -> Any:
        """One request; the decoded JSON answer (``None`` for 204)."""
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.ConnectError as exc:
            reason = redact(str(exc)) or type(exc).__name__
            if "CERTIFICATE_VERIFY_FAILED" in reason:
                reason = (f"its TLS certificate is not trusted ({reason}); give the cluster's "
                          "CA with --ca-file or $AZFS_CA_FILE")
            raise ManagerUnreachable(f"cannot reach the manager at {self.url}: "
                                     f"{reason}") from None
        except httpx.HTTPError as exc:
            raise ManagerUnreachable(f"cannot reach the manager at {self.url}: "
                                     f"{redact(str(exc)) or type(exc).__name__}") from None
        if response.status_code == 204:
            return None
        try:
            data = response.json()
        except ValueError:
            raise ManagerError(f"the manager answered {response.status_code} with something "
                               "that is not JSON", response.status_code,
                               response.status_code) from None
        if response.status_code >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise ManagerError(error.get("message", "request failed"),
                               error.get("code", response.status_code), response.status_code)
        return data

    def close(self) -> None:
        self._http.close()


def ref_path(ref: str) -> str:
    """``ref`` as one path segment (a '/' in it must not reach another route)."""
    return quote(ref, safe="")


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str) -> str:
    """The manager's rule for user and dataset names, checked before any request.

    A name with a '/' would otherwise reach a different route and come back
    as a puzzling 'not found'.
    """
    if not _NAME_RE.match(name):
        raise UserError(f"bad {what} {name!r}: 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit [invalid-argument]")
    return name


# ---- users -----------------------------------------------------------------------------
def create_user(client: ManagerClient, name: str, *, admin: bool = False,
                uid: int | None = None, gid: int | None = None) -> dict:
    """Creates a user; the answer holds its first token under ``token``."""
    body: dict = {"name": check_name(name, "user name"), "admin": admin}
    if uid is not None:
        body["uid"] = uid
    if gid is not None:
        body["gid"] = gid
    return client.call("POST", "/v1/users", body)


def list_users(client: ManagerClient) -> list[dict]:
    return client.call("GET", "/v1/users")


def issue_token(client: ManagerClient, name: str, label: str = "") -> str:
    """A fresh token of ``name`` (in clear: the caller must keep it secret)."""
    path = f"/v1/users/{ref_path(check_name(name, 'user name'))}/tokens"
    return client.call("POST", path, {"label": label})["token"]


# ---- datasets --------------------------------------------------------------------------
def register_body(name: str, url: str, prefix: str | None = None,
                  visibility: str = "private") -> dict:
    """The ``POST /v1/datasets`` body for a container URL (``.../CONTAINER[/PREFIX]``)."""
    check_name(name, "dataset name")
    try:
        source = parse_blob_url(url)
    except UserError as exc:
        raise UserError(f"bad dataset URL: {exc} [invalid-argument]") from None
    if source.sas is not None:
        raise UserError("the dataset URL must not carry a SAS: the manager signs its own "
                        "[invalid-argument]")
    if prefix is not None and source.prefix:
        raise UserError("give the prefix in the URL or with --prefix, not both "
                        "[invalid-argument]")
    return {"name": name, "account_url": source.account_url, "container": source.container,
            "prefix": source.prefix if prefix is None else prefix, "visibility": visibility}


def register_dataset(client: ManagerClient, name: str, url: str, prefix: str | None = None,
                     visibility: str = "private") -> dict:
    return client.call("POST", "/v1/datasets", register_body(name, url, prefix, visibility))


def catalog(client: ManagerClient) -> list[dict]:
    """The datasets the caller may read (every dataset for admins)."""
    return client.call("GET", "/v1/datasets")


# ---- kernels ---------------------------------------------------------------------------
def parse_vfolder(spec: str) -> dict:
    """A ``-v REF[:TARGET][:ro|rw]`` spec as the API's vfolder item."""
    parts = spec.split(":")
    item: dict = {"vfolder": parts[0]}
    rest = parts[1:]
    if rest and rest[-1] in ("ro", "rw"):
        item["mode"] = rest.pop()
    if len(rest) > 1 or not parts[0]:
        raise UserError(f"bad vfolder spec {spec!r} (expected REF[:TARGET][:ro|rw])")
    if rest and rest[0]:
        item["target"] = rest[0]
    return item


def parse_dataset(spec: str) -> dict:
    """A ``-d NAME[:TARGET]`` spec as the API's dataset item."""
    name, _, target = spec.partition(":")
    if not name:
        raise UserError(f"bad dataset spec {spec!r} (expected NAME[:TARGET])")
    return {"dataset": name, **({"target": target} if target else {})}


def create_kernel(client: ManagerClient, kernel_id: str, agent: str, vfolders: list[str],
                  datasets: list[str], *, dotfolders: bool = True,
                  owner: str | None = None) -> dict:
    """Asks the manager to export ``-v``/``-d`` specs to a kernel; returns its record.

    The record holds ``mounts``: the OCI bind mounts the agent answered.
    """
    body: dict = {"kernel_id": kernel_id, "agent": agent,
                  "vfolders": [parse_vfolder(v) for v in vfolders],
                  "datasets": [parse_dataset(d) for d in datasets], "dotfolders": dotfolders}
    if owner:
        body["owner"] = owner
    return client.call("POST", "/v1/kernels", body)


def destroy_kernel(client: ManagerClient, kernel_id: str, *, force: bool = False) -> None:
    """Drops a kernel's exports (destroying twice is fine)."""
    client.call("DELETE", f"/v1/kernels/{ref_path(kernel_id)}",
                params={"force": True} if force else None)


# ---- vfolders --------------------------------------------------------------------------
def create_vfolder(client: ManagerClient, alias: str, *, usage_mode: str = "general",
                   permission: str = "rw", dotfolder: bool = False,
                   volume: str | None = None) -> dict:
    body: dict = {"alias": alias, "usage_mode": usage_mode, "permission": permission,
                  "dotfolder": dotfolder}
    if volume:
        body["volume"] = volume
    return client.call("POST", "/v1/vfolders", body)


def list_vfolders(client: ManagerClient, *, all: bool = False,  # noqa: A002 - the API's name
                  trash: bool = False) -> list[dict]:
    return client.call("GET", "/v1/vfolders", params={"all": all, "trash": trash})


def vfolder_info(client: ManagerClient, ref: str) -> dict:
    return client.call("GET", f"/v1/vfolders/{ref_path(ref)}")
