"""Fuzzing the manager's API from its own OpenAPI spec (schemathesis): no 500s.

The daemon runs as a subprocess (SQLite, a ``bind`` host volume); the
schemathesis CLI generates valid and invalid requests for every operation
(bounded: a few examples per operation, fixed seed) as an admin, so that
admin-only paths are reached too, and fails on any server error or any
answer that does not match its published schema.  Token revocation is left
out: schemathesis reuses names from earlier answers and would revoke its own
token, leaving the rest of the run at 401.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_t5_manager_api import tmp_dir  # noqa: F401
from tests.test_t5_manager_api_daemon import Daemon, daemon  # noqa: F401

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("daemon", ["sqlite"], indirect=True)
def test_fuzz_from_openapi_no_server_errors(daemon: Daemon) -> None:  # noqa: F811
    d = daemon
    admin = d.create_user("admin", admin=True)
    d.create_user("olive")
    with d.run():
        with d.client(admin) as c:
            assert c.post("/v1/vfolders", json={"alias": "seed"}).status_code == 201
        result = subprocess.run(
            [str(BIN / "schemathesis"), "run", f"{d.url}/openapi.json",
             "--checks", "not_a_server_error,response_schema_conformance",
             "--max-examples", "6", "--seed", "1234",
             "--phases", "examples,coverage,fuzzing", "--workers", "2", "--no-color",
             "--exclude-operation-id", "revoke_tokens_v1_users__name__tokens_delete",
             "--request-timeout", "20", "--generation-database", "none",
             "--header", f"Authorization: Bearer {admin}"],
            capture_output=True, text=True, timeout=240, cwd=d.tmp)
        log = d.log.read_text(errors="replace")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Authentication failed" not in result.stdout, result.stdout[-4000:]
    assert "internal error" not in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
