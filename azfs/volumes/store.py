"""Where the remote volume config lives: which store to open, and the names callers use.

* :class:`~azfs.volumes.etcd_store.EtcdVolumeStore` — the cluster store (one
  key per volume under a prefix, passwords under a separate prefix, every
  write one transaction, watchable);
* :class:`~azfs.volumes.yaml_store.YamlVolumeStore` — the embedded default of
  a single node: a YAML file, passwords in a mode-0600 side file.

Both derive from :class:`~azfs.volumes.base.VolumeStore` (re-exported here)
and import only :mod:`azfs.volumes.base`; this module imports them, lazily,
so a YAML-only caller never loads the etcd client.  Every write validates
the whole new config first and is atomic: a failed write leaves the store as
it was.  Methods are blocking; daemons call them through
``trio.to_thread.run_sync``.  Watch callbacks run in a background thread of
the store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from azfs.errors import UserError
from azfs.files import atomic_write
from azfs.volumes.base import VolumeStore, Watch, WatchCallback, check_unique, merge

if TYPE_CHECKING:
    from azfs.volumes.etcd_store import EtcdAuth

__all__ = ["DEFAULT_VOLUMES_FILE", "ENV_ETCD", "ENV_VOLUMES_FILE", "VolumeStore", "Watch",
           "WatchCallback", "atomic_write", "check_unique", "merge", "open_store"]

#: Environment variables naming the store when no flag is given.
ENV_ETCD = "AZFS_ETCD"
ENV_VOLUMES_FILE = "AZFS_VOLUMES_FILE"
#: The embedded default of a single-node install.
DEFAULT_VOLUMES_FILE = Path("/etc/azfs/volumes.yaml")


def open_store(etcd: str | None = None, config_file: str | Path | None = None,
               cache_file: str | Path | None = None, timeout: float = 5.0,
               etcd_auth: EtcdAuth | None = None) -> VolumeStore:
    """The store named by the arguments, else by ``$AZFS_ETCD`` / ``$AZFS_VOLUMES_FILE``.

    With nothing given, the single-node default file ``/etc/azfs/volumes.yaml``.
    ``etcd`` may list several members (``h1:2379,h2:2379``).  ``cache_file``
    (etcd only) keeps the last good config for reads during an etcd outage.
    ``etcd_auth`` defaults to :meth:`EtcdAuth.from_env` (``$AZFS_ETCD_USER``...).
    """
    if etcd and config_file:
        raise UserError("give either an etcd endpoint or a config file, not both")
    if not etcd and not config_file:
        etcd = os.environ.get(ENV_ETCD) or None
        config_file = os.environ.get(ENV_VOLUMES_FILE) or None
        if etcd and config_file:
            raise UserError(f"both ${ENV_ETCD} and ${ENV_VOLUMES_FILE} are set; "
                            "pass --etcd or --config-file to choose")
    if etcd:
        from azfs.volumes.etcd_store import EtcdAuth, EtcdVolumeStore

        return EtcdVolumeStore(etcd, timeout=timeout, cache_file=cache_file,
                               auth=etcd_auth or EtcdAuth.from_env())
    from azfs.volumes.yaml_store import YamlVolumeStore

    return YamlVolumeStore(config_file or DEFAULT_VOLUMES_FILE)
