"""Polling with a deadline, instead of a fixed sleep before an assert.

A test waits for the state it expects and fails with ``what`` when the state
does not come in time; the timeout is a hang guard, never a timing assertion.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "",
               interval: float = 0.02) -> None:
    """Blocks until ``predicate()`` is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what or predicate}")
        time.sleep(interval)


async def until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "",
                interval: float = 0.02) -> None:
    """:func:`wait_until` for trio tests (the event loop keeps running meanwhile)."""
    deadline = trio.current_time() + timeout
    while not predicate():
        if trio.current_time() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what or predicate}")
        await trio.sleep(interval)
