"""Fuzzing the agent's control API on its unix socket from its own OpenAPI spec (schemathesis).

A real ``azfs-agentd`` (bind volumes, its FUSE process) serves its socket; a
byte-for-byte TCP forwarder lets the schemathesis CLI reach it.  The run is
bounded (a few examples per operation, fixed seed, one worker so that the
recorded order is the order of the requests) and fails on any server error
or any answer that does not match its published schema.
Afterwards the agent must still be alive and healthy, and must hold exactly
the kernels whose last export succeeded: a malformed request exports
nothing, and leaves no view in the FUSE namespace and no volume mounted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from azfs.export import ExportRequest
from tests.support.agent import AgentHarness, agent  # noqa: F401
from tests.support.uds_proxy import tcp_to_unix

BIN = Path(sys.executable).parent


def _expected_kernels(har: dict) -> set[str]:
    """Replays the recorded requests: the kernels the agent should hold at the end."""
    kernels: set[str] = set()
    for entry in har["log"]["entries"]:
        method, status = entry["request"]["method"], entry["response"]["status"]
        parts = urlsplit(entry["request"]["url"]).path.split("/")
        if len(parts) != 4 or parts[1:3] != ["v1", "kernels"]:
            continue
        kernel = unquote(parts[3])
        if method == "PUT" and 200 <= status < 300:
            kernels.add(kernel)
        elif method == "DELETE" and 200 <= status < 300:
            kernels.discard(kernel)
    return kernels


def test_fuzz_the_socket_api_no_server_errors_nothing_half_done(
        agent: AgentHarness, tmp_path: Path) -> None:  # noqa: F811
    agent.vfolder("vol1", "vf-1")  # so that a guessed valid export can succeed too
    har = tmp_path / "fuzz.har"
    with tcp_to_unix(agent.socket) as port:
        result = subprocess.run(
            [str(BIN / "schemathesis"), "run", f"http://127.0.0.1:{port}/openapi.json",
             "--checks", "not_a_server_error,response_schema_conformance",
             "--max-examples", "8", "--seed", "1234",
             "--phases", "examples,coverage,fuzzing", "--workers", "1", "--no-color",
             "--request-timeout", "20", "--generation-database", "none",
             "--report", "har", "--report-har-path", str(har)],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)
    log = agent.log.read_text(errors="replace")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Traceback" not in log, log[-4000:]
    recorded = json.loads(har.read_text())
    assert len(recorded["log"]["entries"]) > 50  # the run really reached the agent

    assert agent.proc is not None and agent.proc.poll() is None, "the agent died"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)),
                      base_url="http://agent", timeout=30) as http:
        assert http.get("/v1/health").status_code == 200
        held = {k["kernel_id"]: k for k in http.get("/v1/kernels").json()["kernels"]}
    assert set(held) == _expected_kernels(recorded)
    views = agent.mountpoint / "kernels"
    assert {p.name for p in views.iterdir()} == set(held) if views.exists() else not held
    journal = json.loads((agent.state_dir / "journal.json").read_text())["kernels"]
    assert set(journal) == set(held)
    for record in journal.values():  # what the agent holds came from a well-formed request
        ExportRequest.model_validate(record["request"])
    # no requested volume stays mounted for a kernel the agent does not hold
    if not held:
        assert set(agent.volume_mounts()) <= {"datasets"}  # the startup volume
