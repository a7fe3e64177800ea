"""The one typed configuration of azfs-managerd.

Layers, later wins: built-in defaults → TOML file → ``AZFS_MANAGERD_*``
environment → command-line flags.  Secrets (storage account keys, agent
shared secrets) are only read from files or the environment, never from
flags, so that they never appear in ``ps``; they travel as
:class:`~azfs.secret.Secret`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from azfs.errors import UserError
from azfs.secret import Secret

ENV_PREFIX = "AZFS_MANAGERD_"
DEFAULT_STATE_DIR = Path("/var/lib/azfs/managerd")
#: three lease checks must fit in the time the database takes to drop a lost
#: holder's session (``managerd.leader.KEEPALIVE_BOUND``, 25 s)
MAX_LEADER_INTERVAL = 8.0


@dataclass(frozen=True)
class AgentConfig:
    """How to reach one node agent: its unix socket (same host) or URL + shared secret."""

    name: str
    socket: Path | None = None
    url: str | None = None
    secret: Secret | None = None

    def __post_init__(self) -> None:
        if (self.socket is None) == (self.url is None):
            raise UserError(f"agent {self.name!r}: set exactly one of 'socket' or 'url'")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise UserError(f"agent {self.name!r}: url must start with http:// or https://")


@dataclass(frozen=True)
class ManagerConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8630
    state_dir: Path = DEFAULT_STATE_DIR
    #: SQLAlchemy URL; default: a SQLite file in ``state_dir``.
    database_url: str | None = None
    #: worker threads (and pooled connections) for the database.
    db_threads: int = 8
    #: remote volume config: a YAML file (single node) or etcd ``host:port``.
    volumes_file: Path | None = None
    etcd: str | None = None
    #: every statvfs/mkdir/rmtree/mount on a host volume gives up after this.
    storage_timeout: float = 10.0
    agent_timeout: float = 30.0
    #: SAS lifetime: default and the upper bound a caller may ask for.
    sas_ttl: int = 900
    sas_max_ttl: int = 3600
    #: storage account name -> account key, used to sign read-only SAS.
    account_keys: Mapping[str, Secret] = field(default_factory=dict)
    agents: Mapping[str, AgentConfig] = field(default_factory=dict)
    #: bearer secret for agents reached over TCP (file or env only).
    agent_secret: Secret | None = None
    #: cluster: seconds between leader-lease checks (and a standby's attempts to take it).
    leader_interval: float = 5.0
    #: cluster: seconds between scans of the agents' registrations (down/back, reconcile).
    reconcile_interval: float = 10.0
    #: cluster: every agent is reconciled with its journal at least this often (seconds).
    reconcile_full_every: float = 600.0
    #: orphaned vfolder directories: sweep interval and the age a directory must reach.
    sweep_interval: float = 3600.0
    sweep_min_age: float = 3600.0
    #: quotas given to new vfolders (0 = unlimited).
    default_quota_bytes: int = 0
    default_quota_files: int = 0
    log_level: str = "INFO"
    #: how agents reach this manager (for SAS renewal URLs); default from ``listen``.
    public_url: str | None = None
    #: serve HTTPS: certificate chain and key (PEM files; the key 0600).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: the CA that signed the agents' certificates (default: the system's trust).
    agent_ca_file: Path | None = None
    #: mutual TLS: the certificate (and key) this manager presents to agents.
    agent_cert_file: Path | None = None
    agent_key_file: Path | None = None

    @property
    def tls(self) -> bool:
        """True if the REST API is served over TLS."""
        return self.tls_cert_file is not None

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'managerd.db'}"

    @property
    def agent_url(self) -> str | None:
        """Base URL the agents use to call back (None: no callbacks, e.g. on 0.0.0.0)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        if self.listen_host in ("0.0.0.0", "::", ""):
            return None
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{'https' if self.tls else 'http'}://{host}:{self.listen_port}"

    @property
    def stale_create_age(self) -> float:
        """A kernel still ``creating`` after this long was left by a crash (seconds)."""
        return 2 * self.agent_timeout + 30.0

    @property
    def mount_dir(self) -> Path:
        """Where the manager mounts its own view of ``requested`` host volumes."""
        return self.state_dir / "mounts"

    # -- loading ---------------------------------------------------------

    @classmethod
    def load(cls, path: Path | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> ManagerConfig:
        """Defaults → TOML ``path`` → environment → ``overrides`` (flags; None = unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if path is not None:
            values.update(_read_toml(path))
            if "agent_secret" in values:
                raise UserError("agent_secret: put it in a file (agent_secret_file) or the "
                                f"environment ({ENV_PREFIX}AGENT_SECRET)")
        if env.get(ENV_PREFIX + "AGENT_SECRET"):
            values["agent_secret"] = Secret(env[ENV_PREFIX + "AGENT_SECRET"])
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and f.name not in ("account_keys", "agents", "agent_secret"):
                values[f.name] = raw
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        return cls.from_mapping(values, env)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any],
                     env: Mapping[str, str] | None = None) -> ManagerConfig:
        env = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known) - {"listen", "accounts", "agent_secret_file"}
        if unknown:
            raise UserError(f"unknown manager config keys: {', '.join(sorted(unknown))}")
        out: dict[str, Any] = {}
        for key, value in values.items():
            if key == "listen":
                host, _, port = str(value).rpartition(":")
                out["listen_host"], out["listen_port"] = host or "127.0.0.1", port
            elif key == "accounts":
                out["account_keys"] = _accounts(value, env)
            elif key == "agents":
                out["agents"] = _agents(value, env)
            elif key == "agent_secret_file":
                out["agent_secret"] = _secret({"secret_file": value}, "agent_secret_file", env)
            elif key == "agent_secret":
                out["agent_secret"] = value if isinstance(value, Secret) else Secret(value)
            elif key != "account_keys":
                out[key] = value
        try:
            config = cls(**{k: _coerce(known[k].type, v) for k, v in out.items()})
        except (TypeError, ValueError) as exc:
            raise UserError(f"bad manager config: {exc}") from None
        if config.listen_port <= 0 or config.listen_port > 65535:
            raise UserError("listen port must be 1-65535")
        if config.db_threads < 1 or config.storage_timeout <= 0 or config.sas_ttl <= 0:
            raise UserError("db_threads, storage_timeout and sas_ttl must be positive")
        if min(config.leader_interval, config.reconcile_interval, config.reconcile_full_every,
               config.sweep_interval) <= 0 or config.sweep_min_age < 0:
            raise UserError("leader_interval, reconcile_interval, reconcile_full_every and "
                            "sweep_interval must be positive, sweep_min_age >= 0")
        if config.leader_interval > MAX_LEADER_INTERVAL:
            # a leader cut off from the database must stop (after at most three
            # intervals) before the server frees its lock for another one
            raise UserError(f"leader_interval must be at most {MAX_LEADER_INTERVAL:g} s")
        if (config.tls_cert_file is None) != (config.tls_key_file is None):
            raise UserError("tls_cert_file and tls_key_file go together")
        if (config.agent_cert_file is None) != (config.agent_key_file is None):
            raise UserError("agent_cert_file and agent_key_file go together")
        return config

    def with_(self, **changes: Any) -> ManagerConfig:
        return replace(self, **changes)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None


def _coerce(kind: Any, value: Any) -> Any:
    kind = str(kind)
    if value is None:
        return None
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("Path"):
        return Path(value)
    if kind.startswith("str"):
        return str(value)
    return value


def _secret(entry: Mapping[str, Any], what: str, env: Mapping[str, str]) -> Secret | None:
    """A secret from ``*_file`` or ``*_env``; a literal value in the file is refused."""
    if "key" in entry or "secret" in entry:
        raise UserError(f"{what}: put secrets in a file ('*_file') or env ('*_env'), "
                        "not in the config")
    for name in ("key_file", "secret_file"):
        if name in entry:
            try:
                return Secret(Path(entry[name]).read_text().strip())
            except OSError as exc:
                raise UserError(f"{what}: cannot read {name}: {exc.strerror}") from None
    for name in ("key_env", "secret_env"):
        if name in entry:
            value = env.get(str(entry[name]))
            if not value:
                raise UserError(f"{what}: environment variable {entry[name]} is not set")
            return Secret(value)
    return None


def _accounts(value: Any, env: Mapping[str, str]) -> dict[str, Secret]:
    out = {}
    for name, entry in dict(value).items():
        secret = _secret(entry, f"account {name!r}", env)
        if secret is None:
            raise UserError(f"account {name!r}: needs key_file or key_env")
        out[name] = secret
    return out


def _agents(value: Any, env: Mapping[str, str]) -> dict[str, AgentConfig]:
    out = {}
    for name, entry in dict(value).items():
        if isinstance(entry, AgentConfig):
            out[name] = entry
            continue
        out[name] = AgentConfig(
            name=name,
            socket=Path(entry["socket"]) if entry.get("socket") else None,
            url=entry.get("url"),
            secret=_secret(entry, f"agent {name!r}", env))
    return out
