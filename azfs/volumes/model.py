"""The remote volume config: a typed model of the ``volumes:`` YAML scheme.

The scheme is the one of the concept azfs comes from::

    volumes:
      - name: azure-shard-1
        mount:
          at: requested            # or: startup
          fstype: cifs
          path: "//ACCOUNT.file.core.windows.net/vfolder"
          options: "vers=3.0,username=ACCOUNT,password=SECRET,dir_mode=0777"

Invariants of a parsed :class:`Volume`:

* ``mount.options`` never contains the password: a ``password=`` option is
  split off into ``mount.password`` (a :class:`~azfs.secret.Secret`), so that
  printing, logging or storing the options cannot leak it;
* names are safe as one path component and one etcd key segment;
* every error names the offending entry and field, in the form
  ``volumes[1].mount.at: must be 'startup' or 'requested'``, and all errors of
  a document are reported at once (up to a limit).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from azfs.errors import UserError
from azfs.secret import Secret

MountAt = Literal["startup", "requested"]
MOUNT_AT: tuple[str, ...] = ("startup", "requested")

#: Filesystem types azfs knows how to mount.  ``cifs``/``smb3`` get a
#: credentials file and the Azure Files defaults, ``bind`` is a local
#: directory, everything else is passed through to mount(8).
FSTYPES: tuple[str, ...] = (
    "cifs", "smb3", "bind", "nfs", "nfs4", "ext4", "xfs", "btrfs", "tmpfs",
    "ceph", "glusterfs", "lustre", "beegfs", "virtiofs", "9p",
)
#: fstypes that accept ``password=`` (moved to a credentials file at mount time).
CIFS_FSTYPES: tuple[str, ...] = ("cifs", "smb3")
#: Option names whose values are secrets and never stay in ``options``.
SECRET_OPTIONS: tuple[str, ...] = ("password", "pass")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: //HOST/SHARE[/SUBDIR...]; HOST is a DNS name or an IPv4 address.
CIFS_PATH_RE = re.compile(
    r"^//[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?/[^/\\\s]+(?:/[^/\\]+)*/?$")
OPTION_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

MAX_CONFIG_BYTES = 1024 * 1024
MAX_VOLUMES = 1024
MAX_PATH_LEN = 4096
MAX_OPTIONS_LEN = 4096
MAX_REPORTED_ERRORS = 10


class VolumeConfigError(UserError):
    """An invalid volume config; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        shown = self.errors[:MAX_REPORTED_ERRORS]
        more = len(self.errors) - len(shown)
        text = "; ".join(shown) + (f"; ... and {more} more" if more > 0 else "")
        super().__init__(f"invalid volume config: {text}")


@dataclass(frozen=True)
class MountSpec:
    """How and when a volume is mounted on a host.  ``options`` holds no secret."""

    at: MountAt
    fstype: str
    path: str
    options: str = ""
    password: Secret | None = None

    def option_items(self) -> list[tuple[str, str | None]]:
        """The options as ``(key, value)`` pairs; ``value`` is None for flags."""
        return split_options(self.options)


@dataclass(frozen=True)
class Volume:
    """One remote volume: a name (a path component) and its mount spec."""

    name: str
    mount: MountSpec

    def __repr__(self) -> str:  # the Secret already prints as ***; keep it short
        return f"Volume(name={self.name!r}, fstype={self.mount.fstype!r}, at={self.mount.at!r})"

    def with_password(self, password: Secret | str | None) -> Volume:
        secret = None if password is None else Secret(password)
        return replace(self, mount=replace(self.mount, password=secret))


def split_options(options: str) -> list[tuple[str, str | None]]:
    items: list[tuple[str, str | None]] = []
    for part in options.split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        items.append((key, value if sep else None))
    return items


def join_options(items: Iterable[tuple[str, str | None]]) -> str:
    return ",".join(k if v is None else f"{k}={v}" for k, v in items)


def validate_name(name: object, where: str = "name") -> str:
    """A volume name: 1-64 of ``[A-Za-z0-9._-]``, starting alphanumeric.

    Names become a directory under the state dir and an etcd key segment, so
    '/', '..', spaces, control and non-ASCII characters are refused.
    """
    if not isinstance(name, str):
        raise VolumeConfigError(f"{where}: must be a string, not {_type_name(name)}")
    if NAME_RE.fullmatch(name):
        return name
    if not name:
        why = "must not be empty"
    elif len(name) > 64:
        why = "must be at most 64 characters"
    elif "/" in name:
        why = "must not contain '/'"
    elif name in (".", "..") or not name[0].isalnum():
        why = "must start with a letter or digit"
    elif any(c.isspace() for c in name):
        why = "must not contain spaces"
    elif not name.isascii():
        why = "must be ASCII"
    else:
        why = "may contain only letters, digits, '.', '_' and '-'"
    raise VolumeConfigError(f"{where}: {why} (got {_shorten(name)!r})")


def parse_volumes(data: object) -> list[Volume]:
    """Validates a parsed YAML document ``{"volumes": [...]}`` into volumes.

    Raises :class:`VolumeConfigError` listing every problem found.
    """
    if not isinstance(data, Mapping):
        raise VolumeConfigError(
            f"the document must be a mapping with a 'volumes' list, not {_type_name(data)}")
    errors: list[str] = []
    unknown = sorted(str(k) for k in data if k != "volumes")
    if unknown:
        errors.append(f"unknown key(s) at top level: {', '.join(unknown)} (expected 'volumes')")
    if "volumes" not in data:
        raise VolumeConfigError([*errors, "volumes: missing (expected a list of volumes)"])
    entries = data["volumes"]
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise VolumeConfigError([*errors, f"volumes: must be a list, not {_type_name(entries)}"])
    if len(entries) > MAX_VOLUMES:
        raise VolumeConfigError(
            [*errors, f"volumes: {len(entries)} entries; at most {MAX_VOLUMES} are supported"])
    volumes: list[Volume] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"volumes[{index}]"
        entry_errors: list[str] = []
        volume = _parse_entry(entry, where, entry_errors)
        errors.extend(entry_errors)
        if volume is None:
            continue
        if volume.name in seen:
            errors.append(f"{where}.name: duplicate name {volume.name!r} "
                          f"(also volumes[{seen[volume.name]}])")
            continue
        seen[volume.name] = index
        volumes.append(volume)
    if errors:
        raise VolumeConfigError(errors)
    return volumes


def parse_volume(entry: object, where: str = "volume") -> Volume:
    """Validates one ``{"name": ..., "mount": {...}}`` entry."""
    errors: list[str] = []
    volume = _parse_entry(entry, where, errors)
    if errors or volume is None:
        raise VolumeConfigError(errors)
    return volume


def _parse_entry(entry: object, where: str, errors: list[str]) -> Volume | None:
    if not isinstance(entry, Mapping):
        errors.append(f"{where}: must be a mapping with 'name' and 'mount', "
                      f"not {_type_name(entry)}")
        return None
    for key in sorted(str(k) for k in entry if k not in ("name", "mount")):
        errors.append(f"{where}.{key}: unknown key (expected 'name' and 'mount')")
    name: str | None = None
    if "name" not in entry:
        errors.append(f"{where}.name: missing")
    else:
        try:
            name = validate_name(entry["name"], f"{where}.name")
        except VolumeConfigError as exc:
            errors.extend(exc.errors)
    mount = entry.get("mount")
    spec: MountSpec | None = None
    if "mount" not in entry:
        errors.append(f"{where}.mount: missing")
    elif not isinstance(mount, Mapping):
        errors.append(f"{where}.mount: must be a mapping with 'at', 'fstype', 'path', "
                      f"'options', not {_type_name(mount)}")
    else:
        spec = _parse_mount(mount, f"{where}.mount", errors)
    if name is None or spec is None:
        return None
    return Volume(name=name, mount=spec)


def _parse_mount(mount: Mapping, where: str, errors: list[str]) -> MountSpec | None:
    before = len(errors)
    for key in sorted(str(k) for k in mount if k not in ("at", "fstype", "path", "options")):
        errors.append(f"{where}.{key}: unknown key "
                      "(expected 'at', 'fstype', 'path', 'options')")
    at = _field(mount, "at", where, errors)
    if at is not None and at not in MOUNT_AT:
        errors.append(f"{where}.at: must be 'startup' or 'requested' (got {_shorten(at)!r})")
    fstype = _field(mount, "fstype", where, errors)
    if fstype is not None and fstype not in FSTYPES:
        errors.append(f"{where}.fstype: unknown fstype {_shorten(fstype)!r} "
                      f"(expected one of: {', '.join(FSTYPES)})")
        fstype = None
    path = _field(mount, "path", where, errors)
    if path is not None and fstype is not None:
        problem = _path_problem(fstype, path)
        if problem:
            errors.append(f"{where}.path: {problem}")
    options = mount.get("options", "")
    if options is None:
        options = ""
    password: Secret | None = None
    if not isinstance(options, str):
        errors.append(f"{where}.options: must be a string of comma-separated options, "
                      f"not {_type_name(options)}")
        options = ""
    else:
        options, password = _split_secret(options, fstype, f"{where}.options", errors)
    if len(errors) > before:
        return None
    assert at is not None and fstype is not None and path is not None
    return MountSpec(at=at, fstype=fstype, path=path, options=options,  # type: ignore[arg-type]
                     password=password)


def _field(mount: Mapping, key: str, where: str, errors: list[str]) -> str | None:
    if key not in mount or mount[key] is None or mount[key] == "":
        errors.append(f"{where}.{key}: missing")
        return None
    value = mount[key]
    if not isinstance(value, str):
        errors.append(f"{where}.{key}: must be a string, not {_type_name(value)}")
        return None
    return value


def _path_problem(fstype: str, path: str) -> str | None:
    if len(path) > MAX_PATH_LEN:
        return f"longer than {MAX_PATH_LEN} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "must not contain control characters"
    if fstype in CIFS_FSTYPES:
        if not CIFS_PATH_RE.fullmatch(path):
            return (f"malformed {fstype} path {_shorten(path)!r} "
                    "(expected //HOST/SHARE[/DIR], e.g. //ACCOUNT.file.core.windows.net/SHARE)")
        if ".." in path.split("/"):
            return "must not contain '..'"
    elif fstype == "bind":
        if not path.startswith("/"):
            return f"a bind volume needs an absolute local path (got {_shorten(path)!r})"
        if ".." in path.split("/"):
            return "must not contain '..'"
    elif fstype in ("nfs", "nfs4") and not re.fullmatch(r"[^:\s]+:/\S*", path):
        return f"malformed {fstype} path {_shorten(path)!r} (expected HOST:/EXPORT)"
    return None


def _split_secret(options: str, fstype: str | None, where: str,
                  errors: list[str]) -> tuple[str, Secret | None]:
    if len(options) > MAX_OPTIONS_LEN:
        errors.append(f"{where}: longer than {MAX_OPTIONS_LEN} characters")
        return "", None
    if any(ord(c) < 32 or ord(c) == 127 for c in options):
        errors.append(f"{where}: must not contain control characters or newlines")
        return "", None
    kept: list[tuple[str, str | None]] = []
    password: Secret | None = None
    for key, value in split_options(options.strip()):
        if not OPTION_KEY_RE.fullmatch(key):
            # only the name: the value may be a mistyped password
            errors.append(f"{where}: malformed option name {_shorten(key, 40)!r}")
            continue
        if key.lower() in SECRET_OPTIONS:
            if fstype is not None and fstype not in CIFS_FSTYPES:
                errors.append(f"{where}: {key}= is only supported for "
                              f"{'/'.join(CIFS_FSTYPES)} volumes (it would be on a command line)")
            elif password is not None:
                errors.append(f"{where}: password given more than once")
            elif not value:
                errors.append(f"{where}: {key}= has an empty value")
            else:
                password = Secret(value)
            continue
        kept.append((key, value))
    return join_options(kept), password


def options_with_password(mount: MountSpec, show_secrets: bool) -> str:
    """``options`` with the password put back (as ``***`` unless ``show_secrets``).

    The password goes right after ``username=`` when there is one, else last,
    which reproduces the concept's layout so import→export round-trips.
    """
    items = mount.option_items()
    if mount.password is None:
        return join_options(items)
    value = mount.password.reveal() if show_secrets else "***"
    at = next((i + 1 for i, (k, _) in enumerate(items) if k.lower() in ("username", "user")),
              len(items))
    items.insert(at, ("password", value))
    return join_options(items)


def dump_volume(volume: Volume, show_secrets: bool = False) -> dict[str, Any]:
    return {
        "name": volume.name,
        "mount": {
            "at": volume.mount.at,
            "fstype": volume.mount.fstype,
            "path": volume.mount.path,
            "options": options_with_password(volume.mount, show_secrets),
        },
    }


def dump_volumes(volumes: Iterable[Volume], show_secrets: bool = False) -> dict[str, Any]:
    """The YAML document for ``volumes``; passwords are ``***`` unless ``show_secrets``."""
    return {"volumes": [dump_volume(v, show_secrets) for v in volumes]}


def dump_yaml(volumes: Iterable[Volume], show_secrets: bool = False) -> str:
    return yaml.safe_dump(dump_volumes(volumes, show_secrets), sort_keys=False,
                          allow_unicode=True, default_flow_style=False)


def load_yaml_text(text: str | bytes, source: str = "<input>") -> list[Volume]:
    """Parses and validates a YAML document; refuses documents over 1 MiB."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_CONFIG_BYTES:
        raise VolumeConfigError(f"{source}: {size} bytes; a volume config may be at most "
                                f"{MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise VolumeConfigError(f"{source}: broken YAML at {where}{exc.problem}") from None
    except yaml.YAMLError as exc:
        raise VolumeConfigError(f"{source}: broken YAML: {exc}") from None
    return parse_volumes(data)


def load_yaml_file(path: str | Path) -> list[Volume]:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise VolumeConfigError(f"{path}: {size} bytes; a volume config may be at most "
                                    f"{MAX_CONFIG_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise VolumeConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise VolumeConfigError(f"{path}: not UTF-8 text") from None
    return load_yaml_text(text, str(path))


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number",
            float: "a number", bool: "a boolean"}.get(type(value), type(value).__name__)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
