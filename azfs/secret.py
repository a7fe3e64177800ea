"""A wrapper that keeps secrets out of logs, reprs and error messages."""

from __future__ import annotations

import re


class Secret:
    """Holds a secret string; ``str``/``repr``/f-strings show ``***``.

    The value is reachable only through :meth:`reveal`, so that every place
    that really needs it is greppable.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        self._value = str(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


_SAS_SIG = re.compile(r"(?i)(\bsig=)[^&\s\"']+")
_KV_SECRET = re.compile(
    r"(?i)\b(password|pass|accountkey|account_key|key|token|secret|sig)=([^,;&\s\"']+)"
)


def redact(text: str) -> str:
    """Masks secret-looking ``key=value`` pairs (SAS ``sig=``, ``password=``...)."""
    text = _SAS_SIG.sub(r"\1***", text)
    return _KV_SECRET.sub(lambda m: f"{m.group(1)}=***", text)
