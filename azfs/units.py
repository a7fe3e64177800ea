"""Human-friendly sizes for the CLI and config files ("10G", "512M", "1.5T")."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text`` (binary units); raises ``argparse.ArgumentTypeError`` when malformed."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512M, 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
