"""The single-node volume store: a YAML file, passwords in a mode-0600 side file.

``volumes.yaml`` holds the concept's scheme without passwords; the passwords
live in ``volumes.secrets.yaml`` (a ``name: password`` mapping, mode 0600).
A hand-written ``volumes.yaml`` with ``password=`` inside ``options`` is still
read (compatibility with the concept); the next write moves it out.

Writes take an exclusive ``flock`` and replace each file atomically (temp file
+ fsync + rename), secrets first, so a reader never sees a volume without its
password.  Watches poll the files' stat signature.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from azfs.errors import UserError
from azfs.files import atomic_write
from azfs.secret import redact
from azfs.volumes.base import VolumeStore, Watch, WatchCallback, check_unique
from azfs.volumes.model import (
    MAX_CONFIG_BYTES,
    Volume,
    VolumeConfigError,
    dump_volumes,
    load_yaml_file,
)

log = logging.getLogger(__name__)


class YamlVolumeStore(VolumeStore):
    def __init__(self, path: str | Path, poll_interval: float = 0.5) -> None:
        self.path = Path(path)
        self.secrets_path = self.path.with_name(f"{self.path.stem}.secrets{self.path.suffix}")
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.poll_interval = poll_interval
        self.description = f"volume file {self.path}"
        self._watches: list[_PollWatch] = []

    # -- reading -----------------------------------------------------------------

    def list(self) -> list[Volume]:
        return self._read()

    def _read(self) -> list[Volume]:
        if not self.path.exists():
            return []
        volumes = load_yaml_file(self.path)
        secrets = self._read_secrets()
        out = []
        for volume in volumes:
            if volume.mount.password is None and volume.name in secrets:
                volume = volume.with_password(secrets[volume.name])
            out.append(volume)
        return sorted(out, key=lambda v: v.name)

    def _read_secrets(self) -> dict[str, str]:
        try:
            text = self.secrets_path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise UserError(f"{self.secrets_path}: cannot read: {exc.strerror}") from None
        if len(text) > MAX_CONFIG_BYTES:
            raise VolumeConfigError(f"{self.secrets_path}: too large")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            raise VolumeConfigError(f"{self.secrets_path}: broken YAML") from None
        data = data or {}
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise VolumeConfigError(f"{self.secrets_path}: must map volume names to passwords")
        return data

    # -- writing -----------------------------------------------------------------

    def replace_all(self, volumes) -> None:
        """Writes ``volumes`` whatever the file held (even if it no longer parses)."""
        volumes = check_unique(volumes)
        self._update(lambda _current: volumes, read=False)

    def _update(self, change: Callable[[list[Volume]], list[Volume]],
                read: bool = True) -> None:
        with self._locked():
            new = check_unique(change(self._read() if read else []))
            new.sort(key=lambda v: v.name)
            secrets = {v.name: v.mount.password.reveal() for v in new if v.mount.password}
            document = dump_volumes(new, show_secrets=False)
            for entry, volume in zip(document["volumes"], new, strict=True):
                # The file keeps the options without the password placeholder.
                entry["mount"]["options"] = volume.mount.options
            atomic_write(self.secrets_path, _yaml(secrets), 0o600)
            atomic_write(self.path, _yaml(document), 0o644)
        log.info("wrote %d volume(s) to %s", len(new), self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot write: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- watching ----------------------------------------------------------------

    def watch(self, callback: WatchCallback) -> Watch:
        watch = _PollWatch(self, callback)
        self._watches.append(watch)
        watch.start()
        return watch

    def signature(self) -> tuple:
        sig = []
        for path in (self.path, self.secrets_path):
            try:
                st = path.stat()
                sig.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                sig.append(None)
        return tuple(sig)

    def close(self) -> None:
        for watch in self._watches:
            watch.cancel()
        self._watches.clear()


class _PollWatch(Watch):
    def __init__(self, store: YamlVolumeStore, callback: WatchCallback) -> None:
        self.store = store
        self.callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="azfs-volume-file-watch",
                                        daemon=True)
        self._last_sig = store.signature()
        try:
            self._last = store.list()
        except UserError:
            self._last = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.store.poll_interval):
            sig = self.store.signature()
            if sig == self._last_sig:
                continue
            self._last_sig = sig
            try:
                volumes = self.store.list()
            except UserError as exc:
                log.warning("ignoring unreadable volume config: %s", redact(str(exc)))
                continue
            if volumes == self._last:
                continue
            self._last = volumes
            try:
                self.callback(volumes)
            except Exception:  # noqa: BLE001 - a watcher must survive its callback
                log.exception("volume watch callback failed")

    def cancel(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _yaml(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
