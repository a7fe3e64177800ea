"""The cluster volume store: etcd, one key per volume, passwords apart.

Layout (``prefix`` defaults to ``/azfs/volumes/``)::

    /azfs/volumes/<name>          JSON {"name", "mount": {at, fstype, path, options}}
    /azfs/volume-secrets/<name>   the password (only for volumes that have one)
    /azfs/volumes.generation      bumped by every write (optimistic concurrency)

Every write is one etcd transaction guarded by the generation key's
modification revision, retried when another writer got there first, so two
concurrent imports never interleave.  A volume whose password changes also
gets its config key rewritten, so watching the config prefix sees every
change.  Reads take the config and secrets at one revision.

Watches use the raw gRPC watch stream of their own connection and survive
etcd restarts: on any stream error they back off, re-read the config, call
back if it changed while they were away, and watch again.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator

import etcd3
import etcd3.etcdrpc as etcdrpc
import grpc
from etcd3.exceptions import Etcd3Exception

from azfs.errors import BackendUnavailable, UserError
from azfs.volumes.model import (
    Volume,
    VolumeConfigError,
    dump_volume,
    parse_volume,
    validate_name,
)
from azfs.volumes.store import VolumeStore, Watch, WatchCallback, check_unique

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/azfs/volumes/"
DEFAULT_PORT = 2379
_ENDPOINT_RE = re.compile(r"^(?:https?://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?/?$")
_WRITE_ATTEMPTS = 10


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``http://HOST:PORT``, ``[::1]:2379``; port defaults to 2379)."""
    match = _ENDPOINT_RE.fullmatch(endpoint.strip())
    port = int(match.group(2) or DEFAULT_PORT) if match else 0
    if not match or not 0 < port < 65536:
        raise UserError(f"malformed etcd endpoint {endpoint!r} (expected HOST:PORT)")
    return match.group(1).strip("[]"), port


def _prefix_end(prefix: bytes) -> bytes:
    return etcd3.utils.increment_last_byte(prefix)


class EtcdVolumeStore(VolumeStore):
    def __init__(self, endpoint: str, prefix: str = DEFAULT_PREFIX,
                 secrets_prefix: str | None = None, timeout: float = 5.0) -> None:
        self.host, self.port = parse_endpoint(endpoint)
        self.endpoint = f"{self.host}:{self.port}"
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise UserError(f"etcd prefix must start and end with '/' (got {prefix!r})")
        self.prefix = prefix
        self.secrets_prefix = secrets_prefix or prefix.rstrip("/") + "-secrets/"
        self.generation_key = prefix.rstrip("/") + ".generation"
        self.timeout = timeout
        self.description = f"etcd {self.endpoint}{self.prefix}"
        self._client = self._connect()
        self._watches: list[_EtcdWatch] = []
        self._lock = threading.Lock()

    def _connect(self) -> etcd3.Etcd3Client:
        return etcd3.client(host=self.host, port=self.port, timeout=self.timeout)

    # -- errors ----------------------------------------------------------------------

    def _unavailable(self, exc: BaseException, what: str) -> Exception:
        if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            detail = exc.details() or ""
            if "too many operations" in detail:
                return UserError(f"{self.description}: {what}: the change needs more "
                                 "operations than etcd allows in one transaction; raise "
                                 "etcd's --max-txn-ops or import in smaller parts")
            return UserError(f"{self.description}: {what}: etcd refused: {detail}")
        if isinstance(exc, grpc.RpcError):
            reason = f"{exc.code().name.lower()}: {exc.details()}"
        else:
            reason = str(exc) or type(exc).__name__
        return BackendUnavailable(f"etcd at {self.endpoint} is unavailable ({what}): {reason}")

    def _call(self, what: str, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except (grpc.RpcError, Etcd3Exception) as exc:
            raise self._unavailable(exc, what) from None

    # -- reading ---------------------------------------------------------------------

    def _snapshot(self, client: etcd3.Etcd3Client | None = None
                  ) -> tuple[list[Volume], dict[str, bytes], int, int]:
        """(volumes, raw config values by name, generation mod revision, revision)."""
        client = client or self._client
        config = self._range(client, self.prefix, prefix=True)
        revision = config.header.revision
        secrets = self._range(client, self.secrets_prefix, prefix=True, revision=revision)
        generation = self._range(client, self.generation_key, revision=revision)
        generation_rev = generation.kvs[0].mod_revision if generation.kvs else 0
        passwords = {kv.key[len(self.secrets_prefix):].decode(errors="replace"): kv.value
                     for kv in secrets.kvs}
        volumes: list[Volume] = []
        raw: dict[str, bytes] = {}
        errors: list[str] = []
        for kv in config.kvs:
            key = kv.key.decode(errors="replace")
            name = key[len(self.prefix):]
            try:
                validate_name(name, f"etcd key {key}")
                entry = json.loads(kv.value)
                volume = parse_volume(entry, f"etcd key {key}")
                if volume.name != name:
                    raise VolumeConfigError(f"etcd key {key}: holds volume {volume.name!r}")
                if name in passwords:
                    volume = volume.with_password(passwords[name].decode())
            except (VolumeConfigError, ValueError) as exc:
                errors.extend(exc.errors if isinstance(exc, VolumeConfigError)
                              else [f"etcd key {key}: not JSON"])
                continue
            raw[name] = kv.value
            volumes.append(volume)
        if errors:
            raise VolumeConfigError(errors)
        volumes.sort(key=lambda v: v.name)
        return volumes, raw, generation_rev, revision

    def _range(self, client: etcd3.Etcd3Client, key: str, prefix: bool = False,
               revision: int = 0) -> etcdrpc.RangeResponse:
        start = key.encode()
        request = etcdrpc.RangeRequest(key=start, revision=revision,
                                       range_end=_prefix_end(start) if prefix else b"")
        return client.kvstub.Range(request, self.timeout)

    def list(self) -> list[Volume]:
        return self._call("read volumes", lambda: self._snapshot()[0])  # type: ignore[return-value]

    # -- writing ---------------------------------------------------------------------

    def replace_all(self, volumes: Iterable[Volume]) -> None:
        volumes = check_unique(volumes)
        self._update(lambda _current: volumes)

    def _update(self, change: Callable[[list[Volume]], list[Volume]]) -> None:
        with self._lock:
            for _attempt in range(_WRITE_ATTEMPTS):
                current, raw, generation_rev, revision = self._call(
                    "read volumes", self._snapshot)  # type: ignore[misc]
                new = check_unique(change(current))
                ok = self._call("write volumes", functools.partial(
                    self._write, current, raw, new, generation_rev, revision))
                if ok:
                    log.info("wrote %d volume(s) to %s", len(new), self.description)
                    return
            raise BackendUnavailable(f"{self.description}: gave up after {_WRITE_ATTEMPTS} "
                                     "attempts: other writers kept changing the volumes")

    def _write(self, current: list[Volume], raw: dict[str, bytes], new: list[Volume],
               generation_rev: int, revision: int) -> bool:
        client = self._client
        tx = client.transactions
        old = {v.name: v for v in current}
        ops: list[object] = []
        for volume in new:
            value = _encode(volume)
            key = self.prefix + volume.name
            secret_key = self.secrets_prefix + volume.name
            before = old.get(volume.name)
            old_password = before.mount.password if before else None
            secret_changed = old_password != volume.mount.password
            if raw.get(volume.name) != value or secret_changed:
                ops.append(tx.put(key, value))
            if secret_changed:
                if volume.mount.password is None:
                    ops.append(tx.delete(secret_key))
                else:
                    ops.append(tx.put(secret_key, volume.mount.password.reveal()))
        names = {v.name for v in new}
        for name in old:
            if name not in names:
                ops.append(tx.delete(self.prefix + name))
                ops.append(tx.delete(self.secrets_prefix + name))
        if not ops:
            return True
        ops.append(tx.put(self.generation_key, str(revision)))
        guard = (tx.mod(self.generation_key) == generation_rev if generation_rev
                 else tx.version(self.generation_key) == 0)
        succeeded, _ = client.transaction(compare=[guard], success=ops, failure=[])
        return bool(succeeded)

    # -- watching --------------------------------------------------------------------

    def watch(self, callback: WatchCallback) -> Watch:
        try:
            initial: list[Volume] | None = self.list()
        except (BackendUnavailable, UserError):
            initial = None
        watch = _EtcdWatch(self, callback, initial)
        self._watches.append(watch)
        watch.start()
        return watch

    def close(self) -> None:
        for watch in self._watches:
            watch.cancel()
        self._watches.clear()
        self._client.close()


def _encode(volume: Volume) -> bytes:
    entry = dump_volume(volume, show_secrets=False)
    entry["mount"]["options"] = volume.mount.options  # no password, not even ***
    return json.dumps(entry, sort_keys=True, ensure_ascii=False).encode()


class _EtcdWatch(Watch):
    """A thread that follows the config prefix and survives etcd restarts."""

    def __init__(self, store: EtcdVolumeStore, callback: WatchCallback,
                 initial: list[Volume] | None, max_backoff: float = 2.0) -> None:
        self.store = store
        self.callback = callback
        self.last = initial
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self._call_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="azfs-volume-etcd-watch",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _deliver(self, volumes: list[Volume]) -> None:
        if volumes == self.last:
            return
        self.last = volumes
        try:
            self.callback(volumes)
        except Exception:  # noqa: BLE001 - a watcher must survive its callback
            log.exception("volume watch callback failed")

    def _run(self) -> None:
        backoff = 0.1
        failing = False
        while not self._stop.is_set():
            client = self.store._connect()
            try:
                volumes, _raw, _gen, revision = self.store._snapshot(client)
                if failing:
                    log.warning("volume watch on %s recovered", self.store.description)
                    failing = False
                backoff = 0.1
                self._deliver(volumes)
                for _ in self._events(client, revision + 1):
                    volumes, *_ = self.store._snapshot(client)
                    self._deliver(volumes)
            except (grpc.RpcError, Etcd3Exception, UserError) as exc:
                if self._stop.is_set():
                    break
                if not failing:
                    log.warning("volume watch on %s interrupted: %s (retrying)",
                                self.store.description,
                                self.store._unavailable(exc, "watch")
                                if not isinstance(exc, UserError) else exc)
                    failing = True
            finally:
                client.close()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    def _events(self, client: etcd3.Etcd3Client, start_revision: int) -> Iterator[object]:
        prefix = self.store.prefix.encode()
        create = etcdrpc.WatchCreateRequest(key=prefix, range_end=_prefix_end(prefix),
                                            start_revision=start_revision)

        def requests() -> Iterator[etcdrpc.WatchRequest]:
            yield etcdrpc.WatchRequest(create_request=create)
            self._stop.wait()

        call = etcdrpc.WatchStub(client.channel).Watch(requests())
        with self._call_lock:
            self._call = call
        if self._stop.is_set():
            call.cancel()
        try:
            for response in call:
                if response.compact_revision:
                    raise UserError("watch revision compacted; re-reading")
                if response.canceled:
                    raise UserError(f"watch canceled by etcd: {response.cancel_reason}")
                if response.events:
                    yield response
        finally:
            with self._call_lock:
                self._call = None
        if not self._stop.is_set():
            raise UserError("watch stream ended")

    def cancel(self) -> None:
        self._stop.set()
        with self._call_lock:
            if self._call is not None:
                self._call.cancel()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
