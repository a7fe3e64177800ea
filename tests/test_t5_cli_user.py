"""``azfs user``: the real CLI against a real ``azfs-managerd`` (hypercorn, SQLite).

One daemon per module on a free loopback port; each test makes users with
names of its own.  Checked: tables and ``--json``, authorization, bad input
(one line on stderr with the API's code, non-zero exit, nothing changed),
and that a token is printed only by ``azfs user token`` and never logged.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_t5_manager_api import _unmount_under
from tests.test_t5_manager_api_daemon import BIN, Daemon


class Cli:
    """A running manager, its admin token, and a way to run ``azfs`` as anyone."""

    def __init__(self, daemon: Daemon, admin: str) -> None:
        self.d = daemon
        self.admin = admin
        self.printed: list[str] = []  # every stdout/stderr seen, to look for leaked tokens

    def run(self, token: str | None, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "AZFS_MANAGER_URL": self.d.url, "COLUMNS": "200"}
        env.pop("AZFS_TOKEN", None)
        if token is not None:
            env["AZFS_TOKEN"] = token
        r = subprocess.run([str(BIN / "azfs"), *args], env=env, capture_output=True, text=True,
                           timeout=60)
        self.printed += [r.stdout, r.stderr]
        return r

    def ok(self, token: str | None, *args: str) -> subprocess.CompletedProcess:
        r = self.run(token, *args)
        assert r.returncode == 0, r.stderr
        return r

    def json(self, token: str | None, *args: str):
        return json.loads(self.ok(token, *args, "--json").stdout)

    def fails(self, token: str | None, *args: str, code: str | None) -> str:
        """Runs a command that must fail: one line on stderr, exit 1, the API's ``code``
        (``None``: a local error, refused before any request)."""
        r = self.run(token, *args)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stderr.startswith("azfs: ") and r.stderr.count("\n") == 1, r.stderr
        assert code is None or f"[{code}]" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
        return r.stderr

    def token_of(self, name: str) -> str:
        return self.ok(self.admin, "user", "token", name).stdout.strip()


@pytest.fixture(scope="module")
def manager() -> Iterator[Cli]:
    tmp = Path(tempfile.mkdtemp(prefix="azfs-cli-user-"))
    try:
        d = Daemon(tmp, f"sqlite:///{tmp / 'managerd.db'}")
        admin = d.create_user("admin", admin=True)
        with d.run():
            yield Cli(d, admin)
    finally:
        _unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_create_list_info_set(manager: Cli) -> None:
    m = manager
    r = m.ok(m.admin, "user", "create", "olive", "--uid", "1500", "--gid", "1600")
    assert "olive" in r.stdout and "1500" in r.stdout and "azfs_" not in r.stdout
    made = m.json(m.admin, "user", "create", "boss", "--admin")
    assert made["name"] == "boss" and made["admin"] is True and made["uid"] == 1000
    assert "token" not in made  # the first token is not shown: `user token` issues one

    users = {u["name"]: u for u in m.json(m.admin, "user", "ls")}
    assert {"admin", "olive", "boss"} <= set(users)
    assert (users["olive"]["uid"], users["olive"]["gid"], users["olive"]["admin"]) == \
        (1500, 1600, False)
    table = m.ok(m.admin, "user", "ls").stdout
    assert "olive" in table and "1600" in table

    info = m.json(m.admin, "user", "info", "olive")
    assert info == users["olive"]
    assert "1500" in m.ok(m.admin, "user", "info", "olive").stdout

    changed = m.json(m.admin, "user", "set", "olive", "--uid", "2000", "--admin")
    assert (changed["uid"], changed["gid"], changed["admin"]) == (2000, 1600, True)
    changed = m.json(m.admin, "user", "set", "olive", "--no-admin")
    assert (changed["uid"], changed["admin"]) == (2000, False)
    assert m.json(m.admin, "user", "info", "olive")["uid"] == 2000


def test_tokens_issue_whoami_revoke(manager: Cli, tmp_path: Path) -> None:
    m = manager
    m.ok(m.admin, "user", "create", "rhea")
    token = m.token_of("rhea")
    assert token.startswith("azfs_") and "\n" not in token
    me = m.json(token, "user", "whoami")
    assert me["name"] == "rhea" and me["admin"] is False
    assert "rhea" in m.ok(token, "user", "whoami").stdout
    assert m.json(token, "user", "info", "rhea")["name"] == "rhea"  # yourself: allowed

    out = tmp_path / "rhea.token"
    r = m.ok(m.admin, "user", "token", "rhea", "--out", str(out), "--label", "ci")
    assert r.stdout.strip() == str(out) and "azfs_" not in r.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    filed = out.read_text().strip()
    assert filed.startswith("azfs_") and filed != token
    assert m.json(filed, "user", "whoami")["name"] == "rhea"
    as_json = m.json(m.admin, "user", "token", "rhea")
    assert as_json["user"] == "rhea" and as_json["token"].startswith("azfs_")

    # a user may revoke their own tokens; every one of them stops working
    assert m.json(token, "user", "revoke", "rhea") == {"user": "rhea", "tokens_revoked": True}
    for old in (token, filed, as_json["token"]):
        m.fails(old, "user", "whoami", code="unauthenticated")
    fresh = m.token_of("rhea")
    assert m.json(fresh, "user", "whoami")["name"] == "rhea"
    r = m.ok(m.admin, "user", "revoke", "rhea")
    assert "revoked" in r.stdout
    m.fails(fresh, "user", "whoami", code="unauthenticated")

    # no --out directory: refused before a token is issued
    m.fails(m.admin, "user", "token", "rhea", "--out", str(tmp_path / "no" / "t"),
            code=None)  # a local error: no API code, still one line
    assert not (tmp_path / "no").exists()


def test_non_admins_are_refused_and_nothing_changes(manager: Cli) -> None:
    m = manager
    m.ok(m.admin, "user", "create", "pleb", "--uid", "1700")
    pleb = m.token_of("pleb")
    before = m.json(m.admin, "user", "ls")
    err = m.fails(pleb, "user", "create", "mallory", code="forbidden")
    assert "only admins" in err
    m.fails(pleb, "user", "create", "mallory", "--admin", code="forbidden")
    m.fails(pleb, "user", "ls", code="forbidden")
    m.fails(pleb, "user", "info", "admin", code="forbidden")
    m.fails(pleb, "user", "set", "pleb", "--admin", code="forbidden")
    m.fails(pleb, "user", "token", "admin", code="forbidden")
    m.fails(pleb, "user", "revoke", "admin", code="forbidden")
    assert m.json(m.admin, "user", "ls") == before
    assert m.json(m.admin, "user", "whoami")["name"] == "admin"  # admin's token still works
    m.fails(None, "user", "whoami", code=None)  # no token at all: a clear local error
    m.fails("azfs_wrong", "user", "ls", code="unauthenticated")


def test_bad_input_is_one_line_and_changes_nothing(manager: Cli) -> None:
    m = manager
    m.ok(m.admin, "user", "create", "dup")
    before = m.json(m.admin, "user", "ls")
    for bad in ("a/b", "-x", "..", "with space", "x" * 65, "é"):
        err = m.fails(m.admin, "user", "create", "--", bad, code="invalid-argument")
        assert "user name" in err
    m.fails(m.admin, "user", "create", "dup", code="user-exists")
    m.fails(m.admin, "user", "info", "ghost", code="user-not-found")
    m.fails(m.admin, "user", "token", "ghost", code="user-not-found")
    m.fails(m.admin, "user", "revoke", "ghost", code="user-not-found")
    m.fails(m.admin, "user", "set", "ghost", "--uid", "5", code="user-not-found")
    m.fails(m.admin, "user", "info", "a/b", code="invalid-argument")
    m.fails(m.admin, "user", "set", "dup", code=None)  # nothing to change
    m.fails(m.admin, "user", "set", "admin", "--no-admin", code="invalid-argument")
    for bad_id in ("-1", "4294967295", "abc"):  # argparse: one usage line, exit 2
        r = m.run(m.admin, "user", "create", "newbie", "--uid", bad_id)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert m.json(m.admin, "user", "ls") == before


def test_tokens_are_never_printed_elsewhere_nor_logged(manager: Cli) -> None:
    """Runs last in the module: looks at everything printed and at the manager's log."""
    m = manager
    m.ok(m.admin, "user", "create", "quiet")
    issued = [m.token_of("quiet")]
    issued.append(m.json(m.admin, "user", "token", "quiet")["token"])
    for text in m.printed:
        assert m.admin not in text
        if "azfs_" in text:  # only the output of `user token` itself holds a token
            assert text.strip().startswith("azfs_") or '"token": "azfs_' in text, text
    log = m.d.log.read_text()
    assert "azfs_" not in log and m.admin not in log
    assert all(t not in log for t in issued)
