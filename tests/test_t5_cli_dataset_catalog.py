"""``azfs dataset register/grant/catalog/issue-sas`` and ``azfs kernel create --json``.

The real CLI against a real ``azfs-managerd`` (hypercorn, SQLite, free
loopback port) that signs SAS with the key of a real Azurite account; the
SAS it hands out is tried against Azurite (reads, cannot write).  The kernel
test runs a real ``azfs-agentd`` that mounts the dataset through FUSE.
"""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.agent import (
    AgentHarness,
    agent,  # noqa: F401
)
from tests.support.azurite import Azurite, azurite  # noqa: F401
from tests.test_t5_cli_user import Cli
from tests.test_t5_manager_api import _unmount_under
from tests.test_t5_manager_api_daemon import Daemon

BLOBS = {"imagenet/a.txt": b"alpha", "imagenet/sub/b.txt": b"beta", "other/c.txt": b"gamma"}


@pytest.fixture(scope="module")
def manager(azurite: Azurite) -> Iterator[Cli]:  # noqa: F811
    azurite.upload("dsets", BLOBS)
    tmp = Path(tempfile.mkdtemp(prefix="azfs-cli-ds-"))
    try:
        d = Daemon(tmp, f"sqlite:///{tmp / 'managerd.db'}")
        key = tmp / "account.key"
        key.write_text(azurite.key)
        key.chmod(0o600)
        with d.config.open("a") as out:
            out.write(f'[accounts.{azurite.account}]\nkey_file = "{key}"\n')
        admin = d.create_user("admin", admin=True)
        with d.run():
            cli = Cli(d, admin)
            for name in ("olive", "stan"):
                cli.ok(admin, "user", "create", name)
            cli.olive = cli.token_of("olive")  # type: ignore[attr-defined]
            cli.stan = cli.token_of("stan")  # type: ignore[attr-defined]
            cli.store = azurite  # type: ignore[attr-defined]
            yield cli
    finally:
        _unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _names(m: Cli, token: str) -> set[str]:
    return {d["name"] for d in m.json(token, "dataset", "catalog")}


def test_register_grant_catalog_unregister(manager: Cli) -> None:
    m, store = manager, manager.store  # type: ignore[attr-defined]
    shared = m.json(m.admin, "dataset", "register", "pub", store.container_url("dsets"),
                    "--shared")
    assert shared == {**shared, "name": "pub", "account_url": store.blob_endpoint,
                      "container": "dsets", "prefix": "", "visibility": "shared",
                      "url": f"{store.blob_endpoint}/dsets", "users": []}
    private = m.json(m.admin, "dataset", "register", "inet",
                     store.container_url("dsets", "imagenet"), "--private")
    assert (private["prefix"], private["visibility"]) == ("imagenet/", "private")
    r = m.ok(m.admin, "dataset", "register", "oth", store.container_url("dsets"),
             "--prefix", "other")
    assert "oth" in r.stdout and "private" in r.stdout and "dsets/other" in r.stdout
    listed = m.json(m.admin, "dataset", "catalog")
    assert [d["name"] for d in listed] == ["inet", "oth", "pub"]  # by name
    by_name = {d["name"]: d for d in listed}
    for record in (shared, private):
        assert by_name[record["name"]] == {k: v for k, v in record.items() if k != "users"}
    assert by_name["oth"]["prefix"] == "other/"

    olive = m.olive  # type: ignore[attr-defined]
    assert _names(m, olive) == {"pub"}
    granted = m.json(m.admin, "dataset", "grant", "inet", "olive")
    assert granted["users"] == ["olive"]
    assert _names(m, olive) == {"pub", "inet"}
    assert _names(m, m.stan) == {"pub"}  # type: ignore[attr-defined]
    table = m.ok(olive, "dataset", "catalog").stdout
    assert "inet" in table and "pub" in table and "oth" not in table
    r = m.ok(m.admin, "dataset", "revoke", "inet", "olive")
    assert "inet" in r.stdout
    assert _names(m, olive) == {"pub"}

    r = m.ok(m.admin, "dataset", "unregister", "oth")
    assert "oth" in r.stdout
    assert m.json(m.admin, "dataset", "unregister", "inet") == {"dataset": "inet",
                                                                "registered": False}
    assert _names(m, m.admin) == {"pub"}


def test_issue_sas_reads_and_cannot_write(manager: Cli, tmp_path: Path) -> None:
    m, store = manager, manager.store  # type: ignore[attr-defined]
    m.ok(m.admin, "dataset", "register", "sasds", store.container_url("dsets", "imagenet"))
    m.ok(m.admin, "dataset", "grant", "sasds", "olive")
    olive = m.olive  # type: ignore[attr-defined]
    sas = m.ok(olive, "dataset", "issue-sas", "sasds").stdout.strip()
    assert "sig=" in sas and "\n" not in sas
    base = f"{store.blob_endpoint}/dsets"
    assert httpx.get(f"{base}/imagenet/a.txt?{sas}").content == b"alpha"
    assert httpx.put(f"{base}/imagenet/new.txt?{sas}", content=b"x",
                     headers={"x-ms-blob-type": "BlockBlob"}).status_code == 403

    out = tmp_path / "ds.sas"
    r = m.ok(olive, "dataset", "issue-sas", "sasds", "--out", str(out), "--ttl", "300")
    assert r.stdout.strip() == str(out) and "sig=" not in r.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert httpx.get(f"{base}/imagenet/sub/b.txt?{out.read_text().strip()}").content == b"beta"
    answer = m.json(olive, "dataset", "issue-sas", "sasds")
    assert answer["dataset"] == "sasds" and answer["scope"] == "container"
    assert answer["url"] == f"{base}?{answer['sas']}" and "sig=" in answer["sas"]
    assert answer["expires_at"]
    filed = m.json(olive, "dataset", "issue-sas", "sasds", "--out", str(out))
    assert "sas" not in filed and filed["file"] == str(out) and filed["url"] == base

    # not granted: the dataset does not exist for stan
    m.fails(m.stan, "dataset", "issue-sas", "sasds",  # type: ignore[attr-defined]
            code="dataset-not-found")
    m.fails(olive, "dataset", "issue-sas", "sasds", "--ttl", "5", code="invalid-argument")
    for text in m.printed:  # a SAS shows up only in the output of issue-sas itself
        if "sig=" in text:
            assert text.strip().startswith(("se=", "st=", "sv=", "sp=", "sr=", "sig=", "skoid"))\
                or '"sas": "' in text, text  # the plain or --json output of issue-sas
    assert "sig=" not in m.d.log.read_text()


def test_non_admins_cannot_change_the_catalog(manager: Cli) -> None:
    m, store = manager, manager.store  # type: ignore[attr-defined]
    m.ok(m.admin, "dataset", "register", "guarded", store.container_url("dsets"))
    olive = m.olive  # type: ignore[attr-defined]
    before = m.json(m.admin, "dataset", "catalog")
    err = m.fails(olive, "dataset", "register", "mine", store.container_url("dsets"),
                  "--shared", code="forbidden")
    assert "only admins" in err
    m.fails(olive, "dataset", "unregister", "guarded", code="forbidden")
    m.fails(olive, "dataset", "grant", "guarded", "olive", code="forbidden")
    m.fails(olive, "dataset", "revoke", "guarded", "olive", code="forbidden")
    assert m.json(m.admin, "dataset", "catalog") == before
    assert "guarded" not in _names(m, olive)


def test_bad_input_is_one_line_and_changes_nothing(manager: Cli) -> None:
    m, store = manager, manager.store  # type: ignore[attr-defined]
    m.ok(m.admin, "dataset", "register", "taken", store.container_url("dsets"))
    before = m.json(m.admin, "dataset", "catalog")
    url = store.container_url("dsets")
    for bad in ("a/b", "-x", "..", "x" * 65):
        m.fails(m.admin, "dataset", "register", "--", bad, url, code="invalid-argument")
    for bad_url in ("ftp://host/acct/dsets", "not a url", f"{store.blob_endpoint}/UPPER",
                    f"{store.blob_endpoint}", "https://acct.blob.core.windows.net/",
                    f"{url}/../x"):
        err = m.fails(m.admin, "dataset", "register", "newds", bad_url,
                      code="invalid-argument")
        assert "URL" in err or "prefix" in err
    sas_url = store.container_url("dsets", sas=store.container_sas("dsets"))
    err = m.fails(m.admin, "dataset", "register", "newds", sas_url, code="invalid-argument")
    assert "sig=" not in err
    m.fails(m.admin, "dataset", "register", "newds", f"{url}/imagenet", "--prefix", "x",
            code="invalid-argument")
    m.fails(m.admin, "dataset", "register", "newds", url, "--prefix", "../up",
            code="invalid-argument")
    m.fails(m.admin, "dataset", "register", "taken", url, code="dataset-exists")
    m.fails(m.admin, "dataset", "grant", "taken", "ghost", code="user-not-found")
    m.fails(m.admin, "dataset", "grant", "nope", "olive", code="dataset-not-found")
    m.fails(m.admin, "dataset", "grant", "taken", "a/b", code="invalid-argument")
    m.fails(m.admin, "dataset", "issue-sas", "nope", code="dataset-not-found")
    r = m.run(m.admin, "dataset", "register", "newds", url, "--shared", "--private")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    m.ok(m.admin, "dataset", "register", "elsewhere",
         "https://otheracct.blob.core.windows.net/dsets")
    m.fails(m.admin, "dataset", "issue-sas", "elsewhere", code="sas-unavailable")
    m.ok(m.admin, "dataset", "unregister", "elsewhere")
    assert m.json(m.admin, "dataset", "catalog") == before


def test_kernel_create_json_has_the_agents_mounts(manager: Cli,
                                                  agent: AgentHarness) -> None:  # noqa: F811
    m, store = manager, manager.store  # type: ignore[attr-defined]
    r = httpx.put(f"{m.d.url}/v1/agents/test-node", json={"socket": str(agent.socket),
                                                          "ttl": 0},
                  headers={"Authorization": f"Bearer {m.admin}"})
    assert r.status_code == 200, r.text
    m.ok(m.admin, "dataset", "register", "kds", store.container_url("dsets", "imagenet"),
         "--shared")
    olive = m.olive  # type: ignore[attr-defined]
    kernel = m.json(olive, "kernel", "create", "kj1", "--agent", "test-node",
                    "-d", "kds:/data/kds", "--no-dotfolders")
    try:
        assert kernel["kernel_id"] == "kj1" and kernel["owner"] == "olive"
        assert [v["alias"] for v in kernel["vfolders"]] == ["kds"]
        (mount,) = [mt for mt in kernel["mounts"] if mt["destination"] == "/data/kds"]
        assert "ro" in mount["options"]
        assert (Path(mount["source"]) / "a.txt").read_bytes() == b"alpha"
        assert "sig=" not in json.dumps(kernel)
        table = m.ok(olive, "kernel", "info", "kj1", "--json").stdout
        assert json.loads(table)["kernel_id"] == "kj1"
    finally:
        m.ok(olive, "kernel", "rm", "kj1")
    m.ok(m.admin, "dataset", "unregister", "kds")
