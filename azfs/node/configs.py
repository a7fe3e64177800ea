"""The config files of a single-node deployment, derived from its :class:`Settings`.

They are regular configs in the documented formats (the same loaders read
them), rewritten by every ``azfs up`` so that they always match the
settings.  They hold paths to secrets, never secrets.
"""

from __future__ import annotations

import tomli_w
import yaml

from azfs.files import atomic_write
from azfs.node.layout import SHARE_VOLUME, STORAGE_ACCOUNT, Layout, Settings


def volumes_config(layout: Layout) -> dict:
    """One ``bind`` volume over the node's share directory (stands in for Azure Files)."""
    return {"volumes": [{"name": SHARE_VOLUME,
                         "mount": {"at": "requested", "fstype": "bind",
                                   "path": str(layout.share), "options": ""}}]}


def manager_config(layout: Layout, settings: Settings) -> dict:
    config: dict = {
        "listen": f"127.0.0.1:{settings.manager_port}",
        "state_dir": str(layout.manager_state),
        "accounts": {STORAGE_ACCOUNT: {"key_file": str(layout.storage_key)}},
        "agents": {settings.agent_id: {"socket": str(layout.agent_socket)}},
    }
    if settings.etcd_endpoint:
        config["etcd"] = settings.etcd_endpoint
    else:
        config["volumes_file"] = str(layout.volumes_yaml)
    return config


def agent_config(layout: Layout, settings: Settings) -> dict:
    store = ({"etcd": settings.etcd_endpoint} if settings.etcd_endpoint
             else {"volumes_file": str(layout.volumes_yaml)})
    return {
        "agent_id": settings.agent_id,
        "state_dir": str(layout.agent_state),
        "socket": str(layout.agent_socket),
        "socket_mode": "0600",
        # `azfs down` stops the whole node: the agent takes its FUSE mount and volumes along
        "unmount_on_exit": True,
        "store": store,
        "cache": {"dir": str(layout.block_cache), "size": "256M"},
    }


def write_configs(layout: Layout, settings: Settings) -> None:
    atomic_write(layout.volumes_yaml, yaml.safe_dump(volumes_config(layout), sort_keys=False),
               0o644)
    atomic_write(layout.manager_toml, tomli_w.dumps(manager_config(layout, settings)), 0o644)
    atomic_write(layout.agent_toml, tomli_w.dumps(agent_config(layout, settings)), 0o644)
