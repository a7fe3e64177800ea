"""Kernel specs rendered as ``docker run`` arguments, and the spec's own checks.

Docker's engine does not run on the test machines, so only the rendering is
tested: the argv a Docker user would run, parsed back the way Docker's CLI
reads ``--mount`` (CSV fields, ``key=value``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from azfs.containers.docker import docker_run_args, mount_arg, render
from azfs.containers.spec import BindMount, KernelSpec
from azfs.errors import InvalidArgument
from azfs.export import ExportResponse, OciMount


def _export(*mounts: tuple[str, str, str]) -> ExportResponse:
    return ExportResponse(kernel_id="k-1", mounts=[
        OciMount(destination=d, source=s, options=["rbind", mode]) for d, s, mode in mounts])


def _parse_mount(value: str) -> dict[str, str]:
    """Docker's reading of a --mount value: one CSV record of key[=value] fields."""
    (fields,) = list(csv.reader([value]))
    return dict(f.split("=", 1) if "=" in f else (f, "true") for f in fields)


def _mounts(argv: list[str]) -> list[dict[str, str]]:
    return [_parse_mount(argv[i + 1]) for i, a in enumerate(argv) if a == "--mount"]


def test_export_becomes_mount_arguments_in_mount_order() -> None:
    export = _export(("/home/work/ds", "/mnt/azfs/kernels/k-1/ds", "ro"),
                     ("/home/work/data", "/mnt/azfs/kernels/k-1/data", "rw"))
    spec = KernelSpec.from_export(export, ["python", "train.py"],
                                  scratch_dir=Path("/var/lib/azfs/scratch/k-1"))
    argv = docker_run_args(spec, "busybox:latest")
    assert argv[:2] == ["docker", "run"]
    assert argv[-3:] == ["busybox:latest", "python", "train.py"]
    assert argv[argv.index("--user") + 1] == "1000:1000"
    assert argv[argv.index("--workdir") + 1] == "/home/work"
    assert argv[argv.index("--network") + 1] == "none"
    assert _mounts(argv) == [
        {"type": "bind", "source": "/var/lib/azfs/scratch/k-1", "target": "/home/work"},
        {"type": "bind", "source": "/mnt/azfs/kernels/k-1/data", "target": "/home/work/data"},
        {"type": "bind", "source": "/mnt/azfs/kernels/k-1/ds", "target": "/home/work/ds",
         "readonly": "true"},
    ]
    assert "-v" not in argv and "--volume" not in argv


def test_paths_with_commas_and_quotes_survive_docker_csv_parsing() -> None:
    bind = BindMount(Path('/srv/a,b "c"'), "/home/work/x,y", readonly=True)
    assert _parse_mount(mount_arg(bind)) == {
        "type": "bind", "source": '/srv/a,b "c"', "target": "/home/work/x,y", "readonly": "true"}


def test_rendered_line_is_shell_safe() -> None:
    spec = KernelSpec(kernel_id="k", args=("sh", "-c", "echo $HOME; rm -rf /tmp/x"),
                      env={"GREETING": "hello world"}, uid=1001, gid=1002, network="host",
                      readonly_rootfs=True)
    argv = docker_run_args(spec, "img", name="kernel-k")
    line = render(argv)
    assert "'echo $HOME; rm -rf /tmp/x'" in line
    assert "--env 'GREETING=hello world'" in line
    assert "--env HOME=/home/work" in line
    assert not any(a.startswith("PATH=") for a in argv)  # the image supplies PATH
    assert argv[argv.index("--user") + 1] == "1001:1002"
    assert argv[argv.index("--name") + 1] == "kernel-k"
    assert argv[argv.index("--network") + 1] == "host"
    assert "--read-only" in argv


def test_bad_image_and_newlines_are_refused() -> None:
    spec = KernelSpec(kernel_id="k", args=("true",))
    with pytest.raises(InvalidArgument, match="image"):
        docker_run_args(spec, "--privileged")
    bad = KernelSpec(kernel_id="k", args=("true",),
                     binds=(BindMount(Path("/srv/a\nb"), "/home/work/x", readonly=False),))
    with pytest.raises(InvalidArgument, match="newline"):
        docker_run_args(bad, "img")


# --- the spec's checks, shared by both runtimes ------------------------------------


@pytest.mark.parametrize("options, message", [
    (["rbind"], "exactly one of"),
    (["rbind", "ro", "rw"], "exactly one of"),
])
def test_export_mount_needs_one_mode(options: list[str], message: str) -> None:
    export = ExportResponse(kernel_id="k", mounts=[
        OciMount(destination="/home/work/d", source="/srv/d", options=options)])
    with pytest.raises(InvalidArgument, match=message):
        KernelSpec.from_export(export, ["true"])


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel_id": "../x"}, "kernel id"),
    ({"args": ()}, "args"),
    ({"args": ("",)}, "args"),
    ({"uid": -1}, "uid"),
    ({"env": {"A=B": "1"}}, "environment"),
    ({"cwd": "relative"}, "absolute"),
    ({"network": "bridge"}, "network"),
    ({"scratch_dir": Path("rel")}, "scratch_dir"),
    ({"binds": (BindMount(Path("/a"), "/home/work/d", True),
                BindMount(Path("/b"), "/home/work/d/", True))}, "two binds"),
    ({"scratch_dir": Path("/s"), "binds": (BindMount(Path("/a"), "/home/work", True),)},
     "scratch"),
])
def test_bad_specs_are_refused(kwargs: dict, message: str) -> None:
    base = {"kernel_id": "k", "args": ("true",)}
    with pytest.raises(InvalidArgument, match=message):
        KernelSpec(**{**base, **kwargs})


@pytest.mark.parametrize("source, destination, message", [
    ("relative", "/home/work/d", "absolute path"),
    ("/srv", "home/work/d", "absolute container path"),
    ("/srv", "/home/work/../etc", "'..'"),
    ("/srv", "/", "must not be '/'"),
])
def test_bad_binds_are_refused(source: str, destination: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        BindMount(Path(source), destination, readonly=True)


def test_a_kernel_home_replaces_the_scratch_dir_and_keeps_rslave() -> None:
    export = ExportResponse(kernel_id="k-1", mounts=[
        OciMount(destination="/home/work", source="/var/lib/azfs/agent/homes/k-1",
                 options=["rbind", "rslave", "rw"]),
        OciMount(destination="/opt/ds", source="/var/lib/azfs/agent/fuse/kernels/k-1/ds",
                 options=["rbind", "ro"])])
    spec = KernelSpec.from_export(export, ["true"], scratch_dir=Path("/scratch/k-1"))
    assert spec.scratch_dir is None
    assert _mounts(docker_run_args(spec, "busybox")) == [
        {"type": "bind", "source": "/var/lib/azfs/agent/homes/k-1", "target": "/home/work",
         "bind-propagation": "rslave"},
        {"type": "bind", "source": "/var/lib/azfs/agent/fuse/kernels/k-1/ds",
         "target": "/opt/ds", "readonly": "true"},
    ]


def test_unknown_or_double_propagation_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="two propagations"):
        KernelSpec.from_export(ExportResponse(kernel_id="k-1", mounts=[
            OciMount(destination="/home/work/x", source="/srv/x",
                     options=["rbind", "rw", "rslave", "private"])]), ["true"])
    with pytest.raises(InvalidArgument, match="propagation"):
        BindMount(Path("/srv/x"), "/home/work/x", readonly=False, propagation="rshared")
