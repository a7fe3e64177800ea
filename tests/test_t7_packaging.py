"""Packaging: example configs, systemd units, the node install script, the wheel.

The example configs and the configs ``azfs up`` writes are loaded with the
daemons' own loaders (so a renamed key breaks this test, not a node).  The
wheel is built from a copy of the sources with pip and installed with
``--no-deps`` into a fresh venv whose dependencies come from the test
venv's site-packages (added by a ``.pth`` file, not as a site dir, so the
checkout's editable install is not picked up).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from agentd.config import Config as AgentConfig
from azfs import __version__
from azfs.node.configs import write_configs
from azfs.node.layout import Layout, Settings
from azfs.volumes.model import load_yaml_file
from managerd.config import ManagerConfig
from tests.support.services import missing_service

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
EXAMPLES = PACKAGING / "examples"


def _env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_example_configs_load_with_the_daemons_loaders() -> None:
    env = _env_file(EXAMPLES / "managerd.env")
    manager = ManagerConfig.load(EXAMPLES / "manager.toml", env=env)
    assert manager.listen_port == 8630 and manager.etcd and manager.volumes_file is None
    assert manager.db_url.startswith("postgresql+psycopg://")
    assert set(manager.account_keys) == {"mystorageaccount"}
    assert manager.agent_secret is not None and manager.agent_url is not None

    agent = AgentConfig.from_toml(EXAMPLES / "agent.toml")
    assert agent.etcd and agent.manager_listen and agent.cache_bytes > 0
    assert agent.socket == Path("/run/azfs/agent.sock")
    assert not agent.unmount_on_exit  # containers keep their mounts across restarts

    volumes = load_yaml_file(EXAMPLES / "volumes.yaml")
    assert [(v.name, v.mount.at, v.mount.fstype) for v in volumes] == [
        ("azure-shard-1", "requested", "cifs"), ("azure-shard-2", "requested", "cifs"),
        ("samples", "startup", "cifs")]
    assert all(v.mount.password is None for v in volumes)


@pytest.mark.parametrize("etcd", [None, "local"])
def test_configs_written_by_up_load_with_the_daemons_loaders(tmp_path: Path,
                                                             etcd: str | None) -> None:
    layout = Layout(tmp_path / "node")
    layout.make_dirs()
    layout.storage_key_secret()
    write_configs(layout, Settings(etcd=etcd, manager_port=9999))
    manager = ManagerConfig.load(layout.manager_toml, env={})
    agent = AgentConfig.from_toml(layout.agent_toml)
    assert manager.listen_port == 9999 and agent.socket == layout.agent_socket
    assert manager.agents["local"].socket == agent.socket
    assert (manager.etcd, agent.etcd) == ((f"127.0.0.1:{Settings().etcd_port}",) * 2
                                          if etcd else (None, None))
    assert agent.unmount_on_exit and agent.mountpoint == layout.fuse_mountpoint
    assert [v.name for v in load_yaml_file(layout.volumes_yaml)] == ["local-share"]
    key = layout.storage_key_secret().reveal()
    for path in (layout.manager_toml, layout.agent_toml, layout.volumes_yaml):
        assert key not in path.read_text()
    assert layout.storage_key.stat().st_mode & 0o777 == 0o600


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read(PACKAGING / "systemd" / name)
    return parser


def test_systemd_units() -> None:
    agent, manager = _unit("azfs-agentd.service"), _unit("azfs-managerd.service")
    for unit in (agent, manager):
        after = unit["Unit"]["After"].split()
        assert {"network-online.target", "local-fs.target", "remote-fs.target"} <= set(after)
        assert "network-online.target" in unit["Unit"]["Wants"]
        assert unit["Service"]["Restart"] == "on-failure"
        assert unit["Install"]["WantedBy"] == "multi-user.target"
    # the FUSE process is the agent's child: only the agent may be signalled
    assert agent["Service"]["KillMode"] == "process"
    assert "KillMode" not in manager["Service"]
    assert agent["Service"]["ExecStart"].split()[:3] == [
        "/opt/azfs/venv/bin/azfs-agentd", "--config", "/etc/azfs/agent.toml"]
    assert manager["Service"]["ExecStart"].endswith("--config /etc/azfs/manager.toml serve")
    assert manager["Service"]["EnvironmentFile"] == "-/etc/azfs/managerd.env"


def test_scripts_parse_and_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    for script in PACKAGING.glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    prefix = tmp_path / "opt"
    done = subprocess.run([str(PACKAGING / "install-node.sh"), "--dry-run", "--prefix",
                           str(prefix)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"[dry-run] python3 -m venv {prefix}/venv" in out or \
        f"{prefix}/venv is up to date" in out
    assert "azfs-agentd.service" in out and "azfs-managerd.service" in out
    assert not prefix.exists()
    bad = subprocess.run([str(PACKAGING / "install-node.sh"), "--nope"], capture_output=True,
                         text=True, timeout=30, check=False)
    assert bad.returncode == 2 and "unknown option --nope" in bad.stderr


#: imports refused in the subprocess below: the manager's extra is not installed
_NODE_CHECK = r"""
import importlib, importlib.abc, pkgutil, runpy, sys

BLOCKED = ("sqlalchemy", "alembic", "psycopg")

class NoManagerExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (manager extra absent)")
        return None

sys.meta_path.insert(0, NoManagerExtra())
import agentd, azfs
count = 0
for pkg in (azfs, agentd):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
        count += 1
try:
    import managerd.db.session
except ModuleNotFoundError as exc:
    print("manager refused:", exc)
print("imported", count)
for module in ("agentd.main", "agentd.fusehost", "azfs.cli.main"):
    sys.argv = [module, "--help"]
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (0, None), (module, exc.code)
print("ran", module)
"""


def test_a_compute_node_needs_no_manager_extra(tmp_path: Path) -> None:
    """Every module of azfs and agentd imports, and the agent, its FUSE process and the
    CLI start, with SQLAlchemy, alembic and psycopg refused at import."""
    done = subprocess.run([sys.executable, "-c", _NODE_CHECK], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "manager refused: No module named 'sqlalchemy'" in done.stdout, done.stdout
    assert int(done.stdout.split("imported ")[1].split()[0]) > 50, done.stdout
    assert "ran azfs.cli.main" in done.stdout


def test_declared_dependencies_match_the_imports() -> None:
    """Roles: the database stack only in the extra ``manager``; grpc declared because it
    is imported; nothing declared that is never imported."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {_dist(d) for d in project["dependencies"]}
    manager = {_dist(d) for d in project["optional-dependencies"]["manager"]}
    assert manager == {"sqlalchemy", "alembic", "psycopg"}
    assert not base & manager
    assert "grpcio" in base and "azure-storage-file-share" not in base
    sources = "\n".join(p.read_text() for root in ("azfs", "agentd", "managerd")
                        for p in (REPO / root).rglob("*.py"))
    imported_as = {"azure-storage-blob": "azure.storage.blob", "grpcio": "grpc",
                   "hypercorn": "hypercorn", "pyyaml": "yaml", "tomli-w": "tomli_w",
                   "prometheus-client": "prometheus_client", "pyfuse3": "pyfuse3",
                   "psycopg": None, "protobuf": None}  # None: loaded by another package
    for dist in base | manager:
        module = imported_as.get(dist, dist.replace("-", "_"))
        if module is not None:
            assert f"import {module}" in sources or f"from {module}" in sources, dist


def _dist(requirement: str) -> str:
    import re

    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def _copy_sources(dest: Path) -> None:
    skip = shutil.ignore_patterns(".venv", ".cache", ".git", "build", "dist", "*.egg-info",
                                  "__pycache__", "tests", "bench", ".pytest_cache",
                                  ".hypothesis", ".ruff_cache", "node_modules")
    shutil.copytree(REPO, dest, ignore=skip, symlinks=True)


def test_wheel_builds_and_installs_into_a_clean_venv(tmp_path: Path) -> None:
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    _copy_sources(src)
    try:
        import build  # noqa: F401
        cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)]
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
               str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0 and "Could not find a version" in done.stderr:
        missing_service("the build backend (setuptools, wheel) cannot be fetched here")
    assert done.returncode == 0, done.stderr[-2000:]
    wheels = list(dist.glob("azfs-*.whl"))
    assert [w.name for w in wheels] == [f"azfs-{__version__}-py3-none-any.whl"]
    # the roles in the wheel's metadata: the database stack only with the manager extra
    import zipfile

    with zipfile.ZipFile(wheels[0]) as whl:
        meta = whl.read(f"azfs-{__version__}.dist-info/METADATA").decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    assert any(r.lower().startswith("grpcio") and "extra" not in r for r in requires)
    for dist_name in ("sqlalchemy", "alembic", "psycopg"):
        (req,) = [r for r in requires if _dist(r) == dist_name]
        assert 'extra == "manager"' in req, req
    assert not any(_dist(r) == "azure-storage-file-share" for r in requires)

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "-q", "--no-deps", "--no-index", str(wheels[0])],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # dependencies from the test venv, after the wheel's own files on sys.path
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=60, check=False)

    version = run(str(venv / "bin" / "azfs"), "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"azfs {__version__}"), \
        version.stderr
    where = run(str(python), "-c", "import azfs, agentd, managerd, azfs.node; "
                "print(azfs.__file__, agentd.__file__, managerd.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(path.startswith(str(site)) for path in where.stdout.split()), where.stdout
    # the migrations ship with the wheel: a fresh SQLite database gets its schema
    migrate = run(str(venv / "bin" / "azfs-managerd"), "--state-dir",
                  str(tmp_path / "mgr"), "migrate")
    assert migrate.returncode == 0, migrate.stderr
    assert (tmp_path / "mgr" / "managerd.db").stat().st_size > 0
    assert run(str(venv / "bin" / "azfs-agentd"), "--help").returncode == 0
