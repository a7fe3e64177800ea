"""Authorization matrix: owner, shared ro, shared rw, stranger, admin × every endpoint.

Real HTTP against the manager served by hypercorn (SQLite or PostgreSQL,
``bind`` host volumes of temp dirs).  The node agent is stood in for by a small app on
a real unix socket that answers per ``azfs.export`` (see
``test_t5_manager_api``).  Every cell is checked and all mismatches are
reported at once as a table.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.support.postgres import postgres  # noqa: F401
from tests.test_t5_manager_api import Server, server, sqlite_server, tmp_dir  # noqa: F401

ROLES = {"owner": "olive", "ro": "rhea", "rw": "walt", "stranger": "stan", "admin": "admin"}
_n = itertools.count()


def _all(code: int) -> dict[str, int]:
    return dict.fromkeys(ROLES, code)


def _admin_only(code: int) -> dict[str, int]:
    return {**_all(403), "admin": code}


def _visible(code: int, shared: int | None = None) -> dict[str, int]:
    shared = code if shared is None else shared
    return {"owner": code, "ro": shared, "rw": shared, "stranger": 404, "admin": code}


@dataclass
class Case:
    name: str
    method: str
    #: path template: {id} a vfolder of olive shared ro with rhea and rw with walt,
    #: {kernel} a kernel of olive, {me} the caller, {n} a unique number
    path: str
    expected: dict[str, int]
    body: Any = None
    #: what {id} is: "shared" (one for all cells), "fresh" (one per cell), "trashed" (fresh,
    #: in the trash)
    vfolder: str = "shared"
    kernel: bool = False


CASES = [
    Case("vfolder info", "GET", "/v1/vfolders/{id}", _visible(200)),
    Case("vfolder usage", "GET", "/v1/vfolders/{id}/usage", _visible(200)),
    Case("vfolder rename", "PATCH", "/v1/vfolders/{id}", _visible(200, 403),
         {"alias": "renamed{n}"}, vfolder="fresh"),
    Case("vfolder quota", "PUT", "/v1/vfolders/{id}/quota", _admin_only(200),
         {"quota_bytes": 10**9, "quota_files": 1000}),
    Case("vfolder share", "PUT", "/v1/vfolders/{id}/shares/extra", _visible(200, 403),
         {"permission": "ro"}),
    Case("vfolder unshare other", "DELETE", "/v1/vfolders/{id}/shares/extra",
         _visible(204, 403)),
    Case("vfolder unshare self", "DELETE", "/v1/vfolders/{id}/shares/{me}", _visible(204),
         vfolder="fresh"),
    Case("vfolder trash", "DELETE", "/v1/vfolders/{id}", _visible(204, 403), vfolder="fresh"),
    Case("vfolder restore", "POST", "/v1/vfolders/{id}/restore", _visible(200, 403),
         vfolder="trashed"),
    Case("vfolder purge", "POST", "/v1/vfolders/{id}/purge", _visible(204, 403),
         vfolder="trashed"),
    Case("vfolder create", "POST", "/v1/vfolders", _all(201), {"alias": "mine{n}"}),
    Case("vfolder list", "GET", "/v1/vfolders", _all(200)),
    Case("vfolder list all", "GET", "/v1/vfolders?all=true", _admin_only(200)),
    Case("kernel create default mode", "POST", "/v1/kernels", _visible(201),
         {"kernel_id": "k{n}", "agent": "node1", "vfolders": [{"vfolder": "{id}"}],
          "dotfolders": False}, vfolder="fresh"),
    Case("kernel create rw", "POST", "/v1/kernels", {**_visible(201), "ro": 403},
         {"kernel_id": "k{n}", "agent": "node1",
          "vfolders": [{"vfolder": "{id}", "mode": "rw"}], "dotfolders": False},
         vfolder="fresh"),
    Case("kernel info", "GET", "/v1/kernels/{kernel}", _visible(200, 404), kernel=True),
    Case("kernel destroy", "DELETE", "/v1/kernels/{kernel}", _visible(204, 404), kernel=True),
    Case("kernel attach", "POST", "/v1/kernels/{kernel}/vfolders", _visible(200, 404),
         {"vfolder": "{id}"}, vfolder="fresh", kernel=True),
    Case("kernel detach", "DELETE", "/v1/kernels/{kernel}/vfolders/{id}", _visible(200, 404),
         kernel=True),
    Case("kernel list", "GET", "/v1/kernels", _all(200)),
    Case("kernel list all", "GET", "/v1/kernels?all=true", _admin_only(200)),
    Case("dataset register", "POST", "/v1/datasets", _admin_only(201),
         {"name": "ds{n}", "account_url": "http://127.0.0.1:10000/devstoreaccount1",
          "container": "data", "visibility": "shared"}),
    Case("dataset list", "GET", "/v1/datasets", _all(200)),
    Case("dataset info", "GET", "/v1/datasets/priv", _visible(200)),
    Case("dataset sas", "POST", "/v1/datasets/priv/sas", _visible(200), {"ttl": 120}),
    Case("dataset grant", "PUT", "/v1/datasets/priv/users/extra", _admin_only(200)),
    Case("dataset revoke", "DELETE", "/v1/datasets/priv/users/extra", _admin_only(200)),
    Case("dataset remove", "DELETE", "/v1/datasets/gone", _admin_only(204)),
    Case("user create", "POST", "/v1/users", _admin_only(201), {"name": "u{n}"}),
    Case("user list", "GET", "/v1/users", _admin_only(200)),
    Case("user get other", "GET", "/v1/users/olive", {**_all(403), "owner": 200, "admin": 200}),
    Case("user me", "GET", "/v1/users/me", _all(200)),
    Case("user update", "PATCH", "/v1/users/extra", _admin_only(200), {"uid": 3000}),
    Case("token issue own", "POST", "/v1/users/{me}/tokens", _all(201), {"label": "ci"}),
    Case("token issue other", "POST", "/v1/users/extra/tokens", _admin_only(201), {}),
    Case("token revoke other", "DELETE", "/v1/users/extra/tokens", _admin_only(204)),
    Case("agent register", "PUT", "/v1/agents/n{n}", _admin_only(200),
         {"socket": "/run/azfs/agent.sock", "ttl": 30}),
    Case("agent list", "GET", "/v1/agents", _admin_only(200)),
    Case("agent remove", "DELETE", "/v1/agents/nx", _admin_only(204)),
    Case("volume list", "GET", "/v1/volumes", _admin_only(200)),
]

ENDPOINTS_COVERED = {(c.method, c.path.split("?")[0]) for c in CASES}


def _fill(value: Any, subst: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return subst(value)
    if isinstance(value, dict):
        return {k: _fill(v, subst) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, subst) for v in value]
    return value


async def _shared_vfolder(srv: Server, alias: str, trashed: bool = False) -> str:
    async with srv.client("olive") as c:
        r = await c.post("/v1/vfolders", json={"alias": alias})
        assert r.status_code == 201, r.text
        vfid = r.json()["id"]
        for user, permission in (("rhea", "ro"), ("walt", "rw")):
            r = await c.put(f"/v1/vfolders/{vfid}/shares/{user}", json={"permission": permission})
            assert r.status_code == 200, r.text
        if trashed:
            assert (await c.delete(f"/v1/vfolders/{vfid}")).status_code == 204
    return vfid


async def test_every_endpoint_is_in_the_matrix(sqlite_server: Server) -> None:  # noqa: F811
    """A new route must get a row in CASES (or this test fails)."""
    async with sqlite_server.client() as c:
        spec = (await c.get("/openapi.json")).json()
    routes = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    templated = {(m, p.replace("{kernel}/vfolders/{id}", "{kernel}/vfolders/{alias}")
                  .replace("{id}", "{ref}").replace("{kernel}", "{kernel_id}")
                  .replace("{me}", "{name}").replace("/extra", "/{user}")
                  .replace("/priv/users/{user}", "/{name}/users/{user}")
                  .replace("/priv", "/{name}").replace("/gone", "/{name}")
                  .replace("/olive", "/{name}").replace("/n{n}", "/{name}")
                  .replace("/nx", "/{name}"))
                 for m, p in ENDPOINTS_COVERED}
    templated = {(m, p.replace("/users/{user}/tokens", "/users/{name}/tokens")
                  .replace("/users/{user}", "/users/{name}")
                  .replace("/{name}/users/{name}", "/{name}/users/{user}"))
                 for m, p in templated}
    # health and metrics are public; SAS renewal is authorised by the key in its URL (own test)
    missing = routes - templated - {("GET", "/v1/health"), ("GET", "/metrics"),
                                     ("GET", "/v1/kernels/{kernel_id}/datasets/{alias}/sas")}
    assert not missing, f"routes without authorization cases: {sorted(missing)}"


async def test_authorization_matrix(server: Server) -> None:  # noqa: F811
    """On SQLite and on PostgreSQL."""
    srv = server
    shared = await _shared_vfolder(srv, "proj")
    async with srv.client("admin") as c:
        for name, users in (("priv", ["olive", "rhea", "walt"]), ("gone", [])):
            r = await c.post("/v1/datasets", json={
                "name": name, "account_url": "http://127.0.0.1:10000/devstoreaccount1",
                "container": "data", "prefix": "sets/" + name, "visibility": "private",
                "users": users})
            assert r.status_code == 201, r.text
        r = await c.put("/v1/agents/nx", json={"url": "http://10.0.0.9:8631", "ttl": 0})
        assert r.status_code == 200
    mismatches: list[str] = []
    for case in CASES:
        for role, user in ROLES.items():
            n = next(_n)
            vfid = shared
            if case.vfolder in ("fresh", "trashed"):
                vfid = await _shared_vfolder(srv, f"f{n}", trashed=case.vfolder == "trashed")
            kernel = ""
            if case.kernel:
                kernel = f"ok{n}"
                async with srv.client("olive") as c:
                    r = await c.post("/v1/kernels", json={
                        "kernel_id": kernel, "agent": "node1", "dotfolders": False,
                        "vfolders": [{"vfolder": await _shared_vfolder(srv, f"kv{n}")}]})
                    assert r.status_code == 201, r.text
            if case.name == "dataset remove":
                async with srv.client("admin") as c:
                    await c.post("/v1/datasets", json={
                        "name": "gone", "account_url": "http://127.0.0.1:10000/devstoreaccount1",
                        "container": "data"})
            if case.name == "agent remove":
                async with srv.client("admin") as c:
                    await c.put("/v1/agents/nx", json={"url": "http://10.0.0.9:8631"})

            def subst(text: str, vfid: str = vfid, kernel: str = kernel, n: int = n,
                      user: str = user) -> str:
                return (text.replace("{id}", vfid).replace("{kernel}", kernel)
                        .replace("{me}", user).replace("{n}", str(n)))

            path = subst(case.path)
            async with srv.client(user) as c:
                r = await c.request(case.method, path, json=_fill(case.body, subst)
                                    if case.body is not None else None)
            if r.status_code != case.expected[role]:
                mismatches.append(f"{case.name:28} {role:9} {case.method} {path}: "
                                  f"expected {case.expected[role]}, got {r.status_code} "
                                  f"{r.text[:120]}")
            elif r.status_code >= 400:
                code = r.json()["error"]["code"]
                if (r.status_code, code) not in {(403, "forbidden"), (404, "vfolder-not-found"),
                                                 (404, "kernel-not-found"),
                                                 (404, "dataset-not-found")}:
                    mismatches.append(f"{case.name}: {role}: unexpected code {code}")
    assert not mismatches, "authorization mismatches:\n" + "\n".join(mismatches)


async def test_visibility_in_lists(sqlite_server: Server) -> None:  # noqa: F811
    srv = sqlite_server
    vfid = await _shared_vfolder(srv, "proj")
    seen = {}
    for role, user in ROLES.items():
        async with srv.client(user) as c:
            seen[role] = {v["id"]: v["access"] for v in (await c.get("/v1/vfolders")).json()}
    assert seen["owner"] == {vfid: "owner"}
    assert seen["ro"] == {vfid: "ro"} and seen["rw"] == {vfid: "rw"}
    assert seen["stranger"] == {} and seen["admin"] == {}
    async with srv.client("admin") as c:
        everyone = (await c.get("/v1/vfolders", params={"all": True})).json()
        assert [v["id"] for v in everyone] == [vfid]
    async with srv.client("olive") as c:
        info = (await c.get(f"/v1/vfolders/{vfid}")).json()
        assert info["shared_with"] == [{"user": "rhea", "permission": "ro"},
                                       {"user": "walt", "permission": "rw"}]
    async with srv.client("rhea") as c:
        info = (await c.get("/v1/vfolders/proj")).json()  # alias works for shared ones too
        assert info["id"] == vfid and "shared_with" not in info


async def test_rw_delete_share_may_trash_but_not_purge(sqlite_server: Server) -> None:  # noqa: F811
    srv = sqlite_server
    async with srv.client("olive") as c:
        vfid = (await c.post("/v1/vfolders", json={"alias": "team"})).json()["id"]
        await c.put(f"/v1/vfolders/{vfid}/shares/walt", json={"permission": "rw-delete"})
    async with srv.client("walt") as c:
        assert (await c.delete(f"/v1/vfolders/{vfid}")).status_code == 204
        assert (await c.post(f"/v1/vfolders/{vfid}/purge")).status_code == 403
        assert (await c.post(f"/v1/vfolders/{vfid}/restore")).status_code == 200


async def test_revoked_token_stops_working(sqlite_server: Server) -> None:  # noqa: F811
    srv = sqlite_server
    async with srv.client("stan") as c:
        assert (await c.get("/v1/users/me")).status_code == 200
        assert (await c.delete("/v1/users/stan/tokens")).status_code == 204
        r = await c.get("/v1/users/me")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"


async def test_two_shared_vfolders_of_one_alias_need_the_id(sqlite_server: Server) -> None:  # noqa: F811
    srv = sqlite_server
    ids = []
    for owner in ("olive", "walt"):
        async with srv.client(owner) as c:
            vfid = (await c.post("/v1/vfolders", json={"alias": "team"})).json()["id"]
            await c.put(f"/v1/vfolders/{vfid}/shares/rhea", json={"permission": "ro"})
            ids.append(vfid)
    async with srv.client("rhea") as c:
        r = await c.get("/v1/vfolders/team")
        assert r.status_code == 409 and r.json()["error"]["code"] == "vfolder-ambiguous"
        for vfid in ids:
            assert (await c.get(f"/v1/vfolders/{vfid}")).json()["id"] == vfid
        own = (await c.post("/v1/vfolders", json={"alias": "team"})).json()["id"]
        assert (await c.get("/v1/vfolders/team")).json()["id"] == own  # own first
