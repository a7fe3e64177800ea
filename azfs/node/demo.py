"""``azfs demo``: the main job of azfs, shown on a running single-node deployment.

As a newcomer would do it with the CLI, against the manager's REST API:
make a user and a vfolder, start a kernel (a real runc container of a
busybox rootfs, uid 1000) that writes into ``/home/work/<alias>``, start a
second kernel that reads what the first wrote and reads the blob dataset,
show the vfolder's usage, destroy both kernels.  Every step is printed with
the ``azfs`` command that does it, and done by the same REST calls
(:mod:`azfs.client.manager`; the CLI's parser is not involved).  Kernel
ids are new on each run, and whatever the demo started is removed even when
a step fails, so it can run again.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from azfs.client.manager import (
    ManagerClient,
    create_kernel,
    create_user,
    create_vfolder,
    destroy_kernel,
    issue_token,
    list_users,
    list_vfolders,
    vfolder_info,
)
from azfs.errors import UserError
from azfs.files import atomic_write
from azfs.node.layout import SAMPLE_DATASET, Layout, read_secret
from azfs.node.provision import admin_client
from azfs.tables import emit, emit_record

Say = Callable[[str], None]
#: What the demo shows of the records (as ``azfs folder ls|info`` and ``azfs kernel create``).
VFOLDER_COLUMNS = [("alias", "alias"), ("id", "id"), ("owner", "owner"), ("access", "access"),
                   ("status", "status"), ("volume", "volume"), ("quota_bytes", "quota")]
VFOLDER_FIELDS = [("alias", "alias"), ("id", "id"), ("owner", "owner"),
                  ("status", "status"), ("volume", "volume"), ("quota_bytes", "quota"),
                  ("usage.bytes", "used"), ("usage.files", "files")]
MOUNT_COLUMNS = [("destination", "container path"), ("source", "source"),
                 ("options", "options")]
USER = "demo"
ALIAS = "data"
WRITE_SCRIPT = (
    "id; echo \"hello from kernel $(hostname)\" > /home/work/{alias}/hello.txt && "
    "dd if=/dev/zero of=/home/work/{alias}/zeros.bin bs=64k count=64 2>/dev/null && "
    "ls -l /home/work/{alias}")
READ_SCRIPT = (
    "cat /home/work/{alias}/hello.txt && ls -R /home/work/{dataset} && "
    "head -n 3 /home/work/{dataset}/train/part-0000.csv && "
    "wc -l /home/work/{dataset}/train/part-0001.csv && "
    "echo nope > /home/work/{dataset}/x 2>/dev/null || echo 'the dataset is read-only'")


class Demo:
    """One run of the demo against the node in ``layout``."""

    def __init__(self, layout: Layout, say: Say = print) -> None:
        settings = layout.load_settings()
        if settings is None or not layout.admin_token.exists():
            raise UserError(f"no azfs node in {layout.root}: run 'azfs up' first")
        self.layout = layout
        self.settings = settings
        self.say = say
        self.url = settings.manager_url
        self.token_file = layout.user_token(USER)
        self.kernels: list[str] = []
        self.containers: list = []

    # ---- steps ----------------------------------------------------------------------
    def run(self) -> dict:
        """Runs every step; returns what the kernels printed and the usage seen."""
        self.step("1. a user and a vfolder (the manager's REST API)")
        self.ensure_user()
        self.ensure_vfolder()
        rootfs = self.rootfs()
        result: dict = {}
        try:
            self.step("2. a kernel that writes into /home/work/" + ALIAS)
            writer = self.start_kernel("writer", rootfs, [f"{ALIAS}:rw"], [])
            result["writer"] = self.sh(writer, WRITE_SCRIPT.format(alias=ALIAS))
            self.step("3. a second kernel that reads it, and reads the dataset")
            reader = self.start_kernel("reader", rootfs, [f"{ALIAS}:ro"], [SAMPLE_DATASET])
            result["reader"] = self.sh(reader, READ_SCRIPT.format(alias=ALIAS,
                                                                  dataset=SAMPLE_DATASET))
            self.step("4. the vfolder's usage (from the filesystem's ledger, no scan)")
            result["usage"] = self.wait_usage(64 * 65536)
            self.show("folder", "info", ALIAS)
            emit_record(_Args(), vfolder_info(self.client(), ALIAS), VFOLDER_FIELDS)
        finally:
            self.step("5. destroy both kernels")
            self.destroy_all()
        return result

    def step(self, title: str) -> None:
        self.say(f"\n== {title}")

    def show(self, *argv: str) -> None:
        """Shows the ``azfs`` command that does the next step (the demo calls the API)."""
        self.say("$ azfs " + shlex.join(argv))
        sys.stdout.flush()

    def client(self) -> ManagerClient:
        return ManagerClient(self.url, read_secret(self.token_file))

    def ensure_user(self) -> None:
        admin = admin_client(self.layout, self.settings)
        users = {u["name"] for u in list_users(admin)}
        if USER not in users:
            self.say(f"POST /v1/users {{\"name\": \"{USER}\"}}   (as the admin)")
            token = create_user(admin, USER)["token"]
            atomic_write(self.token_file, token + "\n", 0o600)
        elif not self.token_file.exists():
            atomic_write(self.token_file, issue_token(admin, USER, "demo") + "\n", 0o600)
        self.say(f"user '{USER}' (uid 1000); its token is in {self.token_file}")

    def ensure_vfolder(self) -> None:
        vfolders = list_vfolders(self.client())
        if ALIAS in {v["alias"] for v in vfolders}:
            self.say(f"vfolder '{ALIAS}' exists already (from an earlier run)")
            self.show("folder", "ls")
            emit(_Args(), vfolders, VFOLDER_COLUMNS)
        else:
            self.show("folder", "create", ALIAS)
            emit(_Args(), create_vfolder(self.client(), ALIAS), VFOLDER_COLUMNS)

    def rootfs(self) -> Path:
        from azfs.containers.rootfs import build_busybox_rootfs

        if not self.layout.rootfs.exists():
            self.say(f"(building a busybox root filesystem for the kernels in "
                     f"{self.layout.rootfs})")
            build_busybox_rootfs(self.layout.rootfs)
        return self.layout.rootfs

    def start_kernel(self, role: str, rootfs: Path, vfolders: list[str],
                     datasets: list[str]):
        from azfs.containers.runc import KernelContainer, Runc
        from azfs.export import ExportResponse

        kernel_id = f"demo-{role}-{uuid.uuid4().hex[:8]}"
        argv = ["kernel", "create", kernel_id, "--agent", self.settings.agent_id]
        for v in vfolders:
            argv += ["-v", v]
        for d in datasets:
            argv += ["-d", d]
        self.show(*argv)
        answer = create_kernel(self.client(), kernel_id, self.settings.agent_id, vfolders,
                               datasets)
        self.kernels.append(kernel_id)
        emit(_Args(), answer["mounts"], MOUNT_COLUMNS, title=f"kernel {kernel_id}")
        export = ExportResponse.model_validate({"kernel_id": kernel_id,
                                                "mounts": answer["mounts"]})
        workdir = self.layout.demo / "kernels" / kernel_id
        self.say(f"runc: starting container {kernel_id} (busybox, uid 1000) with these binds")
        container = KernelContainer(rootfs, export, ["sleep", "3600"],
                                    bundle_dir=workdir / "bundle", scratch_dir=workdir / "home",
                                    runc=Runc(self.layout.runc_root))
        self.containers.append(container)
        return container

    def sh(self, container, script: str) -> str:
        self.say(f"[{container.id}]$ {script}")
        result = container.sh(script)
        for line in result.stdout.splitlines():
            self.say(f"  {line}")
        if result.exit_code != 0:
            raise UserError(f"the kernel's command failed ({result.exit_code}): "
                            f"{result.stderr.strip()}")
        return result.stdout

    def wait_usage(self, at_least: int, timeout: float = 15.0) -> dict:
        """The usage as the manager reports it, once it shows the kernel's writes."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(UserError):
                usage = self.client().call("GET", f"/v1/vfolders/{ALIAS}/usage")
                if usage["bytes"] >= at_least or time.monotonic() > deadline:
                    return usage
            if time.monotonic() > deadline:
                raise UserError(f"the usage of '{ALIAS}' is unavailable")
            time.sleep(0.3)

    def destroy_all(self) -> None:
        errors = []
        for container in self.containers:
            try:
                container.stop()
                self.say(f"runc: container {container.id} removed")
            except Exception as exc:  # noqa: BLE001 - report all, keep going
                errors.append(str(exc))
        for kernel_id in self.kernels:
            try:
                self.show("kernel", "rm", kernel_id)
                destroy_kernel(self.client(), kernel_id)
                self.say(f"{kernel_id}: exports dropped")
            except UserError as exc:
                errors.append(str(exc))
        self.containers.clear()
        self.kernels.clear()
        if errors:
            raise UserError("cleaning up the demo: " + "; ".join(errors))


class _Args:
    json = False


def run_demo(layout: Layout, say: Say = print) -> dict:
    return Demo(layout, say).run()


__all__ = ["Demo", "run_demo"]
