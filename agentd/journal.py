"""The agent's state journal: the exports it has promised, per kernel.

The journal is the truth about what this node exports; at start (and after
a fusehost restart) the agent brings the host mounts and the FUSE namespace
in line with it.  It is one JSON file in the state dir, rewritten whole and
atomically (temporary file, fsync, rename, fsync of the directory), mode
0600 because dataset SAS tokens are part of what must be restored.

Concurrent changes are group-committed: a change waits for the first write
that started after it, so N concurrent exports cost far fewer than N
rewrites and none returns before its change is on disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import trio

from azfs.errors import UserError
from azfs.files import atomic_write

log = logging.getLogger("agentd.journal")

VERSION = 1


class Journal:
    def __init__(self, path: Path, kernels: dict[str, dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.kernels: dict[str, dict[str, Any]] = kernels or {}
        #: each record's JSON, encoded once (records are never changed in place)
        self._encoded: dict[str, str] = {}
        self._lock = trio.Lock()
        self._generation = 0
        self._written = 0

    @classmethod
    def load(cls, path: Path) -> Journal:
        """The journal at ``path``; an empty one if there is none yet."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise UserError(f"journal {path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
            if data.get("version") != VERSION or not isinstance(data.get("kernels"), dict):
                raise ValueError("unknown layout")
        except (ValueError, AttributeError) as exc:
            raise UserError(f"journal {path} is unreadable ({exc}); move it away to start "
                            "without the recorded exports") from None
        return cls(path, data["kernels"])

    # ---- changes -------------------------------------------------------------------
    async def put(self, kernel_id: str, record: dict[str, Any]) -> None:
        self._encoded[kernel_id] = _encode(record)
        self.kernels[kernel_id] = record
        await self._commit()

    async def remove(self, kernel_id: str) -> None:
        self._encoded.pop(kernel_id, None)
        if self.kernels.pop(kernel_id, None) is not None:
            await self._commit()

    def text(self) -> str:
        """The file's content: the records' cached encodings joined, sorted by kernel."""
        parts = []
        for kernel_id in sorted(self.kernels):
            encoded = self._encoded.get(kernel_id)
            if encoded is None:
                encoded = self._encoded[kernel_id] = _encode(self.kernels[kernel_id])
            parts.append(f"{json.dumps(kernel_id)}:{encoded}")
        return f'{{"kernels":{{{",".join(parts)}}},"version":{VERSION}}}'

    async def _commit(self) -> None:
        self._generation += 1
        mine = self._generation
        with trio.CancelScope(shield=True):  # a change in memory must reach the disk
            async with self._lock:
                if self._written >= mine:
                    return
                upto = self._generation
                text = self.text()
                await trio.to_thread.run_sync(write_atomic, self.path, text)
                self._written = upto


def _encode(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def write_atomic(path: Path, text: str) -> None:
    """Replaces ``path`` (mode 0600) so that a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, 0o600)
