"""Datasets and read-only SAS over real HTTP, checked against a real Azurite.

The SAS the manager issues must read, must not write, must expire on time
and, blob-scoped, must not reach other blobs.  Kernels with datasets get a
blob export with a working SAS; the node agent is stood in for by the small
unix-socket app of ``test_t5_manager_api`` (its HTTP contract only).
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient, ContainerClient

from azfs.export import ExportRequest
from tests.support.azurite import Azurite, azurite  # noqa: F401
from tests.test_t5_manager_api import Server, running_manager, tmp_dir  # noqa: F401


@pytest.fixture
async def srv(tmp_dir, azurite: Azurite):  # noqa: F811
    azurite.upload("dsets", {"imagenet/a.txt": b"alpha", "imagenet/sub/b.txt": b"beta",
                             "other/secret.txt": b"not yours"})
    async with running_manager(tmp_dir, f"sqlite:///{tmp_dir / 'm.db'}", "sqlite",
                               sas_max_ttl=600) as server:
        async with server.client("admin") as c:
            r = await c.post("/v1/datasets", json={
                "name": "imagenet", "account_url": azurite.blob_endpoint,
                "container": "dsets", "prefix": "imagenet", "visibility": "private",
                "users": ["olive"]})
            assert r.status_code == 201, r.text
            assert r.json()["prefix"] == "imagenet/"
        yield server, azurite


async def test_container_sas_reads_and_cannot_write(srv) -> None:
    server, store = srv
    async with server.client("olive") as c:
        r = await c.post("/v1/datasets/imagenet/sas", json={"ttl": 300})
        assert r.status_code == 200, r.text
        issued = r.json()
    assert issued["scope"] == "container"
    expires = datetime.fromisoformat(issued["expires_at"])
    assert 0 < (expires - datetime.now(UTC)).total_seconds() <= 300
    container = ContainerClient.from_container_url(f"{store.blob_endpoint}/dsets?"
                                                   f"{issued['sas']}")
    names = [b.name for b in container.list_blobs(name_starts_with="imagenet/")]
    assert names == ["imagenet/a.txt", "imagenet/sub/b.txt"]
    assert container.download_blob("imagenet/a.txt").readall() == b"alpha"
    with pytest.raises(HttpResponseError) as err:
        container.upload_blob("imagenet/new.txt", b"x")
    assert err.value.status_code == 403
    assert "new.txt" not in [b.name for b in store.service_client()
                             .get_container_client("dsets").list_blobs()]


async def test_blob_sas_reaches_one_blob(srv) -> None:
    server, store = srv
    async with server.client("olive") as c:
        r = await c.post("/v1/datasets/imagenet/sas", json={"blob": "sub/b.txt"})
        assert r.status_code == 200, r.text
        issued = r.json()
        assert issued["scope"] == "blob"
        assert BlobClient.from_blob_url(issued["url"]).download_blob().readall() == b"beta"
        other = BlobClient.from_blob_url(
            f"{store.blob_endpoint}/dsets/other/secret.txt?{issued['sas']}")
        with pytest.raises(HttpResponseError) as err:
            other.download_blob().readall()
        assert err.value.status_code == 403
        for bad in ("../other/secret.txt", "/abs", "a/../../x"):
            r = await c.post("/v1/datasets/imagenet/sas", json={"blob": bad})
            assert r.status_code == 422, bad
        r = await c.post("/v1/datasets/imagenet/sas", json={"ttl": 3600})
        assert r.status_code == 422 and "ttl" in r.json()["error"]["message"]


async def test_private_dataset_is_invisible_to_others(srv) -> None:
    server, _ = srv
    async with server.client("stan") as c:
        assert (await c.get("/v1/datasets")).json() == []
        for call in (c.get("/v1/datasets/imagenet"), c.post("/v1/datasets/imagenet/sas")):
            r = await call
            assert r.status_code == 404 and r.json()["error"]["code"] == "dataset-not-found"
    async with server.client("admin") as c:
        assert (await c.put("/v1/datasets/imagenet/users/stan")).status_code == 200
    async with server.client("stan") as c:
        assert [d["name"] for d in (await c.get("/v1/datasets")).json()] == ["imagenet"]
        assert (await c.post("/v1/datasets/imagenet/sas")).status_code == 200


async def test_unknown_account_key_is_an_explicit_error(srv) -> None:
    server, _ = srv
    async with server.client("admin") as c:
        r = await c.post("/v1/datasets", json={
            "name": "elsewhere", "account_url": "https://otheraccount.blob.core.windows.net",
            "container": "data", "visibility": "shared"})
        assert r.status_code == 201
        r = await c.post("/v1/datasets/elsewhere/sas")
        assert r.status_code == 503 and r.json()["error"]["code"] == "sas-unavailable"
        r = await c.post("/v1/datasets", json={
            "name": "elsewhere", "account_url": "https://x.blob.core.windows.net",
            "container": "data"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "dataset-exists"
        for bad in ({"container": "UPPER"}, {"account_url": "ftp://x"},
                    {"prefix": "../up"}, {"name": "a/b"}):
            body = {"name": "n1", "account_url": "https://x.blob.core.windows.net",
                    "container": "data", **bad}
            r = await c.post("/v1/datasets", json=body)
            assert r.status_code == 422, (bad, r.text)


async def test_kernel_with_dataset_gets_a_working_sas(srv) -> None:
    server, store = srv
    async with server.client("olive") as c:
        r = await c.post("/v1/kernels", json={
            "kernel_id": "kd", "agent": "node1",
            "datasets": [{"dataset": "imagenet", "target": "/data/imagenet"}]})
        assert r.status_code == 201, r.text
        export = ExportRequest.model_validate(server.agent.requests[-1][2])
        (item,) = export.vfolders
        assert item.kind == "blob" and item.mode == "ro"
        assert item.container_path == "/data/imagenet"
        assert item.dataset.url == f"{store.blob_endpoint}/dsets/imagenet"
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{store.blob_endpoint}/dsets/imagenet/a.txt?"
                               f"{item.dataset.sas}")
            assert r.status_code == 200 and r.content == b"alpha"
        async with server.client("admin") as admin:
            r = await admin.delete("/v1/datasets/imagenet")
            assert r.status_code == 409 and r.json()["error"]["code"] == "dataset-in-use"
        assert (await c.delete("/v1/kernels/kd")).status_code == 204
    async with server.client("stan") as c:
        r = await c.post("/v1/kernels", json={"kernel_id": "ks", "agent": "node1",
                                              "datasets": [{"dataset": "imagenet"}]})
        assert r.status_code == 404


async def test_agent_renews_the_sas_with_its_kernel_key(srv) -> None:
    """The renewal URL works without a token, only with its key, only while allowed."""
    server, store = srv
    async with server.client("olive") as c:
        r = await c.post("/v1/kernels", json={"kernel_id": "kr", "agent": "node1",
                                              "datasets": [{"dataset": "imagenet"}]})
        assert r.status_code == 201, r.text
    (item,) = ExportRequest.model_validate(server.agent.requests[-1][2]).vfolders
    renew_url = item.dataset.sas_url
    assert renew_url.startswith(f"{server.url}/v1/kernels/kr/datasets/imagenet/sas?key=")
    async with httpx.AsyncClient() as http:
        r = await http.get(renew_url)
        assert r.status_code == 200, r.text
        fresh = r.json()["sas"]
        assert "sp=rl" in fresh and datetime.fromisoformat(r.json()["expires_at"]) > \
            datetime.now(UTC)
        r = await http.get(f"{store.blob_endpoint}/dsets/imagenet/a.txt?{fresh}")
        assert r.status_code == 200 and r.content == b"alpha"
        r = await http.get(renew_url[:-4] + "AAAA")
        assert r.status_code == 404 and r.json()["error"]["code"] == "kernel-not-found"
        async with server.client("admin") as admin:
            assert (await admin.delete("/v1/datasets/imagenet/users/olive")).status_code == 200
        r = await http.get(renew_url)
        assert r.status_code == 404 and r.json()["error"]["code"] == "dataset-not-found"
        async with server.client("admin") as admin:
            assert (await admin.put("/v1/datasets/imagenet/users/olive")).status_code == 200
        assert (await http.get(renew_url)).status_code == 200
        async with server.client("olive") as c:
            assert (await c.delete("/v1/kernels/kr")).status_code == 204
        r = await http.get(renew_url)
        assert r.status_code == 404
