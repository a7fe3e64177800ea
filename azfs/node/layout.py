"""Where a single-node deployment keeps everything, and the settings it was started with.

One state directory holds it all, so that ``azfs down`` knows what to stop
and unmount, and ``rm -r`` of that directory (after ``down``) removes the
whole node.  Secrets (the admin token, the storage key) live in
``secrets/`` (mode 0700, files 0600) and are never printed; the settings
(ports, etcd endpoint) are in ``node.json`` so that a second ``azfs up``
finds the same node.  The state directory itself is root-only (0700): below
it are the share standing in for Azure Files, the manager's and the agent's
volume mounts, the FUSE views, the block cache and Azurite's blobs -- every
user's data -- so no other user of the machine may enter it.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from azfs.errors import UserError
from azfs.files import atomic_write
from azfs.secret import Secret

DEFAULT_STATE_DIR = Path("/var/lib/azfs/node")
STORAGE_ACCOUNT = "devstoreaccount1"
SAMPLE_DATASET = "sample"
SHARE_VOLUME = "local-share"


@dataclass(frozen=True)
class Settings:
    """What ``azfs up`` was asked for; persisted so that the next ``up`` matches it."""

    manager_port: int = 8630
    azurite_port: int = 10000
    #: None: volumes in a YAML file ("none" on the command line); "local": an etcd of
    #: the node's own; else HOST:PORT
    etcd: str | None = None
    etcd_port: int = 12379
    etcd_peer_port: int = 12380
    agent_id: str = "local"

    @property
    def manager_url(self) -> str:
        return f"http://127.0.0.1:{self.manager_port}"

    @property
    def blob_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.azurite_port}/{STORAGE_ACCOUNT}"

    @property
    def etcd_endpoint(self) -> str | None:
        if self.etcd == "local":
            return f"127.0.0.1:{self.etcd_port}"
        return self.etcd

    def merged(self, **flags: object) -> Settings:
        """These settings with the flags that were given (None = not given)."""
        merged = replace(self, **{k: v for k, v in flags.items() if v is not None})
        return replace(merged, etcd=None) if merged.etcd == "none" else merged

    def check(self) -> Settings:
        for name in ("manager_port", "azurite_port", "etcd_port", "etcd_peer_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise UserError(f"{name.replace('_', ' ')} must be 1-65535")
        ports = [self.manager_port, self.azurite_port]
        if self.etcd == "local":
            ports += [self.etcd_port, self.etcd_peer_port]
        if len(set(ports)) != len(ports):
            raise UserError("the node's services need distinct ports")
        if self.etcd not in (None, "local"):
            host, _, port = self.etcd.rpartition(":")
            if not host or not port.isdigit():
                raise UserError(f"--etcd must be HOST:PORT, 'local' or 'none' "
                                f"(got {self.etcd!r})")
        if not self.agent_id or "/" in self.agent_id:
            raise UserError("agent id must be a non-empty name without '/'")
        return self


class Layout:
    """Paths inside one node's state directory."""

    def __init__(self, root: Path) -> None:
        root = Path(root)
        if not root.is_absolute():
            root = Path.cwd() / root
        self.root = Path(os.path.normpath(root))

    # -- files of the node itself ------------------------------------------------------
    @property
    def settings_file(self) -> Path:
        return self.root / "node.json"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def admin_token(self) -> Path:
        return self.secrets / "admin.token"

    @property
    def storage_key(self) -> Path:
        return self.secrets / "storage.key"

    def user_token(self, user: str) -> Path:
        return self.secrets / f"{user}.token"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def pid_file(self, service: str) -> Path:
        return self.run / f"{service}.pid"

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    # -- per service -------------------------------------------------------------------
    @property
    def manager_toml(self) -> Path:
        return self.config / "manager.toml"

    @property
    def agent_toml(self) -> Path:
        return self.config / "agent.toml"

    @property
    def volumes_yaml(self) -> Path:
        return self.config / "volumes.yaml"

    @property
    def manager_state(self) -> Path:
        return self.root / "manager"

    @property
    def agent_state(self) -> Path:
        return self.root / "agent"

    @property
    def agent_socket(self) -> Path:
        return self.run / "agent.sock"

    @property
    def fuse_mountpoint(self) -> Path:
        return self.agent_state / "fuse"

    @property
    def fusehost_pid_file(self) -> Path:
        return self.agent_state / "run" / "fusehost.pid"

    @property
    def block_cache(self) -> Path:
        return self.root / "cache"

    @property
    def share(self) -> Path:
        """The directory the ``bind`` volume serves (stands in for an Azure Files share)."""
        return self.root / "share"

    @property
    def azurite_data(self) -> Path:
        return self.root / "azurite"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def sample_dataset(self) -> Path:
        return self.root / "sample-dataset"

    @property
    def demo(self) -> Path:
        return self.root / "demo"

    @property
    def rootfs(self) -> Path:
        return self.demo / "rootfs"

    @property
    def runc_root(self) -> Path:
        return self.demo / "runc"

    # -- settings and secrets ------------------------------------------------------------
    def load_settings(self) -> Settings | None:
        try:
            data = json.loads(self.settings_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.settings_file} is unreadable ({exc}); "
                            "remove it to start over") from None
        known = {f.name for f in fields(Settings)}
        return Settings(**{k: v for k, v in data.items() if k in known})

    def save_settings(self, settings: Settings) -> None:
        atomic_write(self.settings_file, json.dumps(asdict(settings), indent=2) + "\n", 0o644)

    def make_private_root(self) -> None:
        """The state directory, created 0700 (a looser mode is fixed, with a warning)."""
        from azfs.hostdirs import ensure_private_dir

        ensure_private_dir(self.root, "node state dir")

    def make_dirs(self) -> None:
        from azfs.hostdirs import ensure_private_dir

        self.make_private_root()
        # each directory that holds data or mounts is root-only by itself too, so that
        # loosening the state dir by hand does not open them
        for path in (self.secrets, self.manager_state, self.agent_state, self.share,
                     self.azurite_data, self.block_cache, self.demo):
            ensure_private_dir(path, "node directory")
        for path in (self.config, self.run, self.logs):
            path.mkdir(exist_ok=True, mode=0o755)

    def storage_key_secret(self) -> Secret:
        """The emulated storage account's key: random per node, made on first use."""
        if not self.storage_key.exists():
            import base64
            atomic_write(self.storage_key, base64.b64encode(secrets.token_bytes(64)).decode(),
                       0o600)
        return read_secret(self.storage_key)


def read_secret(path: Path) -> Secret:
    try:
        return Secret(path.read_text().strip())
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
