"""The same kernel container as ``docker run`` arguments, for Docker users.

Renders a :class:`~azfs.containers.spec.KernelSpec` to ``--mount
type=bind,...`` options (never ``-v``: ``-v`` silently creates a missing
source directory, ``--mount`` refuses it), with the same order, modes,
propagation, user, working directory and network as the runc bundle.
``azfs kernel create --docker`` prints them for a kernel.  ``--mount`` values
are CSV: a field holding a comma or a quote is quoted the way Docker's CSV
parser reads it back.
"""

from __future__ import annotations

import csv
import io
import shlex
from collections.abc import Sequence

from azfs.containers.spec import BindMount, KernelSpec
from azfs.errors import InvalidArgument


def _csv_field(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise InvalidArgument(f"a mount path must not contain a newline: {value!r}")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([value])
    return buf.getvalue()


def mount_arg(bind: BindMount) -> str:
    """One ``--mount`` value: ``type=bind,source=...,target=...[,readonly][,bind-propagation=P]``.

    ``bind-propagation=rslave`` on the kernel home is what lets the agent
    re-bind or attach vfolders into the running container.
    """
    fields = ["type=bind", f"source={bind.source}", f"target={bind.destination}"]
    if bind.readonly:
        fields.append("readonly")
    if bind.propagation:
        fields.append(f"bind-propagation={bind.propagation}")
    return ",".join(_csv_field(f) for f in fields)


def mount_args(spec: KernelSpec) -> list[str]:
    """``--mount`` options for the scratch home and every bind, in mount order."""
    args: list[str] = []
    for bind in spec.ordered_binds():
        args += ["--mount", mount_arg(bind)]
    return args


def docker_run_args(spec: KernelSpec, image: str, *, docker: str = "docker",
                    remove: bool = True, name: str | None = None) -> list[str]:
    """The full ``docker run`` command line (an argv list, no shell) for ``spec``."""
    if not image or image.startswith("-"):
        raise InvalidArgument(f"bad image name {image!r}")
    argv = [docker, "run"]
    if remove:
        argv.append("--rm")
    argv += ["--name", name or spec.kernel_id, "--hostname", spec.kernel_id[:63],
             "--user", f"{spec.uid}:{spec.gid}", "--workdir", spec.cwd,
             "--network", spec.network, "--security-opt", "no-new-privileges"]
    if spec.readonly_rootfs:
        argv += ["--read-only", "--tmpfs", "/tmp"]
    for item in spec.environment(default_path=False):
        argv += ["--env", item]
    argv += mount_args(spec)
    argv += [image, *spec.args]
    return argv


def render(argv: Sequence[str]) -> str:
    """A copy-pasteable shell line for ``argv``."""
    return shlex.join(argv)
