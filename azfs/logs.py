"""Logging set-up shared by the CLI and the daemons: one line per record, secrets masked."""

from __future__ import annotations

import logging
import sys

from azfs.secret import redact


class RedactingFormatter(logging.Formatter):
    """Masks SAS signatures, passwords and keys in every formatted record."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: int = logging.INFO, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The Azure SDK logs full request URLs (with SAS) at INFO; httpx logs every
    # request line (a manager's call to each agent) at INFO.
    for name in ("azure", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
