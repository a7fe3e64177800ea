"""Validation of the names a client sends (aliases, user, dataset, agent names)."""

from __future__ import annotations

import re
import unicodedata
import uuid

from azfs.export import validate_component
from managerd.errors import InvalidArgument

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Names in the container's home that a vfolder must not shadow by accident.
RESERVED_ALIASES = frozenset({
    ".ssh", ".bashrc", ".bash_profile", ".bash_logout", ".bash_history", ".profile",
    ".zshrc", ".vimrc", ".tmux.conf", ".jupyter", ".ipython", ".local", ".config",
    ".cache", ".conda", ".condarc", ".npm", ".terminfo", ".linuxbrew", ".gitconfig",
})


def normalize(name: str) -> str:
    """Unicode NFC, so that "café" typed on two systems is one alias, not two look-alikes."""
    return unicodedata.normalize("NFC", name)


def validate_alias(alias: str, *, dotfolder: bool = False) -> str:
    """A vfolder alias: one path component of 1-64 chars, not an id, not reserved.

    Returns the alias in NFC.  Reserved names (``.ssh``, ``.bashrc``...) are
    accepted only with ``dotfolder=True``: the caller states that it means to
    replace that file.
    """
    alias = normalize(alias)
    try:
        validate_component(alias, "alias")
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    if alias != alias.strip():
        raise InvalidArgument("alias must not start or end with whitespace")
    if looks_like_id(alias):
        raise InvalidArgument("alias must not look like a vfolder id")
    if alias in RESERVED_ALIASES and not dotfolder:
        raise InvalidArgument(
            f"alias {alias!r} would shadow the container's own {alias}; "
            "set dotfolder=true if that is intended", code="reserved-name")
    return alias


def validate_name(name: str, what: str) -> str:
    """User, dataset and agent names: 1-64 of [A-Za-z0-9._-], starting alphanumeric."""
    if not NAME_RE.match(name):
        raise InvalidArgument(f"{what} must be 1-64 of [A-Za-z0-9._-], starting alphanumeric")
    return name


def looks_like_id(ref: str) -> bool:
    return parse_id(ref) is not None


def parse_id(ref: str) -> uuid.UUID | None:
    if len(ref) not in (32, 36):
        return None
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None
