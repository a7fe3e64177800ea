"""``azfs dataset`` as a whole program against a real Azurite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import ContainerClient

from azfs.blob.url import parse_blob_url
from tests.support.azurite import azurite  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(azurite, tmp_path):  # noqa: F811
    """Runs ``azfs ...`` with the account in the environment; checks no key leaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE")}
    env.update(AZURE_STORAGE_ACCOUNT=azurite.account, AZURE_STORAGE_KEY=azurite.key,
               AZURE_STORAGE_BLOB_ENDPOINT=azurite.blob_endpoint, PYTHONPATH=str(ROOT))

    def run(*args: str, ok: bool = True, extra_env: dict[str, str] | None = None):
        res = subprocess.run([sys.executable, "-m", "azfs.cli.main", *args],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={**env, **(extra_env or {})})
        assert azurite.key not in res.stdout + res.stderr
        assert "Traceback" not in res.stderr
        if ok:
            assert res.returncode == 0, res.stderr
        else:
            assert res.returncode != 0, res.stdout
            assert res.stderr.startswith("azfs: "), res.stderr
        return res

    return run


def make_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.json").write_text("{}\n")
    (root / "sub" / "c.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))


def test_create_is_clear_about_existing_and_invalid_names(run):
    assert "created" in run("dataset", "create", "cli-create").stdout
    res = run("dataset", "create", "cli-create", ok=False)
    assert "already exists" in res.stderr
    run("dataset", "create", "cli-create", "--exist-ok")
    res = run("dataset", "create", "Bad_Name", ok=False)
    assert "not a valid container name" in res.stderr


def test_upload_tree_guesses_content_types_and_resumes(run, azurite, tmp_path):  # noqa: F811
    tree = tmp_path / "tree"
    make_tree(tree)
    run("dataset", "create", "cli-upload")
    res = run("dataset", "upload", str(tree), "cli-upload/set1")
    assert "uploaded 3 files, 0 unchanged skipped" in res.stdout
    client = azurite.service_client().get_container_client("cli-upload")
    types = {b.name: b.content_settings.content_type
             for b in client.list_blobs(name_starts_with="set1/")}
    assert types == {"set1/a.txt": "text/plain", "set1/sub/b.json": "application/json",
                     "set1/sub/c.bin": "application/octet-stream"}
    data = client.download_blob("set1/sub/c.bin").readall()
    assert data == (tree / "sub" / "c.bin").read_bytes()
    # an interrupted run left a blob missing; one file changed; one is new
    client.delete_blob("set1/a.txt")
    (tree / "sub" / "b.json").write_text('{"changed": true}\n')
    (tree / "new.txt").write_text("new\n")
    res = run("dataset", "upload", str(tree), "cli-upload/set1")
    assert "uploaded 3 files, 1 unchanged skipped" in res.stdout
    assert client.download_blob("set1/sub/b.json").readall() == b'{"changed": true}\n'
    res = run("dataset", "upload", str(tree), "cli-upload/set1")
    assert "uploaded 0 files, 4 unchanged skipped" in res.stdout
    res = run("dataset", "upload", str(tree / "a.txt"), "cli-upload/one",
              "--content-type", "application/x-custom")
    assert client.get_blob_client("one/a.txt").get_blob_properties() \
        .content_settings.content_type == "application/x-custom"


def test_ls_shows_levels_and_sizes(run, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree)
    run("dataset", "create", "cli-ls")
    run("dataset", "upload", str(tree), "cli-ls")
    assert "cli-ls/" in run("dataset", "ls").stdout
    top = run("dataset", "ls", "cli-ls").stdout
    assert "a.txt" in top and "sub/" in top and "c.bin" not in top
    deep = run("dataset", "ls", "cli-ls", "-r").stdout
    assert f"{3 * 1024 * 1024 + 17}" in deep and "sub/c.bin" in deep
    res = run("dataset", "ls", "no-such-container", ok=False)
    assert "does not exist" in res.stderr


def test_sas_is_read_only_unless_asked_and_get_downloads(run, azurite, tmp_path):  # noqa: F811
    tree = tmp_path / "tree"
    make_tree(tree)
    run("dataset", "create", "cli-sas")
    run("dataset", "upload", str(tree), "cli-sas")
    url = run("dataset", "sas", "cli-sas", "--url", "--hours", "1").stdout.strip()
    source = parse_blob_url(url)
    assert source.container == "cli-sas" and source.sas is not None
    reader = ContainerClient.from_container_url(url)
    assert {b.name for b in reader.list_blobs()} >= {"a.txt", "sub/c.bin"}
    with pytest.raises(HttpResponseError) as info:
        reader.upload_blob("x", b"x")
    assert info.value.status_code == 403
    writer = ContainerClient.from_container_url(
        run("dataset", "sas", "cli-sas", "--url", "--write").stdout.strip())
    writer.upload_blob("written.txt", b"w")

    blob_url = url.replace("/cli-sas?", "/cli-sas/sub/c.bin?")
    res = run("dataset", "get", blob_url, str(tmp_path / "out.bin"))
    assert "downloaded" in res.stdout
    assert (tmp_path / "out.bin").read_bytes() == (tree / "sub" / "c.bin").read_bytes()

    sas_file = tmp_path / "sas.txt"
    sas_file.write_text(run("dataset", "sas", "cli-sas").stdout)
    (tmp_path / "dl").mkdir()
    run("dataset", "get", f"{azurite.blob_endpoint}/cli-sas/a.txt", str(tmp_path / "dl"),
        "--sas-file", str(sas_file))
    assert (tmp_path / "dl" / "a.txt").read_text() == "alpha\n"

    forged = url.split("sig=")[0] + "sig=" + "A" * 43 + "%3D"
    res = run("dataset", "get", forged.replace("/cli-sas?", "/cli-sas/a.txt?"),
              str(tmp_path / "forged.txt"), ok=False)
    assert "refused" in res.stderr
    assert not list(tmp_path.glob("*forged*"))
    res = run("dataset", "get", url.replace("/cli-sas?", "/cli-sas/missing?"),
              str(tmp_path / "missing"), ok=False)
    assert "not found" in res.stderr


def test_missing_or_wrong_credentials_are_clear(run, azurite):  # noqa: F811
    res = run("dataset", "ls", ok=False, extra_env={"AZURE_STORAGE_KEY": ""})
    assert "AZURE_STORAGE_CONNECTION_STRING" in res.stderr
    wrong = "d3Jvbmcga2V5IGZvciB0ZXN0aW5nIG9ubHk="
    res = run("dataset", "ls", "cli-create", "--account-key", wrong, ok=False)
    assert "refused the credentials" in res.stderr and wrong not in res.stderr
    res = run("dataset", "ls", ok=True, extra_env={
        "AZURE_STORAGE_ACCOUNT": "", "AZURE_STORAGE_KEY": "",
        "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string})
    assert res.returncode == 0
