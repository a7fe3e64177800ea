"""Host mounting with real mounts: bind and tmpfs volumes, dead FUSE mounts, refcount storms.

The kernel here has no cifs module, so the cifs path is tested up to the
mount(8) invocation.  The one allowed mock: ``HostMounter(run_mount=...)``
replaced by a recorder that checks the command line and the credentials file
at the moment mount(8) would run (and, for the success path, stands in for
the kernel's cifs mount with a real bind mount).  Everything else, including
the real mount(8) failing on cifs, runs for real.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio

from azfs.secret import Secret
from azfs.volumes import mountinfo
from azfs.volumes.hostmount import (
    HostMounter,
    MountError,
    MountResult,
    is_stale,
    lazy_unmount,
    plan_mount,
    stale_errno,
)
from azfs.volumes.model import MountSpec, Volume
from tests.support.services import wait_until

PASSWORD = "Pw-5ecret!xyz"


def bind(name: str, source: Path, at: str = "requested", options: str = "") -> Volume:
    return Volume(name, MountSpec(at=at, fstype="bind", path=str(source),  # type: ignore[arg-type]
                                  options=options))


def cifs(name: str = "shard", options: str = "vers=3.0,username=acct,sec=ntlmssp",
         password: str | None = PASSWORD) -> Volume:
    return Volume(name, MountSpec(at="requested", fstype="cifs",
                                  path="//acct.file.core.windows.net/share", options=options,
                                  password=Secret(password) if password else None))


def source(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / "sources" / name
    directory.mkdir(parents=True)
    (directory / "marker").write_text(name)
    return directory


def mount_count(path: Path) -> int:
    return len(mountinfo.mounts_at(path))


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    state = (tmp_path / "state").resolve()
    state.mkdir()
    try:
        yield state
    finally:
        for entry in sorted(mountinfo.mounts_under(tmp_path.resolve()),
                            key=lambda e: -len(e.mount_point)):
            subprocess.run(["umount", "-l", entry.mount_point], check=False)


@pytest.fixture
def mounter(state_dir: Path) -> HostMounter:
    return HostMounter(state_dir, uid=1000, gid=1000)


# -- bind and pass-through volumes, end to end ---------------------------------------------


async def test_acquire_mounts_once_and_release_unmounts(mounter: HostMounter,
                                                        tmp_path: Path) -> None:
    volume = bind("data", source(tmp_path, "data"))
    path = await mounter.acquire(volume)
    assert path == mounter.path_for("data") == mounter.state_dir / "volumes" / "data"
    assert (path / "marker").read_text() == "data"
    assert await mounter.acquire(volume) == path
    assert mount_count(path) == 1
    assert mounter.mounts() == {"data": (path, 2)}
    await mounter.release(volume)
    assert mount_count(path) == 1
    await mounter.release(volume)
    assert mount_count(path) == 0 and not path.exists()
    assert mounter.mounts() == {}


async def test_read_only_bind(mounter: HostMounter, tmp_path: Path) -> None:
    path = await mounter.acquire(bind("ro", source(tmp_path, "ro"), options="ro"))
    with pytest.raises(OSError) as info:
        (path / "new").write_text("x")
    assert info.value.errno == errno.EROFS
    assert "ro" in mountinfo.mounts_at(path)[0].mount_options.split(",")


async def test_other_fstype_passes_through_to_mount(mounter: HostMounter) -> None:
    volume = Volume("scratch", MountSpec(at="requested", fstype="tmpfs", path="tmpfs",
                                         options="size=1m,mode=0750"))
    path = await mounter.acquire(volume)
    (entry,) = mountinfo.mounts_at(path)
    assert entry.fstype == "tmpfs" and "size=1024k" in entry.super_options
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    await mounter.release(volume)
    assert mount_count(path) == 0


async def test_startup_volumes_stay_until_release_all(mounter: HostMounter,
                                                      tmp_path: Path) -> None:
    startup = bind("samples", source(tmp_path, "samples"), at="startup")
    requested = bind("homes", source(tmp_path, "homes"))
    assert await mounter.mount_startup([startup, requested]) == {}
    assert set(mounter.mounts()) == {"samples"}
    await mounter.acquire(startup)
    await mounter.release(startup)
    assert mount_count(mounter.path_for("samples")) == 1
    await mounter.acquire(requested)
    await mounter.release_all()
    assert mounter.mounts() == {}
    assert mountinfo.mounts_under(mounter.state_dir) == []


async def test_mount_startup_mounts_what_it_can(mounter: HostMounter, tmp_path: Path) -> None:
    good = bind("good", source(tmp_path, "good"), at="startup")
    bad = bind("bad", tmp_path / "missing", at="startup")
    failures = await mounter.mount_startup([bad, good])
    assert set(failures) == {"bad"} and "bind source" in str(failures["bad"])
    assert set(mounter.mounts()) == {"good"}


async def test_release_of_unacquired_volume_is_ignored(mounter: HostMounter,
                                                       tmp_path: Path) -> None:
    volume = bind("v", source(tmp_path, "v"))
    await mounter.release(volume)
    path = await mounter.acquire(volume)
    await mounter.release(volume)
    await mounter.release(volume)
    assert mount_count(path) == 0


async def test_mount_removed_behind_our_back_is_mounted_again(mounter: HostMounter,
                                                              tmp_path: Path) -> None:
    volume = bind("v", source(tmp_path, "v"))
    path = await mounter.acquire(volume)
    subprocess.run(["umount", str(path)], check=True)
    assert await mounter.acquire(volume) == path
    assert mount_count(path) == 1 and (path / "marker").exists()
    assert mounter.mounts()["v"][1] == 2


async def test_mount_left_by_a_previous_run_is_adopted(mounter: HostMounter,
                                                       tmp_path: Path) -> None:
    src = source(tmp_path, "v")
    path = mounter.path_for("v")
    path.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(src), str(path)], check=True)
    await mounter.acquire(bind("v", src))
    assert mount_count(path) == 1
    await mounter.release(bind("v", src))
    assert mount_count(path) == 0


async def test_bind_source_missing_leaves_nothing(mounter: HostMounter, tmp_path: Path) -> None:
    with pytest.raises(MountError, match=r"cannot mount volume 'gone': bind source .* is not"):
        await mounter.acquire(bind("gone", tmp_path / "nowhere"))
    assert not mounter.path_for("gone").exists()
    assert mounter.mounts() == {}


@pytest.mark.parametrize(("fstype", "path", "options", "message"), [
    ("tmpfs", "tmpfs", "size=banana", "wrong fs type, bad option"),
    ("ext4", "/dev/azfs-test-no-such-device", "", "azfs-test-no-such-device"),
])
async def test_mount_failure_surfaces_mount_message(mounter: HostMounter, fstype: str, path: str,
                                                    options: str, message: str) -> None:
    volume = Volume("broken", MountSpec(at="requested", fstype=fstype, path=path,
                                        options=options))
    with pytest.raises(MountError) as info:
        await mounter.acquire(volume)
    assert str(info.value).startswith(f"cannot mount volume 'broken' ({fstype} {path}): ")
    assert message in str(info.value)
    assert mount_count(mounter.path_for("broken")) == 0
    assert not mounter.path_for("broken").exists()
    assert mounter.mounts() == {}


# -- refcount storms ----------------------------------------------------------------------------


async def test_concurrent_acquire_release_storm(mounter: HostMounter, tmp_path: Path) -> None:
    volumes = [bind(f"v{i}", source(tmp_path, f"v{i}")) for i in range(4)]
    volumes.append(bind("startup", source(tmp_path, "startup"), at="startup"))
    held: dict[str, int] = {v.name: 0 for v in volumes}
    problems: list[str] = []
    rng = random.Random(1234)

    async def worker(seed: int) -> None:
        local = random.Random(seed)
        mine: list[Volume] = []
        for _ in range(12):
            if mine and local.random() < 0.5:
                volume = mine.pop(local.randrange(len(mine)))
                held[volume.name] -= 1
                await mounter.release(volume)
            else:
                volume = local.choice(volumes)
                path = await mounter.acquire(volume)
                held[volume.name] += 1
                mine.append(volume)
                if not (path / "marker").exists():
                    problems.append(f"{volume.name} not usable right after acquire")
            await trio.sleep(0)
            for volume in mine:  # nobody unmounts what a holder still uses
                if not (mounter.path_for(volume.name) / "marker").exists():
                    problems.append(f"{volume.name} vanished while held")
        for volume in mine[: len(mine) // 2]:
            held[volume.name] -= 1
            await mounter.release(volume)

    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(worker, rng.randrange(2**32))

    assert problems == []
    refs = {name: count for name, (_p, count) in mounter.mounts().items()}
    for volume in volumes:
        path = mounter.path_for(volume.name)
        expect_mounted = held[volume.name] > 0 or (volume.mount.at == "startup"
                                                   and volume.name in refs)
        assert mount_count(path) == (1 if expect_mounted else 0), volume.name
        assert refs.get(volume.name, 0) == held[volume.name]
    # releasing every remaining reference leaves only the startup volume
    for volume in volumes:
        for _ in range(held[volume.name]):
            await mounter.release(volume)
    for volume in volumes[:4]:
        assert mount_count(mounter.path_for(volume.name)) == 0
    await mounter.release_all()
    assert mountinfo.mounts_under(mounter.state_dir) == []


# -- stale mounts -------------------------------------------------------------------------------


def dead_fuse_mount(src: Path, target: Path) -> None:
    """A real stale mount: bindfs at ``target``, then its process killed with SIGKILL."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["bindfs", "-f", str(src), str(target)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: mountinfo.is_mounted(target), 15, "bindfs", proc)
    finally:
        proc.kill()
        proc.wait(10)


def test_is_stale_on_a_dead_fuse_mount(tmp_path: Path, state_dir: Path) -> None:
    target = state_dir / "fuse"
    dead_fuse_mount(source(tmp_path, "fuse-src"), target)
    with pytest.raises(OSError) as info:
        os.stat(target)
    dead = (errno.ENOTCONN, errno.ECONNABORTED)  # the latter while the kernel tears down
    assert info.value.errno in dead
    assert is_stale(target)
    assert stale_errno(target) in dead
    lazy_unmount(target)
    assert not mountinfo.is_mounted(target)
    assert not is_stale(target)
    lazy_unmount(target)  # nothing mounted: a no-op


def test_is_stale_false_on_healthy_mounts_and_plain_dirs(tmp_path: Path, state_dir: Path) -> None:
    assert not is_stale(tmp_path)
    assert not is_stale(tmp_path / "does-not-exist")
    target = state_dir / "healthy"
    target.mkdir()
    subprocess.run(["mount", "--bind", str(source(tmp_path, "h")), str(target)], check=True)
    assert not is_stale(target)


async def test_stale_volume_mount_is_unmounted_lazily_and_remounted(mounter: HostMounter,
                                                                    tmp_path: Path) -> None:
    path = mounter.path_for("v")
    dead_fuse_mount(source(tmp_path, "old"), path)
    assert is_stale(path)
    volume = bind("v", source(tmp_path, "new"))
    assert await mounter.acquire(volume) == path
    (entry,) = mountinfo.mounts_at(path)
    assert not entry.fstype.startswith("fuse")
    assert (path / "marker").read_text() == "new"
    # it goes stale again while held: the next acquire repairs it too
    await mounter.release(volume)
    dead_fuse_mount(source(tmp_path, "older"), path)
    await mounter.acquire(volume)
    assert (path / "marker").read_text() == "new" and mount_count(path) == 1


# -- cifs, up to the mount(8) invocation --------------------------------------------------------


class RecordingMount:
    """Stands in for mount(8) (the one mock: this kernel has no cifs).

    Records what would be run and the credentials file as it is at that
    moment; ``succeed`` makes it bind-mount a directory at the target, as the
    kernel's cifs mount would mount the share.
    """

    def __init__(self, share: Path | None = None, output: str = "") -> None:
        self.share = share
        self.output = output
        self.calls: list[dict] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> MountResult:
        options = dict(o.partition("=")[::2] for o in argv[argv.index("-o") + 1].split(","))
        credentials = Path(options["credentials"]) if "credentials" in options else None
        record = {"argv": list(argv), "timeout": timeout, "credentials": credentials}
        if credentials is not None:
            record["content"] = credentials.read_text()
            record["mode"] = stat.S_IMODE(credentials.stat().st_mode)
            record["dir_mode"] = stat.S_IMODE(credentials.parent.stat().st_mode)
        self.calls.append(record)
        if self.share is None:
            return MountResult(32, self.output)
        subprocess.run(["mount", "--bind", str(self.share), argv[-1]], check=True)
        return MountResult(0, "")


async def test_cifs_mount_invocation_and_credentials_file(state_dir: Path,
                                                          tmp_path: Path) -> None:
    runner = RecordingMount(share=source(tmp_path, "share"))
    mounter = HostMounter(state_dir, uid=1234, gid=5678, run_mount=runner)
    volume = cifs()
    path = await mounter.acquire(volume)
    (call,) = runner.calls
    assert call["argv"][:4] == ["mount", "-t", "cifs", "-o"]
    assert call["argv"][5:] == ["//acct.file.core.windows.net/share", str(path)]
    options = call["argv"][4].split(",")
    assert options == ["vers=3.0", "sec=ntlmssp", "actimeo=30", "mfsymlinks", "nosharesock",
                       "cache=strict", "nobrl", "file_mode=0700", "dir_mode=0700", "uid=1234",
                       "gid=5678", f"credentials={call['credentials']}"]
    assert all(PASSWORD not in arg and "username" not in arg for arg in call["argv"])
    assert call["content"] == f"username=acct\npassword={PASSWORD}\n"
    assert call["mode"] == 0o600 and call["dir_mode"] == 0o700
    assert call["credentials"].parent == state_dir / "credentials"
    assert not call["credentials"].exists()  # removed once mount(8) has read it
    assert (path / "marker").read_text() == "share"
    await mounter.release(volume)
    assert mount_count(path) == 0
    assert list((state_dir / "credentials").iterdir()) == []


async def test_cifs_failure_is_clear_redacted_and_leaves_nothing(state_dir: Path,
                                                                 caplog) -> None:
    caplog.set_level("DEBUG")
    runner = RecordingMount(output=f"mount error(13): Permission denied (pass={PASSWORD})")
    mounter = HostMounter(state_dir, run_mount=runner)
    with pytest.raises(MountError) as info:
        await mounter.acquire(cifs())
    message = str(info.value)
    assert message.startswith("cannot mount volume 'shard' "
                              "(cifs //acct.file.core.windows.net/share): mount error(13)")
    assert PASSWORD not in message
    assert not runner.calls[0]["credentials"].exists()
    assert list((state_dir / "credentials").iterdir()) == []
    assert not mounter.path_for("shard").exists()
    assert mounter.mounts() == {}
    assert PASSWORD not in caplog.text


def test_cifs_config_overrides_the_azure_files_defaults(tmp_path: Path) -> None:
    volume = cifs(options="vers=3.1.1,username=acct,domain=CORP,actimeo=5,cache=none,"
                          "uid=2000,nomfsymlinks,file_mode=0640")
    plan = plan_mount(volume, tmp_path / "t", 1000, 1000, tmp_path / "cred")
    options = plan.argv[plan.argv.index("-o") + 1].split(",")
    assert options == ["vers=3.1.1", "actimeo=5", "cache=none", "uid=2000", "nomfsymlinks",
                       "file_mode=0640", "nosharesock", "nobrl", "dir_mode=0700", "gid=1000",
                       f"credentials={tmp_path / 'cred'}"]
    assert plan.credentials == f"username=acct\ndomain=CORP\npassword={PASSWORD}\n"


def test_cifs_with_operator_credentials_file(tmp_path: Path) -> None:
    volume = cifs(options="vers=3.0,credentials=/etc/smb/acct.cred", password=None)
    plan = plan_mount(volume, tmp_path / "t", 1000, 1000, tmp_path / "cred")
    assert plan.credentials is None
    assert "credentials=/etc/smb/acct.cred" in plan.argv[4].split(",")
    with pytest.raises(MountError, match="both a password and a credentials file"):
        plan_mount(cifs(options="credentials=/etc/x"), tmp_path / "t", 1, 1, tmp_path / "c")


async def test_cifs_with_the_real_mount_command_fails_cleanly(mounter: HostMounter,
                                                              state_dir: Path) -> None:
    """No mock: mount(8) itself runs and fails (no cifs here); nothing is left behind."""
    with pytest.raises(MountError) as info:
        await mounter.acquire(cifs(options="vers=3.0,username=acct"))
    assert str(info.value).startswith("cannot mount volume 'shard' (cifs ")
    assert PASSWORD not in str(info.value)
    assert list((state_dir / "credentials").iterdir()) == []
    assert not mounter.path_for("shard").exists()


async def test_mount_child_gets_no_secret_and_a_clean_environment(
        state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real child process in place of mount(8) reports its argv and environment."""
    report = tmp_path / "report"
    fake = tmp_path / "fake-mount"
    fake.write_text(f"#!/bin/sh\n{{ echo \"$@\"; env; }} > {report}\n"
                    "echo 'mount error(112): Host is down' >&2\nexit 32\n")
    fake.chmod(0o755)
    monkeypatch.setenv("AZFS_TEST_PARENT_SECRET", PASSWORD)
    mounter = HostMounter(state_dir, mount_binary=str(fake))
    with pytest.raises(MountError, match=r"mount error\(112\): Host is down"):
        await mounter.acquire(cifs())
    text = report.read_text()
    assert PASSWORD not in text
    assert "credentials=" in text and "AZFS_TEST_PARENT_SECRET" not in text


def test_path_for_refuses_unsafe_names(state_dir: Path) -> None:
    mounter = HostMounter(state_dir)
    for name in ("..", "a/b", "", "x y"):
        with pytest.raises(Exception, match="name"):
            mounter.path_for(name)


async def test_state_dir_with_a_space_is_found_in_mountinfo(tmp_path: Path,
                                                            state_dir: Path) -> None:
    """mountinfo escapes a space as \\040; mount state must still be read right."""
    mounter = HostMounter(state_dir / "odd dir", uid=1000, gid=1000)
    volume = bind("v", source(tmp_path, "v"))
    path = await mounter.acquire(volume)
    assert " " in str(path) and mount_count(path) == 1
    assert await mounter.acquire(volume) == path and mount_count(path) == 1
    await mounter.release_all()
    assert mount_count(path) == 0
