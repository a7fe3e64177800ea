"""The agent's configuration: one typed :class:`Config`, read from TOML, validated once.

Layering: defaults → the TOML file → command-line flags.  Example::

    agent_id = "node-17"                      # default: the host name
    state_dir = "/var/lib/azfs/agent"         # journal, volume mounts, fusehost socket
    fuse_mountpoint = "/var/lib/azfs/agent/fuse"
    socket = "/run/azfs/agent.sock"           # the control API
    socket_mode = "0660"
    socket_group = "azfs"                     # optional
    unmount_on_exit = false                   # see agentd.main
    bind_startup_volumes = true               # /home/work/<volume> in every kernel
    xattrs = false                            # extended attributes (user.*) in views
    listing_entries = 500000                  # blob listings cached (about 0.4 KiB each)
    max_body_bytes = 1048576

    [store]                                   # where the volume config lives
    etcd = "10.0.0.1:2379"                    # or:
    # volumes_file = "/etc/azfs/volumes.yaml"

    [cache]                                   # blob datasets' node-wide block cache
    dir = "/var/cache/azfs"
    size = "20G"

    [volume_io]                               # each host volume's own worker threads
    threads = 32                              # per volume: one hung share holds only these
    metadata_deadline = 10.0                  # seconds; a call past it fails (ETIMEDOUT)
    data_deadline = 30.0                      # read, write, fsync
    mode = "auto"                             # threads; inline on a local filesystem

    [manager]                                 # optional: the manager on another host
    listen = "0.0.0.0:7520"
    secret_file = "/etc/azfs/agent.secret"    # bearer token, required with listen
    cert_file = "/etc/azfs/tls/agent.pem"     # serve TLS (with key_file); the
    key_file = "/etc/azfs/tls/agent.key"      #   manager checks it against its CA
    client_ca_file = "/etc/azfs/tls/ca.pem"   # optional: require a manager certificate
    advertise = "https://node-17.cluster:7520" # what the etcd registration tells managers

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import argparse
import grp
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from azfs.errors import UserError
from azfs.secret import Secret
from azfs.units import parse_size
from azfs.volumes.io import IOLimits

DEFAULT_CONFIG = Path("/etc/azfs/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/azfs/agent")
DEFAULT_SOCKET = Path("/run/azfs/agent.sock")
DEFAULT_MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Config:
    agent_id: str = field(default_factory=socket.gethostname)
    state_dir: Path = DEFAULT_STATE_DIR
    fuse_mountpoint: Path | None = None
    socket: Path = DEFAULT_SOCKET
    socket_mode: int = 0o660
    socket_group: str | None = None
    etcd: str | None = None
    volumes_file: Path | None = None
    cache_dir: Path | None = None
    cache_bytes: int = 0
    manager_listen: str | None = None
    manager_secret_file: Path | None = None
    #: the URL a manager on another host uses (registered in etcd); default from listen
    manager_advertise: str | None = None
    #: TLS of the TCP listener: certificate chain and key (PEM files, the key 0600)
    manager_cert_file: Path | None = None
    manager_key_file: Path | None = None
    #: mutual TLS: the CA whose certificates a manager must present (None: no client cert)
    manager_client_ca_file: Path | None = None
    unmount_on_exit: bool = False
    bind_startup_volumes: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY
    #: uid/gid given to cifs host mounts (files of a volume as the agent sees them)
    volume_uid: int = 0
    volume_gid: int = 0
    registration_ttl: int = 30
    watchdog_interval: float = 2.0
    volume_io: IOLimits = field(default_factory=IOLimits)
    #: serve extended attributes; off, every write() and ``ls -l`` entry costs less
    xattrs: bool = False
    #: blob listing entries the fusehost caches (all datasets together)
    listing_entries: int = 500_000
    debug: bool = False

    # ---- derived paths -----------------------------------------------------------
    @property
    def mountpoint(self) -> Path:
        return self.fuse_mountpoint or self.state_dir / "fuse"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.json"

    @property
    def fusehost_socket(self) -> Path:
        return self.state_dir / "run" / "fusehost.sock"

    @property
    def fusehost_pid_file(self) -> Path:
        return self.state_dir / "run" / "fusehost.pid"

    @property
    def fusehost_log(self) -> Path:
        return self.state_dir / "fusehost.log"

    @property
    def socket_gid(self) -> int | None:
        if self.socket_group is None:
            return None
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise UserError(f"socket_group {self.socket_group!r}: no such group") from None

    @property
    def manager_url(self) -> str | None:
        """The URL registered for remote managers (None: reach the agent by its socket)."""
        if self.manager_advertise:
            return self.manager_advertise
        if not self.manager_listen:
            return None
        scheme = "https" if self.manager_tls else "http"
        host = self.manager_listen.rsplit(":", 1)[0].strip("[]")
        if host in ("0.0.0.0", "::", ""):
            return f"{scheme}://{socket.gethostname()}:{self.manager_listen.rsplit(':', 1)[1]}"
        return f"{scheme}://{self.manager_listen}"

    @property
    def manager_tls(self) -> bool:
        """True if the TCP listener serves TLS (a certificate and its key are configured)."""
        return self.manager_cert_file is not None

    def manager_secret(self) -> Secret | None:
        if self.manager_secret_file is None:
            return None
        try:
            text = self.manager_secret_file.read_text().strip()
        except OSError as exc:
            raise UserError(f"manager secret file {self.manager_secret_file}: "
                            f"{exc.strerror}") from None
        if len(text) < 16:
            raise UserError(f"manager secret file {self.manager_secret_file}: "
                            "the secret must be at least 16 characters")
        return Secret(text)

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: Path) -> Config:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path}: does not exist") from None
        except OSError as exc:
            raise UserError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"config file {path}: {exc}") from None
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "config") -> Config:
        data = dict(data)
        values: dict[str, Any] = {}
        store = _table(data.pop("store", {}), f"{where}: [store]", {"etcd", "volumes_file"})
        cache = _table(data.pop("cache", {}), f"{where}: [cache]", {"dir", "size"})
        manager = _table(data.pop("manager", {}), f"{where}: [manager]",
                         {"listen", "secret_file", "advertise", "cert_file", "key_file",
                          "client_ca_file"})
        io = _table(data.pop("volume_io", {}), f"{where}: [volume_io]",
                    {"threads", "metadata_deadline", "data_deadline", "mode"})
        simple = {"agent_id": str, "state_dir": Path, "fuse_mountpoint": Path, "socket": Path,
                  "socket_mode": _mode, "socket_group": str, "unmount_on_exit": bool,
                  "bind_startup_volumes": bool, "max_body_bytes": _size, "volume_uid": int,
                  "volume_gid": int, "registration_ttl": int, "watchdog_interval": float,
                  "xattrs": bool, "listing_entries": int, "debug": bool}
        for key, value in data.items():
            conv = simple.get(key)
            if conv is None:
                raise UserError(f"{where}: unknown key {key!r}")
            values[key] = _convert(conv, value, f"{where}: {key}")
        if "etcd" in store:
            values["etcd"] = _convert(str, store["etcd"], f"{where}: store.etcd")
        if "volumes_file" in store:
            values["volumes_file"] = _convert(Path, store["volumes_file"],
                                              f"{where}: store.volumes_file")
        if "dir" in cache:
            values["cache_dir"] = _convert(Path, cache["dir"], f"{where}: cache.dir")
        if "size" in cache:
            values["cache_bytes"] = _convert(_size, cache["size"], f"{where}: cache.size")
        if "listen" in manager:
            values["manager_listen"] = _convert(str, manager["listen"],
                                                f"{where}: manager.listen")
        if "advertise" in manager:
            values["manager_advertise"] = _convert(str, manager["advertise"],
                                                   f"{where}: manager.advertise")
        for key in ("secret_file", "cert_file", "key_file", "client_ca_file"):
            if key in manager:
                values[f"manager_{key}"] = _convert(Path, manager[key],
                                                    f"{where}: manager.{key}")
        if io:
            conv = {"threads": int, "metadata_deadline": float, "data_deadline": float,
                    "mode": str}
            given = {k: _convert(conv[k], v, f"{where}: volume_io.{k}") for k, v in io.items()}
            try:
                values["volume_io"] = IOLimits(**given)
            except ValueError as exc:
                raise UserError(f"{where}: [volume_io]: {exc}") from None
        return cls(**values).validated()

    def with_overrides(self, **overrides: Any) -> Config:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validated()

    def validated(self) -> Config:
        if self.etcd and self.volumes_file:
            raise UserError("config: give either store.etcd or store.volumes_file, not both")
        if self.listing_entries < 1000:
            raise UserError("config: listing_entries must be at least 1000")
        for name in ("state_dir", "socket"):
            if not getattr(self, name).is_absolute():
                raise UserError(f"config: {name} must be an absolute path")
        if not self.mountpoint.is_absolute():
            raise UserError("config: fuse_mountpoint must be an absolute path")
        if self.mountpoint.resolve() == self.state_dir.resolve() or \
                (self.state_dir / "volumes") in (self.mountpoint, *self.mountpoint.parents):
            raise UserError("config: fuse_mountpoint must not be the state dir or under "
                            "its volumes/ directory")
        if not 0 <= self.socket_mode <= 0o777:
            raise UserError("config: socket_mode must be an octal mode like '0660'")
        if self.manager_listen and self.manager_secret_file is None:
            raise UserError("config: manager.listen needs manager.secret_file (TCP clients "
                            "must authenticate)")
        if (self.manager_cert_file is None) != (self.manager_key_file is None):
            raise UserError("config: manager.cert_file and manager.key_file go together")
        if self.manager_client_ca_file is not None and not self.manager_tls:
            raise UserError("config: manager.client_ca_file needs manager.cert_file and "
                            "manager.key_file (client certificates are a TLS feature)")
        for name in ("manager_cert_file", "manager_key_file", "manager_client_ca_file"):
            value = getattr(self, name)
            if value is not None and not value.is_absolute():
                raise UserError(f"config: manager.{name[len('manager_'):]} must be an "
                                "absolute path")
        if (self.cache_dir is None) != (self.cache_bytes <= 0):
            raise UserError("config: [cache] needs both dir and a positive size")
        if self.manager_advertise and not self.manager_advertise.startswith(
                ("http://", "https://")):
            raise UserError("config: manager.advertise must be an http(s):// URL")
        if self.max_body_bytes < 1024:
            raise UserError("config: max_body_bytes must be at least 1024")
        if self.registration_ttl < 5:
            raise UserError("config: registration_ttl must be at least 5 seconds")
        return self


def _table(value: object, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a table")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}")
    return value


def _mode(value: object) -> int:
    if isinstance(value, int):
        return value
    return int(str(value), 8)


def _size(value: object) -> int:
    if isinstance(value, int):
        return value
    return parse_size(str(value))


def _convert(conv: Any, value: object, where: str) -> Any:
    if conv is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: must be true or false")
        return value
    if conv in (int, float) and isinstance(value, bool):
        raise UserError(f"{where}: must be a number")
    try:
        return conv(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise UserError(f"{where}: {exc}") from None
