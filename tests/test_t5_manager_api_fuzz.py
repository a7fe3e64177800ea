"""Fuzzing the manager's API from its own OpenAPI spec (schemathesis): no 500s.

The daemon runs as a subprocess on SQLite and on PostgreSQL (a ``bind`` host
volume); the schemathesis CLI generates valid and invalid requests for every
operation as an admin, so that admin-only paths are reached too: the
fuzzing phase on both databases (``EXAMPLES`` random cases per operation, a
fresh seed per run unless ``AZFS_FUZZ_SEED`` is set; a failure names the seed
to replay it), and on SQLite also the coverage phase (boundary values of
every parameter: nearly all are refused by validation before the database is
reached, so one database is enough, and the suite stays within its budget).  It fails
on any 5xx the API does not document (502 and 503 are its answers for an
unreachable agent, a missing account key or volume, each with its code and an
error body the schema check validates), any answer that does not match its
published schema, and any internal error in the daemon's log.  Token
revocation is left out: schemathesis reuses names from earlier answers and
would revoke its own token, leaving the rest of the run at 401.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.postgres import postgres  # noqa: F401
from tests.test_t5_manager_api import tmp_dir  # noqa: F401
from tests.test_t5_manager_api_daemon import Daemon, daemon  # noqa: F401

BIN = Path(sys.executable).parent
#: random cases per operation and database (35 operations: about 500 requests each)
EXAMPLES = 20
CONFIG = """\
[checks.not_a_server_error]
# the documented 5xx of every operation (managerd/errors.py); a 500 or 504 fails
expected-statuses = ["1XX", "2XX", "3XX", "4XX", "502", "503"]
"""


@pytest.mark.parametrize("daemon", ["sqlite", "postgresql"], indirect=True)
def test_fuzz_from_openapi_no_server_errors(daemon: Daemon, request) -> None:  # noqa: F811
    d = daemon
    backend = request.node.callspec.params["daemon"]
    seed = int(os.environ.get("AZFS_FUZZ_SEED") or random.randrange(2**31))
    config = d.tmp / "schemathesis.toml"
    config.write_text(CONFIG)
    admin = d.create_user("admin", admin=True)
    d.create_user("olive")
    with d.run():
        with d.client(admin) as c:
            assert c.post("/v1/vfolders", json={"alias": "seed"}).status_code == 201
        result = subprocess.run(
            [str(BIN / "schemathesis"), "--config-file", str(config), "run",
             f"{d.url}/openapi.json",
             "--checks", "not_a_server_error,response_schema_conformance",
             "--max-examples", str(EXAMPLES), "--seed", str(seed),
             "--phases", "coverage,fuzzing" if backend == "sqlite" else "fuzzing",
             "--workers", "2", "--no-color",
             "--exclude-operation-id", "revoke_tokens_v1_users__name__tokens_delete",
             "--request-timeout", "20", "--generation-database", "none",
             "--header", f"Authorization: Bearer {admin}"],
            capture_output=True, text=True, timeout=240, cwd=d.tmp)
        log = d.log.read_text(errors="replace")
    replay = f"(replay with AZFS_FUZZ_SEED={seed})\n"
    assert result.returncode == 0, replay + result.stdout[-4000:] + result.stderr[-2000:]
    assert "Authentication failed" not in result.stdout, replay + result.stdout[-4000:]
    assert "Tested: 37" in result.stdout, replay + result.stdout[-4000:]
    assert "internal error" not in log, replay + log[-4000:]
    assert "Traceback" not in log, replay + log[-4000:]
