"""Kernel containers under real runc: binds, uid 1000, scratch home, teardown.

Every test runs real containers from a busybox rootfs (built once per
session); each ``runc`` fixture has its own state root and fails the test if
a container is left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from azfs.containers.rootfs import build_busybox_rootfs
from azfs.containers.runc import (
    ContainerError,
    KernelContainer,
    Runc,
    oci_config,
    run_kernel,
    write_bundle,
)
from azfs.containers.spec import BindMount, KernelSpec
from azfs.errors import InvalidArgument, UserError
from azfs.export import ExportResponse, OciMount
from tests.support.containers import (  # noqa: F401
    busybox_rootfs_fixture,
    container_id,
    mountpoints_under,
    runc_fixture,
)


def _owned_dir(path: Path, uid: int = 1000) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


def _run(runc: Runc, rootfs: Path, bundle: Path, script: str, **spec: object):
    kernel = KernelSpec(kernel_id=container_id(), args=("sh", "-c", script), **spec)
    write_bundle(kernel, rootfs, bundle)
    return runc.run(bundle, kernel.kernel_id)


# --- rootfs -------------------------------------------------------------------------


def test_rootfs_has_work_user_and_applets(busybox_rootfs: Path) -> None:
    assert (busybox_rootfs / "bin" / "busybox").is_file()
    for applet in ("sh", "cat", "ls", "touch", "stat", "id", "sleep", "dd"):
        assert os.readlink(busybox_rootfs / "bin" / applet) == "busybox"
    assert "work:x:1000:1000:" in (busybox_rootfs / "etc" / "passwd").read_text()
    assert (busybox_rootfs / "home" / "work").stat().st_uid == 1000


def test_rootfs_refuses_existing_destination_and_dynamic_busybox(tmp_path: Path) -> None:
    (tmp_path / "there").mkdir()
    with pytest.raises(UserError, match="exists already"):
        build_busybox_rootfs(tmp_path / "there")
    with pytest.raises(UserError, match="not a static busybox"):
        build_busybox_rootfs(tmp_path / "new", busybox="/bin/ls")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]


# --- binds --------------------------------------------------------------------------


def test_rw_bind_written_as_uid_1000_and_read_back(runc: Runc, busybox_rootfs: Path,
                                                   tmp_path: Path) -> None:
    data = _owned_dir(tmp_path / "vfolder")
    binds = (BindMount(data, "/home/work/data", readonly=False),)
    result = _run(runc, busybox_rootfs, tmp_path / "b1",
                  "id -u; echo written-inside > /home/work/data/x", binds=binds)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "1000"
    assert (data / "x").read_text() == "written-inside\n"
    assert (data / "x").stat().st_uid == 1000

    again = _run(runc, busybox_rootfs, tmp_path / "b2", "cat /home/work/data/x",
                 binds=(BindMount(data, "/home/work/data", readonly=True),))
    assert again.exit_code == 0, again.stderr
    assert again.stdout == "written-inside\n"


def test_ro_bind_refuses_writes_with_erofs(runc: Runc, busybox_rootfs: Path,
                                           tmp_path: Path) -> None:
    data = _owned_dir(tmp_path / "vfolder")
    (data / "x").write_text("original\n")
    binds = (BindMount(data, "/home/work/data", readonly=True),)
    result = _run(runc, busybox_rootfs, tmp_path / "b",
                  "cat /home/work/data/x; echo changed > /home/work/data/x; "
                  "touch /home/work/data/new", binds=binds)
    assert result.exit_code != 0
    assert result.stdout == "original\n"
    assert result.stderr.count(os.strerror(30)) == 2, result.stderr  # EROFS
    assert (data / "x").read_text() == "original\n"
    assert not (data / "new").exists()


def test_scratch_dir_is_home_and_binds_sit_on_top(runc: Runc, busybox_rootfs: Path,
                                                  tmp_path: Path) -> None:
    scratch = _owned_dir(tmp_path / "scratch")
    data = _owned_dir(tmp_path / "vfolder")
    (data / "in-vfolder").write_text("v")
    binds = (BindMount(data, "/home/work/data", readonly=False),)
    result = _run(runc, busybox_rootfs, tmp_path / "b",
                  "pwd; echo $HOME; echo s > notes; ls /home/work/data", binds=binds,
                  scratch_dir=scratch)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["/home/work", "/home/work", "in-vfolder"]
    assert (scratch / "notes").read_text() == "s\n"
    assert (scratch / "notes").stat().st_uid == 1000
    assert not (busybox_rootfs / "home" / "work" / "notes").exists()


def test_nested_binds_are_mounted_parent_first(runc: Runc, busybox_rootfs: Path,
                                               tmp_path: Path) -> None:
    outer, inner = _owned_dir(tmp_path / "outer"), _owned_dir(tmp_path / "inner")
    (inner / "marker").write_text("inner")
    (outer / "sub").mkdir()
    # given child first: the spec must still mount the parent first
    binds = (BindMount(inner, "/home/work/a/sub", readonly=True),
             BindMount(outer, "/home/work/a", readonly=False))
    result = _run(runc, busybox_rootfs, tmp_path / "b", "cat /home/work/a/sub/marker",
                  binds=binds, scratch_dir=_owned_dir(tmp_path / "scratch"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "inner"


def test_run_kernel_applies_an_export_response(busybox_rootfs: Path, tmp_path: Path) -> None:
    data = _owned_dir(tmp_path / "vfolder")
    export = ExportResponse(kernel_id=container_id("k"), mounts=[
        OciMount(destination="/home/work/data", source=str(data), options=["rbind", "rw"])])
    state = tmp_path / "state"
    result = run_kernel(busybox_rootfs, export, ["sh", "-c", "echo 1 > data/y; id -g"],
                        scratch_dir=tmp_path / "scratch", runc_root=state)
    assert result.ok, result.stderr
    assert result.stdout.strip() == "1000"
    assert (data / "y").read_text() == "1\n"
    assert (tmp_path / "scratch").stat().st_uid == 1000
    assert Runc(state).list() == []


# --- process, namespaces, rootfs ----------------------------------------------------


def test_exit_code_and_streams_are_the_process_own(runc: Runc, busybox_rootfs: Path,
                                                   tmp_path: Path) -> None:
    result = _run(runc, busybox_rootfs, tmp_path / "b", "echo out; echo err >&2; exit 7")
    assert (result.exit_code, result.stdout, result.stderr) == (7, "out\n", "err\n")


def test_network_none_has_only_loopback_and_host_shares_the_node(
        runc: Runc, busybox_rootfs: Path, tmp_path: Path) -> None:
    def interfaces(text: str) -> set[str]:
        return {line.split(":")[0].strip() for line in text.splitlines()[2:]}

    none = _run(runc, busybox_rootfs, tmp_path / "b1", "cat /proc/net/dev", network="none")
    host = _run(runc, busybox_rootfs, tmp_path / "b2", "cat /proc/net/dev", network="host")
    assert interfaces(none.stdout) == {"lo"}
    assert interfaces(host.stdout) == interfaces(Path("/proc/net/dev").read_text())


def test_readonly_rootfs_keeps_home_and_tmp_writable(runc: Runc, busybox_rootfs: Path,
                                                     tmp_path: Path) -> None:
    own_home = _run(runc, busybox_rootfs, tmp_path / "b1", "touch /tmp/ok && touch bad",
                    readonly_rootfs=True)
    assert own_home.exit_code != 0
    assert os.strerror(30) in own_home.stderr  # EROFS, not a permission error
    assert not (busybox_rootfs / "home" / "work" / "bad").exists()

    scratch = _owned_dir(tmp_path / "scratch")
    with_scratch = _run(runc, busybox_rootfs, tmp_path / "b2", "touch /tmp/ok && touch ok",
                        scratch_dir=scratch, readonly_rootfs=True)
    assert with_scratch.exit_code == 0, with_scratch.stderr
    assert (scratch / "ok").exists()


def test_config_follows_the_oci_spec(tmp_path: Path) -> None:
    spec = KernelSpec(kernel_id="k1", args=("true",), scratch_dir=tmp_path,
                      binds=(BindMount(tmp_path, "/home/work/d", readonly=True),),
                      env={"A": "1"})
    config = oci_config(spec, "/rootfs")
    assert config["process"]["user"] == {"uid": 1000, "gid": 1000}
    assert config["process"]["terminal"] is False
    assert config["process"]["cwd"] == "/home/work"
    assert "A=1" in config["process"]["env"]
    assert {n["type"] for n in config["linux"]["namespaces"]} == \
        {"pid", "ipc", "uts", "mount", "network"}
    binds = [m for m in config["mounts"] if m["type"] == "bind"]
    assert [(m["destination"], m["options"][:2]) for m in binds] == [
        ("/home/work", ["rbind", "rw"]), ("/home/work/d", ["rbind", "ro"])]
    assert [m["destination"] for m in config["mounts"][:1]] == ["/proc"]
    assert "cgroupsPath" not in config["linux"]
    json.dumps(config)


# --- long-running kernels and teardown ----------------------------------------------


def test_start_exec_kill_delete_leave_nothing(runc: Runc, busybox_rootfs: Path,
                                              tmp_path: Path) -> None:
    data = _owned_dir(tmp_path / "vfolder")
    scratch = _owned_dir(tmp_path / "scratch")
    bundle = tmp_path / "bundle"
    cid = container_id("long")
    spec = KernelSpec(kernel_id=cid, args=("sleep", "600"), scratch_dir=scratch,
                      binds=(BindMount(data, "/home/work/data", readonly=False),))
    write_bundle(spec, busybox_rootfs, bundle)
    with runc.running(bundle, cid):
        assert runc.state(cid)["status"] == "running"
        written = runc.exec(cid, ["sh", "-c", "echo e > data/e; id -u; echo $TOKEN"],
                            env={"TOKEN": "t0ken", "PATH": "/bin"})
        assert (written.exit_code, written.stdout) == (0, "1000\nt0ken\n"), written.stderr
        assert (data / "e").read_text() == "e\n"
        failed = runc.exec(cid, ["sh", "-c", "exit 4"])
        assert failed.exit_code == 4
        with pytest.raises(ContainerError, match="exec"):
            runc.exec(cid, ["/no/such/program"])
        with pytest.raises(ContainerError, match="exec"):
            runc.exec(cid, ["cat"], env={"PATH": "/nowhere"})  # the caller's PATH wins
        with pytest.raises(InvalidArgument, match="environment"):
            runc.exec(cid, ["true"], env={"A=B": "1"})
        with pytest.raises(ContainerError, match="already exists"):
            runc.start(bundle, cid)
        assert runc.state(cid)["status"] == "running"
        runc.kill(cid, 9)
    assert runc.list() == []
    runc.delete(cid)  # deleting twice is fine
    assert mountpoints_under(tmp_path) == []
    assert mountpoints_under(busybox_rootfs) == []


def test_runc_failure_is_a_clear_error_and_leaves_nothing(runc: Runc, busybox_rootfs: Path,
                                                          tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    spec = KernelSpec(kernel_id=container_id(), args=("/no/such/program",))
    write_bundle(spec, busybox_rootfs, bundle)
    with pytest.raises(ContainerError, match="no such file or directory") as err:
        runc.run(bundle, spec.kernel_id)
    assert "/no/such/program" in str(err.value)
    with pytest.raises(ContainerError, match="runc could not start"):
        runc.start(bundle, spec.kernel_id)
    with pytest.raises(ContainerError, match="does not exist"):
        runc.kill("azfs-missing", 15)
    assert runc.list() == []
    assert mountpoints_under(tmp_path) == []


def test_missing_bind_source_is_refused_before_runc(busybox_rootfs: Path,
                                                    tmp_path: Path) -> None:
    spec = KernelSpec(kernel_id="k", args=("true",),
                      binds=(BindMount(tmp_path / "gone", "/home/work/d", readonly=True),))
    with pytest.raises(InvalidArgument, match="not usable"):
        write_bundle(spec, busybox_rootfs, tmp_path / "bundle")
    with pytest.raises(InvalidArgument, match="root filesystem"):
        write_bundle(KernelSpec(kernel_id="k", args=("true",)), tmp_path, tmp_path / "b2")
    assert not (tmp_path / "bundle").exists()
    assert not (tmp_path / "b2").exists()


def test_bind_from_an_azfs_fuse_mount_as_uid_1000(runc: Runc, busybox_rootfs: Path,
                                                  tmp_path: Path, mounted) -> None:
    """A bind source inside the FUSE mount (allow_other), as the agent exports it."""
    vfolder = _owned_dir(tmp_path / "vfolder-src")
    fuse = mounted("--uid", "1000", "--gid", "1000", source=vfolder)
    result = _run(runc, busybox_rootfs, tmp_path / "b",
                  "echo via-fuse > /home/work/data/x && stat -c %u /home/work/data/x",
                  binds=(BindMount(fuse.mnt, "/home/work/data", readonly=False),))
    assert (result.exit_code, result.stdout) == (0, "1000\n"), result.stderr
    assert (vfolder / "x").read_text() == "via-fuse\n"
    ro = _run(runc, busybox_rootfs, tmp_path / "b2", "cat data/x; touch data/y",
              binds=(BindMount(fuse.mnt, "/home/work/data", readonly=True),))
    assert ro.stdout == "via-fuse\n"
    assert os.strerror(30) in ro.stderr
    assert not (vfolder / "y").exists()


def test_run_timeout_kills_and_removes_the_container(runc: Runc, busybox_rootfs: Path,
                                                     tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    spec = KernelSpec(kernel_id=container_id(), args=("sleep", "600"))
    write_bundle(spec, busybox_rootfs, bundle)
    with pytest.raises(ContainerError, match="did not finish"):
        runc.run(bundle, spec.kernel_id, timeout=0.5)
    assert runc.list() == []


def test_run_never_removes_a_container_it_did_not_make(runc: Runc, busybox_rootfs: Path,
                                                       tmp_path: Path) -> None:
    cid = container_id("dup")
    write_bundle(KernelSpec(kernel_id=cid, args=("sleep", "600")), busybox_rootfs,
                 tmp_path / "long")
    write_bundle(KernelSpec(kernel_id=cid, args=("true",)), busybox_rootfs, tmp_path / "once")
    with runc.running(tmp_path / "long", cid):
        with pytest.raises(ContainerError, match="already exists"):
            runc.run(tmp_path / "once", cid)
        assert runc.state(cid)["status"] == "running"


def test_stdin_reaches_the_process(runc: Runc, busybox_rootfs: Path, tmp_path: Path) -> None:
    spec = KernelSpec(kernel_id=container_id(), args=("wc", "-c"))
    write_bundle(spec, busybox_rootfs, tmp_path / "b")
    result = runc.run(tmp_path / "b", spec.kernel_id, stdin=b"12345")
    assert (result.exit_code, result.stdout.strip()) == (0, "5")


def test_kernel_container_from_an_export(runc: Runc, busybox_rootfs: Path,
                                         tmp_path: Path) -> None:
    data = _owned_dir(tmp_path / "vfolder")
    export = ExportResponse(kernel_id=container_id("kc"), mounts=[
        OciMount(destination="/home/work/data", source=str(data), options=["rbind", "ro"])])
    (data / "f").write_text("F\n")
    with KernelContainer(busybox_rootfs, export, ["sleep", "600"], runc=runc,
                         bundle_dir=tmp_path / "bundle", scratch_dir=tmp_path / "home",
                         env={"GREETING": "hi"}) as kernel:
        assert kernel.status() == "running"
        assert (tmp_path / "bundle" / "config.json").stat().st_mode & 0o777 == 0o600
        r = kernel.sh("echo $GREETING; pwd; cat data/f; id -u")
        assert r.stdout.split() == ["hi", "/home/work", "F", "1000"], r.stderr
    assert kernel.status() == "absent"
    assert runc.list() == []


def test_an_rslave_home_receives_mounts_made_after_the_start(runc: Runc, busybox_rootfs: Path,
                                                             tmp_path: Path) -> None:
    """The mechanism kernel homes rely on: a shared host directory bound ``rslave`` as
    /home/work replaces the scratch dir, and a bind placed in it later (or removed)
    shows (or vanishes) in the running container."""
    from agentd.homes import Bind, KernelHomes

    homes = KernelHomes(tmp_path / "state")
    home = homes.prepare("k", 1000, 1000)
    late = _owned_dir(tmp_path / "late")
    (late / "f").write_text("late\n")
    export = ExportResponse(kernel_id=container_id("rs"), mounts=[
        OciMount(destination="/home/work", source=str(home),
                 options=["rbind", "rslave", "rw"])])
    try:
        with KernelContainer(busybox_rootfs, export, ["sleep", "600"], runc=runc,
                             bundle_dir=tmp_path / "bundle",
                             scratch_dir=tmp_path / "unused") as kernel:
            assert kernel.scratch == home and not (tmp_path / "unused").exists()
            config = json.loads((tmp_path / "bundle" / "config.json").read_text())
            assert [m["options"] for m in config["mounts"] if m["type"] == "bind"] == [
                ["rbind", "rw", "nosuid", "nodev", "rslave"]]
            assert kernel.sh("echo home > /home/work/h").exit_code == 0
            assert (home / "h").read_text() == "home\n"
            homes.place("k", Bind(rel="late", source=str(late), read_only=True))
            r = kernel.sh("cat /home/work/late/f; echo x > /home/work/late/g")
            assert r.stdout == "late\n" and os.strerror(30) in r.stderr, r.stderr
            homes.remove("k", "late")
            assert kernel.sh("ls /home/work/late").exit_code != 0
    finally:
        homes.teardown()
    assert mountpoints_under(tmp_path) == []
