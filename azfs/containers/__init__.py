"""Kernel containers: an agent's export applied by a real OCI runtime.

:mod:`.spec` describes one kernel container, :mod:`.runc` runs it with
``runc``, :mod:`.docker` renders it for ``docker run``, :mod:`.rootfs` builds
a minimal busybox root filesystem for tests and demos.
"""

from azfs.containers.runc import (
    ContainerError,
    KernelContainer,
    Runc,
    RunResult,
    run_kernel,
    write_bundle,
)
from azfs.containers.spec import BindMount, KernelSpec

__all__ = ["BindMount", "ContainerError", "KernelContainer", "KernelSpec", "RunResult", "Runc",
           "run_kernel", "write_bundle"]
