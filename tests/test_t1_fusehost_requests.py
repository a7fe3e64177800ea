"""The node FUSE process's request socket: only bad input is ``invalid``.

A :class:`~agentd.views.FuseHost` serves its JSON-lines API on a real unix
socket (no FUSE mount is needed for these requests).  Requests whose fields
have the wrong JSON types are refused with ``invalid`` and change nothing; a
fault inside the process (injected here by a subclass, the one thing a
request cannot provoke on purpose) is logged and answered ``internal``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from agentd.hostrpc import ControlServer
from agentd.views import FuseHost
from azfs.fs.operations import AzfsOperations


class FaultyHost(FuseHost):
    """A host whose ``stats`` and ``health`` have bugs of the kinds once taken for bad input."""

    def stats(self) -> dict:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    def health(self) -> dict:
        raise ValueError("invalid literal for int() with base 10: 'x'")


async def _ask(sock: Path, *lines: bytes) -> list[dict]:
    stream = await trio.open_unix_socket(str(sock))
    async with stream:
        await stream.send_all(b"".join(line + b"\n" for line in lines))
        buf = b""
        while buf.count(b"\n") < len(lines):
            data = await stream.receive_some(65536)
            assert data, "the host closed the connection"
            buf += data
    return [json.loads(x) for x in buf.splitlines()]


@pytest.fixture
async def host(tmp_path: Path, nursery):
    h = FaultyHost(AzfsOperations(), tmp_path / "mnt")
    sock = tmp_path / "host.sock"
    await nursery.start(ControlServer(h).serve, sock)
    yield h, sock
    await h.close_all()


def req(**fields) -> bytes:
    return json.dumps(fields).encode()


POSIX = {"kind": "posix", "volume_root": "/nonexistent", "path": "vf"}
BAD_REQUESTS = [
    b"not json",
    b"\xff\xfe",
    b"[1, 2]",
    req(op="nope"),
    req(op="attach", path="a/b", backend=POSIX),
    req(op="attach", path=["a", 7], backend=POSIX),
    req(op="attach", path=["a"], view=[1], backend=POSIX),
    req(op="attach", path=["a"], view={"read_only": "yes"}, backend=POSIX),
    req(op="attach", path=["a"], view={"uid": -1}, backend=POSIX),
    req(op="attach", path=["a"], view={"uid": True}, backend=POSIX),
    req(op="attach", path=["a"], view={"label": ["x"]}, backend=POSIX),
    req(op="attach", path=["a"], backend=[POSIX]),
    req(op="attach", path=["a"], backend={"kind": 3}),
    req(op="attach", path=["a"], backend={**POSIX, "quota_bytes": "lots"}),
    req(op="attach", path=["a"], backend={**POSIX, "quota_files": 1.5}),
    req(op="attach", path=["a"], backend={**POSIX, "volume_root": 1}),
    req(op="attach", path=["a"], backend={"kind": "blob", "url": 1, "sas": "x"}),
    req(op="attach", path=["a"], backend={"kind": "blob", "url": "u", "sas_url": {}}),
    req(op="attach", path=["a"], digest=5, backend=POSIX),
    req(op="detach", path=[]),
    req(op="detach", path={"a": 1}),
]


@pytest.mark.parametrize("line", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
async def test_bad_input_is_invalid_and_changes_nothing(host, line: bytes, caplog) -> None:
    h, sock = host
    (answer,) = await _ask(sock, line)
    assert answer["ok"] is False and answer["code"] == "invalid", answer
    assert answer["message"]
    assert "Traceback" not in caplog.text
    (listed,) = await _ask(sock, req(op="list"))
    assert listed == {"ok": True, "result": {"views": [], "backends": 0}}


async def test_an_internal_fault_is_logged_and_answered_internal(host, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="agentd.fusehost")
    h, sock = host
    stats, health, listed = await _ask(sock, req(op="stats"), req(op="health"), req(op="list"))
    assert stats["ok"] is False and stats["code"] == "internal", stats
    assert health["ok"] is False and health["code"] == "internal", health
    assert caplog.text.count("request failed") == 2
    assert "TypeError" in caplog.text and "ValueError" in caplog.text
    # the socket outlives the fault
    assert listed["ok"] is True
