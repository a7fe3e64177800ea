"""What ``azfs up`` puts into the running services: the first admin, the volume
config in etcd, the sample dataset in Azurite and its record in the manager.

Each step is idempotent (an existing admin token, dataset record or uploaded
blob is kept), so a second ``up`` only checks.  Secrets go to 0600 files and
travel in memory only: the storage key is never in an argv or environment
of a tool run here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from azfs.client.manager import ManagerClient, catalog
from azfs.client.manager import register_dataset as register
from azfs.errors import AzfsError, UserError
from azfs.files import atomic_write
from azfs.node.layout import (
    SAMPLE_DATASET,
    STORAGE_ACCOUNT,
    Layout,
    Settings,
    read_secret,
)
from azfs.node.procs import Service
from azfs.secret import Secret, redact

Say = Callable[[str], None]
SAMPLE_FILES = {
    "README.txt": "A small sample dataset, served read-only from blob storage.\n",
    "train/part-0000.csv": "".join(f"{i},{i * i},{i % 7}\n" for i in range(1000)),
    "train/part-0001.csv": "".join(f"{i},{i * 3},{i % 5}\n" for i in range(1000, 2000)),
    "labels.txt": "\n".join(["cat", "dog", "bird", "fish", "horse"]) + "\n",
}


def ensure_admin(layout: Layout, manager: Service, say: Say) -> None:
    """The first admin, made once through ``azfs-managerd create-user``; token to a 0600 file."""
    if layout.admin_token.exists():
        return
    done = subprocess.run(
        [sys.executable, "-m", "managerd.main", "--config", str(layout.manager_toml),
         "create-user", "admin", "--admin"],
        capture_output=True, text=True, env=manager.env, cwd="/", timeout=120, check=False)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1:] or ["no message"]
        if "exists" in message[0]:
            raise UserError(f"the manager database has an admin but {layout.admin_token} is "
                            "missing; stop the node and remove its state dir to start over "
                            "('azfs down --purge')")
        raise UserError(f"cannot create the admin user: {message[0]}")
    token = json.loads(done.stdout)["token"]
    atomic_write(layout.admin_token, token + "\n", 0o600)
    say(f"managerd: admin user created; its token is in {layout.admin_token}")


def import_volumes(layout: Layout, settings: Settings, say: Say) -> None:
    """The YAML volume config imported into etcd (what ``azfs volumes import`` does)."""
    from azfs.volumes.model import load_yaml_file
    from azfs.volumes.store import open_store

    endpoint = settings.etcd_endpoint
    volumes = load_yaml_file(layout.volumes_yaml)
    try:
        with open_store(etcd=str(endpoint)) as store:
            store.import_volumes(volumes)
    except AzfsError as exc:
        raise UserError(f"cannot import the volume config into etcd at {endpoint}: "
                        f"{redact(str(exc))}") from None
    say(f"volumes: {layout.volumes_yaml} imported into etcd at {endpoint} "
        f"({len(volumes)} volume(s))")


def connection_string(layout: Layout, settings: Settings) -> Secret:
    key = layout.storage_key_secret().reveal()
    return Secret(f"DefaultEndpointsProtocol=http;AccountName={STORAGE_ACCOUNT};"
                  f"AccountKey={key};BlobEndpoint={settings.blob_endpoint};")


def upload_sample(layout: Layout, settings: Settings, say: Say) -> None:
    """The sample dataset in its container (skips what is there, as ``azfs dataset upload``)."""
    from azfs.blob.account import (
        account_from_connection_string,
        create_container,
        service_client,
        upload_file,
        uploaded_versions,
    )

    for name, text in SAMPLE_FILES.items():
        path = layout.sample_dataset / name
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    # the key travels in memory only: not in argv, not in the environment
    service = service_client(account_from_connection_string(
        connection_string(layout, settings).reveal()))
    create_container(service, SAMPLE_DATASET)
    client = service.get_container_client(SAMPLE_DATASET)
    existing = uploaded_versions(client, "", SAMPLE_DATASET)
    for name in SAMPLE_FILES:
        path = layout.sample_dataset / name
        st = path.stat()
        if existing.get(name) != (st.st_size, str(st.st_mtime_ns)):
            upload_file(client, name, path, st.st_size, st.st_mtime_ns, SAMPLE_DATASET)
    say(f"azurite: sample dataset in container '{SAMPLE_DATASET}' "
        f"({len(SAMPLE_FILES)} files)")


def admin_client(layout: Layout, settings: Settings) -> ManagerClient:
    return ManagerClient(settings.manager_url, read_secret(layout.admin_token))


def register_dataset(layout: Layout, settings: Settings, say: Say) -> None:
    """The sample container in the manager's catalog (``azfs dataset register --shared``)."""
    client = admin_client(layout, settings)
    if SAMPLE_DATASET in {d["name"] for d in catalog(client)}:
        return
    register(client, SAMPLE_DATASET, f"{settings.blob_endpoint}/{SAMPLE_DATASET}",
             visibility="shared")
    say(f"managerd: dataset '{SAMPLE_DATASET}' registered (shared with every user)")


# ---- down -------------------------------------------------------------------------------
