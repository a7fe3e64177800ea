"""Root-only directories and TLS settings, unit by unit (no daemon).

``ensure_private_dir`` on real directories (created, fixed, refused); the
daemons' TLS settings validated by their own config loaders; the TLS file
checks with certificates of a CA made here.  Messages name files and
modes, never a key's contents.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import pytest

from agentd.config import Config as AgentConfig
from azfs.errors import UserError
from azfs.hostdirs import UnsafeDirectory, ensure_private_dir
from azfs.tls import check_server_files, client_context
from managerd.config import ManagerConfig
from tests.support.pki import CA


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_missing_directories_are_created_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        made = ensure_private_dir(tmp_path / "a" / "b", "state dir")
    finally:
        os.umask(old)
    assert made == tmp_path / "a" / "b"
    assert _mode(tmp_path / "a") == 0o700 and _mode(made) == 0o700


def test_a_loose_directory_is_fixed_with_a_warning(tmp_path: Path, caplog) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o2775)
    with caplog.at_level(logging.WARNING):
        ensure_private_dir(loose, "agent state_dir")
    assert _mode(loose) == 0o700
    assert f"agent state_dir {loose} had mode 2775; changed to 0700" in caplog.text
    caplog.clear()
    ensure_private_dir(loose, "agent state_dir")  # already right: nothing to say
    assert caplog.text == ""


def test_a_loose_directory_not_ours_to_fix_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "mnt"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(UnsafeDirectory, match=rf"{loose} has mode 0755: .*'chmod 0700 {loose}'"):
        ensure_private_dir(loose, "the FUSE mountpoint's parent directory", fix=False)
    assert _mode(loose) == 0o755


def test_another_owner_or_a_file_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory away")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafeDirectory, match="owned by uid 65534"):
        ensure_private_dir(theirs, "manager state_dir")
    assert _mode(theirs) == 0o700 and theirs.stat().st_uid == 65534
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(UserError, match="not a directory"):
        ensure_private_dir(afile, "block cache dir")


def test_agent_tls_settings_are_validated() -> None:
    base = {"listen": "0.0.0.0:7520", "secret_file": "/etc/azfs/agent.secret"}
    config = AgentConfig.from_mapping({"manager": {
        **base, "cert_file": "/etc/azfs/tls/a.pem", "key_file": "/etc/azfs/tls/a.key"}})
    assert config.manager_tls and config.manager_url.startswith("https://")
    assert not AgentConfig.from_mapping({"manager": base}).manager_url.startswith("https")
    for bad, message in (({"cert_file": "/a.pem"}, "go together"),
                         ({"key_file": "/a.key"}, "go together"),
                         ({"client_ca_file": "/ca.pem"}, "needs manager.cert_file"),
                         ({"cert_file": "a.pem", "key_file": "/a.key"}, "absolute path")):
        with pytest.raises(UserError, match=message):
            AgentConfig.from_mapping({"manager": {**base, **bad}})


def test_manager_tls_settings_are_validated() -> None:
    config = ManagerConfig.from_mapping({"listen": "10.0.0.1:8630",
                                         "tls_cert_file": "/m.pem", "tls_key_file": "/m.key"},
                                        env={})
    assert config.tls and config.agent_url == "https://10.0.0.1:8630"
    for bad in ({"tls_cert_file": "/m.pem"}, {"agent_cert_file": "/c.pem"}):
        with pytest.raises(UserError, match="go together"):
            ManagerConfig.from_mapping(bad, env={})


def test_tls_files_are_checked_before_a_server_starts(tmp_path: Path) -> None:
    ca = CA(tmp_path, "cluster")
    one, two = ca.issue("one"), ca.issue("two")
    check_server_files(one.cert, one.key, ca.cert, "manager TLS")  # fine
    body = one.key_text().splitlines()[1]
    with pytest.raises(UserError) as info:
        check_server_files(one.cert, two.key, None, "manager TLS")
    assert str(info.value).startswith(f"manager TLS: cannot use certificate {one.cert} "
                                      f"with key {two.key}: ")
    with pytest.raises(UserError, match="no such file"):
        check_server_files(tmp_path / "missing.pem", one.key, None, "manager TLS")
    with pytest.raises(UserError, match="CA file"):
        check_server_files(one.cert, one.key, tmp_path / "missing-ca.pem", "manager TLS")
    one.key.chmod(0o644)
    with pytest.raises(UserError, match=f"chmod 0600 {one.key}") as info:
        check_server_files(one.cert, one.key, None, "manager TLS")
    assert body not in str(info.value)


def test_client_contexts_verify(tmp_path: Path, monkeypatch) -> None:
    ca = CA(tmp_path, "cluster")
    monkeypatch.delenv("AZFS_CA_FILE", raising=False)
    context = client_context(ca.cert)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    default = client_context()
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    monkeypatch.setenv("AZFS_CA_FILE", str(tmp_path / "nowhere.pem"))
    with pytest.raises(UserError, match="nowhere.pem: no such file"):
        client_context()
    client = ca.issue("client", server=False, client=True)
    with pytest.raises(UserError, match="needs its key"):
        client_context(ca.cert, client.cert, None)
