"""The manager's config layering, and its volume pool on real (bind and tmpfs) volumes.

Config: defaults → TOML → environment → flags; secrets only from files or
the environment.  Volumes: the pool mounts ``requested`` volumes through the
library's host mounter, picks the one with most free space (a small tmpfs
loses against the disk), skips a broken one, and gives up on a storage call
that does not return in time instead of hanging.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from azfs.errors import UserError
from managerd.config import ManagerConfig
from managerd.errors import ApiError
from managerd.volumes import VolumePool
from tests.test_t5_manager_api import _unmount_under


def test_layers_defaults_toml_env_flags(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("c2VjcmV0LWtleQ==\n")
    toml = tmp_path / "m.toml"
    toml.write_text(f'listen = "0.0.0.0:9000"\nstate_dir = "{tmp_path}"\ndb_threads = 3\n'
                    f'sas_ttl = 600\n[accounts.acct]\nkey_file = "{key}"\n'
                    f'[agents.node1]\nsocket = "/run/azfs/agent.sock"\n'
                    f'[agents.node2]\nurl = "http://10.0.0.2:8631"\nsecret_env = "AGENT2"\n')
    env = {"AZFS_MANAGERD_DB_THREADS": "5", "AZFS_MANAGERD_SAS_TTL": "300", "AGENT2": "s3cr3t",
           "AZFS_MANAGERD_DATABASE_URL": "postgresql+psycopg://u:pw@db/azfs"}
    config = ManagerConfig.load(toml, env=env, overrides={"sas_ttl": 120, "etcd": None})
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 9000)
    assert config.db_threads == 5 and config.sas_ttl == 120
    assert config.db_url == "postgresql+psycopg://u:pw@db/azfs"
    assert config.account_keys["acct"].reveal() == "c2VjcmV0LWtleQ=="
    assert config.agents["node1"].socket == Path("/run/azfs/agent.sock")
    assert config.agents["node2"].secret.reveal() == "s3cr3t"
    assert "c2VjcmV0" not in repr(config) and "s3cr3t" not in repr(config)
    default = ManagerConfig.load(None, env={})
    assert default.db_url.startswith("sqlite:///") and default.listen_host == "127.0.0.1"


@pytest.mark.parametrize("text,message", [
    ('[accounts.acct]\nkey = "literal"\n', "not in the config"),
    ('agent_secret = "x"\n', "agent_secret_file"),
    ('bogus = 1\n', "unknown manager config keys: bogus"),
    ('listen = "127.0.0.1:99999"\n', "port"),
    ('[agents.a]\nsocket = "/s"\nurl = "http://x"\n', "exactly one"),
    ('db_threads = "many"\n', "bad manager config"),
    ('[accounts.acct]\nkey_env = "NOPE"\n', "NOPE is not set"),
    ('not toml', "not valid TOML"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text(text)
    with pytest.raises(UserError, match=message):
        ManagerConfig.load(toml, env={})


@pytest.fixture
def volumes(tmp_path: Path):
    small = tmp_path / "small"
    big = tmp_path / "big"
    for path in (small, big):
        path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    config_file = tmp_path / "volumes.yaml"
    config_file.write_text(
        "volumes:\n"
        f"  - {{name: small, mount: {{at: requested, fstype: bind, path: {small}}}}}\n"
        f"  - {{name: big, mount: {{at: requested, fstype: bind, path: {big}}}}}\n"
        f"  - {{name: broken, mount: {{at: requested, fstype: bind, path: {tmp_path}/nope}}}}\n"
        f"  - {{name: boot, mount: {{at: startup, fstype: bind, path: {big}}}}}\n")
    config = ManagerConfig(state_dir=tmp_path / "state", volumes_file=config_file,
                           storage_timeout=5)
    try:
        yield config
    finally:
        _unmount_under(tmp_path)


async def test_most_free_space_wins_and_broken_is_skipped(volumes: ManagerConfig) -> None:
    pool = VolumePool(volumes)
    try:
        assert sorted(await pool.requested()) == ["big", "broken", "small"]
        name, mount = await pool.choose()
        assert name == "big" and mount.is_dir()
        assert (await pool.free_bytes("small")) <= 1024 * 1024
        name, _ = await pool.choose("small")
        assert name == "small"
        with pytest.raises(ApiError) as err:
            await pool.choose("broken")
        assert err.value.code == "volume-unavailable"
        with pytest.raises(ApiError) as err:
            await pool.choose("boot")  # startup volumes are not for vfolders
        assert err.value.code == "volume-not-found"
    finally:
        await pool.close()
    with open("/proc/self/mountinfo") as fh:
        assert str(volumes.state_dir) not in fh.read()


async def test_storage_call_that_hangs_gives_up(volumes: ManagerConfig) -> None:
    pool = VolumePool(volumes.with_(storage_timeout=0.3))
    with pytest.raises(ApiError) as err:
        await pool.storage(time.sleep, 5, what="statfs of volume 'hung'")
    assert err.value.code == "volume-unavailable" and "no answer" in err.value.message


async def test_no_requested_volume_is_explicit(tmp_path: Path) -> None:
    config_file = tmp_path / "volumes.yaml"
    config_file.write_text("volumes: []\n")
    pool = VolumePool(ManagerConfig(state_dir=tmp_path, volumes_file=config_file))
    with pytest.raises(ApiError) as err:
        await pool.choose()
    assert err.value.code == "no-volume" and err.value.status == 503
