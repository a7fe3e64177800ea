"""``azfs volumes ...`` as a whole program, against a real etcd and a YAML file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from azfs.volumes.model import load_yaml_text
from tests.support.etcd import EtcdServer, etcd_server  # noqa: F401
from tests.support.services import free_port

PASSWORD = "Cli-Secret-Value/42="
CONFIG = f"""\
volumes:
- name: azure-shard-1
  mount:
    at: requested
    fstype: cifs
    path: //ACCOUNT.file.core.windows.net/vfolder
    options: vers=3.0,username=ACCOUNT,password={PASSWORD},dir_mode=0777,file_mode=0777,sec=ntlmssp
- name: samples
  mount:
    at: startup
    fstype: bind
    path: /srv/samples
    options: ro
"""

Run = Callable[..., subprocess.CompletedProcess]


def run_azfs(*args: str, env: dict[str, str] | None = None,
             stdin: str | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("AZFS_ETCD", "AZFS_VOLUMES_FILE")}
    return subprocess.run([sys.executable, "-m", "azfs.cli.main", *args], capture_output=True,
                          text=True, env={**base, **(env or {})}, input=stdin, timeout=60)


@pytest.fixture(params=["etcd", "file"])
def azfs(request: pytest.FixtureRequest, tmp_path: Path) -> Run:
    """Runs ``azfs volumes ARGS`` against one store, named by a flag."""
    if request.param == "etcd":
        server = request.getfixturevalue("etcd_server")
        flags = ["--etcd", server.endpoint]
    else:
        flags = ["--config-file", str(tmp_path / "store" / "volumes.yaml")]

    def run(action: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess:
        return run_azfs("volumes", action, *flags, *args, **kwargs)  # type: ignore[arg-type]

    return run


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "volumes.yaml"
    path.write_text(CONFIG)
    return path


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def failed(result: subprocess.CompletedProcess) -> str:
    """The one-line error of a failed command (no traceback, no secret)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("azfs: "), result.stderr
    assert "Traceback" not in result.stderr and PASSWORD not in result.stderr
    return lines[0]


def test_import_then_export_round_trips(azfs: Run, config: Path) -> None:
    out = ok(azfs("import", str(config)))
    assert "2 added, 0 changed, 0 removed" in out
    assert ok(azfs("export", "--show-secrets")) == CONFIG
    assert load_yaml_text(ok(azfs("export", "--show-secrets"))) == load_yaml_text(CONFIG)


def test_secrets_hidden_unless_asked(azfs: Run, config: Path) -> None:
    ok(azfs("import", str(config)))
    for args in (["list"], ["list", "--json"], ["show", "azure-shard-1"],
                 ["show", "azure-shard-1", "--json"], ["export"]):
        out = ok(azfs(*args))
        assert PASSWORD not in out, args
        assert "password=***" in out, args
    assert PASSWORD in ok(azfs("show", "azure-shard-1", "--show-secrets"))
    assert PASSWORD in ok(azfs("list", "--show-secrets"))


def test_list_and_show_output(azfs: Run, config: Path) -> None:
    ok(azfs("import", str(config)))
    lines = ok(azfs("list")).splitlines()
    assert lines[0].split() == ["NAME", "AT", "FSTYPE", "PATH", "OPTIONS"]
    assert lines[1].split()[:4] == ["azure-shard-1", "requested", "cifs",
                                    "//ACCOUNT.file.core.windows.net/vfolder"]
    assert lines[2].split() == ["samples", "startup", "bind", "/srv/samples", "ro"]
    shown = yaml.safe_load(ok(azfs("show", "samples")))
    assert shown == {"name": "samples", "mount": {"at": "startup", "fstype": "bind",
                                                  "path": "/srv/samples", "options": "ro"}}


def test_remove(azfs: Run, config: Path) -> None:
    ok(azfs("import", str(config)))
    assert "removed volume 'samples'" in ok(azfs("remove", "samples"))
    assert [v.name for v in load_yaml_text(ok(azfs("export")))] == ["azure-shard-1"]
    assert "no volume named 'samples'" in failed(azfs("remove", "samples"))
    assert "no volume named 'samples'" in failed(azfs("show", "samples"))


def test_import_merges_unless_replace(azfs: Run, config: Path, tmp_path: Path) -> None:
    ok(azfs("import", str(config)))
    other = tmp_path / "other.yaml"
    other.write_text("volumes:\n- name: extra\n  mount: {at: requested, fstype: bind, "
                     "path: /srv/extra}\n")
    ok(azfs("import", str(other)))
    assert len(load_yaml_text(ok(azfs("export")))) == 3
    out = ok(azfs("import", "--replace", str(other)))
    assert "0 added, 0 changed, 2 removed" in out
    assert [v.name for v in load_yaml_text(ok(azfs("export")))] == ["extra"]


def test_import_from_stdin_and_dry_run(azfs: Run) -> None:
    out = ok(azfs("import", "--dry-run", "-", stdin=CONFIG))
    assert out.startswith("would import 2 volume(s)")
    assert load_yaml_text(ok(azfs("export"))) == []
    ok(azfs("import", "-", stdin=CONFIG))
    assert len(load_yaml_text(ok(azfs("export")))) == 2


BAD_CONFIGS = {
    "broken YAML": ("volumes:\n- name: a\n  mount: [\n", "broken YAML at line"),
    "bad at": (CONFIG.replace("at: startup", "at: boot"),
               "volumes[1].mount.at: must be 'startup' or 'requested'"),
    "duplicate": (CONFIG.replace("name: samples", "name: azure-shard-1"),
                  "volumes[1].name: duplicate name 'azure-shard-1'"),
    "unknown fstype": (CONFIG.replace("fstype: bind", "fstype: floppy"),
                       "volumes[1].mount.fstype: unknown fstype 'floppy'"),
    "bad cifs path": (CONFIG.replace("//ACCOUNT.file", "ACCOUNT.file"),
                      "volumes[0].mount.path: malformed cifs path"),
    "missing path": (CONFIG.replace("    path: /srv/samples\n", ""),
                     "volumes[1].mount.path: missing"),
    "unknown key": (CONFIG.replace("    options: ro\n", "    options: ro\n    size: 1\n"),
                    "volumes[1].mount.size: unknown key"),
    "slash in name": (CONFIG.replace("name: samples", "name: a/b"),
                      "volumes[1].name: must not contain '/'"),
    "dotdot name": (CONFIG.replace("name: samples", "name: '..'"),
                    "volumes[1].name: must start with a letter or digit"),
    "space in name": (CONFIG.replace("name: samples", "name: my samples"),
                      "volumes[1].name: must not contain spaces"),
    "unicode name": (CONFIG.replace("name: samples", "name: échantillons"),
                     "volumes[1].name: must be ASCII"),
    "ten megabytes": (CONFIG + "#" * (10 * 1024 * 1024) + "\n", "a volume config may be at most"),
    "not a mapping": ("- just\n- a list\n", "the document must be a mapping"),
}


def test_bad_import_is_clear_and_writes_nothing(azfs: Run, config: Path, tmp_path: Path) -> None:
    """Every bad file: one clear line naming entry and field; the store is unchanged."""
    ok(azfs("import", str(config)))
    before = ok(azfs("export", "--show-secrets"))
    for case, (text, message) in sorted(BAD_CONFIGS.items()):
        bad = tmp_path / "bad.yaml"
        if case != "duplicate":  # a valid new volume next to the bad one is not written either
            text = text.replace("name: azure-shard-1\n", "name: newcomer\n", 1)
        bad.write_text(text)
        error = failed(azfs("import", "--replace", str(bad)))
        assert message in error, case
    assert ok(azfs("export", "--show-secrets")) == before


def test_replace_repairs_a_damaged_store(tmp_path: Path, config: Path) -> None:
    store = tmp_path / "store.yaml"
    store.write_text("volumes:\n- name: x\n  mount: {at: sometimes}\n")
    error = failed(run_azfs("volumes", "import", "--config-file", str(store), str(config)))
    assert "volumes[0].mount.at" in error and "import --replace overwrites" in error
    result = run_azfs("volumes", "import", "--replace", "--config-file", str(store), str(config))
    assert result.returncode == 0 and "replacing an invalid config" in result.stderr
    assert len(load_yaml_text(ok(run_azfs("volumes", "export", "--config-file", str(store))))) == 2


def test_missing_import_file(azfs: Run, tmp_path: Path) -> None:
    assert "cannot read" in failed(azfs("import", str(tmp_path / "nope.yaml")))


def test_export_to_file_with_secrets_is_private(azfs: Run, config: Path, tmp_path: Path) -> None:
    ok(azfs("import", str(config)))
    out = tmp_path / "backup.yaml"
    ok(azfs("export", "--show-secrets", "-o", str(out)))
    assert out.read_text() == CONFIG
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_debug_logs_carry_no_secret(azfs: Run, config: Path) -> None:
    result = run_azfs("--debug", "volumes", "import", "--config-file",
                      str(config.parent / "store.yaml"), str(config))
    assert result.returncode == 0, result.stderr
    assert "wrote 2 volume(s)" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout


def test_store_chosen_by_environment(etcd_server: EtcdServer, config: Path,  # noqa: F811
                                     tmp_path: Path) -> None:
    ok(run_azfs("volumes", "import", str(config), env={"AZFS_ETCD": etcd_server.endpoint}))
    assert "azure-shard-1" in ok(run_azfs("volumes", "list", "--etcd", etcd_server.endpoint))
    file_env = {"AZFS_VOLUMES_FILE": str(tmp_path / "env.yaml")}
    assert ok(run_azfs("volumes", "list", env=file_env)).splitlines() == [
        "NAME  AT  FSTYPE  PATH  OPTIONS"]
    both = {**file_env, "AZFS_ETCD": etcd_server.endpoint}
    assert "both $AZFS_ETCD and $AZFS_VOLUMES_FILE are set" in failed(
        run_azfs("volumes", "list", env=both))
    assert "azure-shard-1" in ok(run_azfs("volumes", "--etcd", etcd_server.endpoint, "list",
                                          env=both))


def test_etcd_down_is_a_clear_error(config: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    error = failed(run_azfs("volumes", "import", "--etcd", endpoint, str(config)))
    assert f"etcd at {endpoint} is unavailable" in error
    assert "malformed etcd endpoint" in failed(run_azfs("volumes", "list", "--etcd", "a b"))


def test_flags_are_exclusive(config: Path) -> None:
    result = run_azfs("volumes", "list", "--etcd", "h:1", "--config-file", str(config))
    assert result.returncode == 2 and "not allowed with" in result.stderr


def test_secure_etcd_from_environment(tmp_path: Path, config: Path) -> None:
    """TLS client certificate and user/password (from a file) come from the environment."""
    server = EtcdServer(tmp_path / "etcd", tls=True)
    server.start()
    try:
        server.enable_auth("root-etcd-pw")
        password_file = tmp_path / "etcd-password"
        password_file.write_text("root-etcd-pw\n")
        tls = server.tls_files
        env = {"AZFS_ETCD": server.endpoint, "AZFS_ETCD_CA": tls["ca"],
               "AZFS_ETCD_CERT": tls["cert"], "AZFS_ETCD_KEY": tls["key"],
               "AZFS_ETCD_USER": "root", "AZFS_ETCD_PASSWORD_FILE": str(password_file)}
        ok(run_azfs("volumes", "import", str(config), env=env))
        assert "azure-shard-1" in ok(run_azfs("volumes", "list", env=env))
        password_file.write_text("wrong\n")
        error = failed(run_azfs("volumes", "list", env=env))
        assert "authentication failed" in error and "wrong" not in error
    finally:
        server.stop()
