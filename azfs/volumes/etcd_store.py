"""The cluster volume store: etcd, one key per volume, passwords apart.

Layout (``prefix`` defaults to ``/azfs/volumes/``)::

    /azfs/volumes/<name>          JSON {"name", "mount": {at, fstype, path, options}}
    /azfs/volumes-secrets/<name>  the password (only for volumes that have one)
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
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

import etcd3
import etcd3.etcdrpc as etcdrpc
import grpc
from etcd3.exceptions import Etcd3Exception

from azfs.errors import BackendUnavailable, UserError
from azfs.files import atomic_write
from azfs.volumes.base import VolumeStore, Watch, WatchCallback, check_unique
from azfs.volumes.etcd_client import (
    GRPC_OPTIONS,
    EtcdAuth,
    fmt_endpoint,
    member_client,
    parse_endpoint,
    parse_endpoints,
)
from azfs.volumes.model import (
    Volume,
    VolumeConfigError,
    dump_volume,
    dump_yaml,
    load_yaml_file,
    parse_volume,
    validate_name,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PREFIX", "EtcdAuth", "EtcdVolumeStore", "parse_endpoint", "parse_endpoints"]

DEFAULT_PREFIX = "/azfs/volumes/"
_WRITE_ATTEMPTS = 10
T = TypeVar("T")
def _prefix_end(prefix: bytes) -> bytes:
    return etcd3.utils.increment_last_byte(prefix)


class EtcdVolumeStore(VolumeStore):
    """Volumes in etcd.  ``endpoint`` may list several members: ``h1:2379,h2:2379``.

    With ``cache_file``, every successful read is saved there (mode 0600; it
    holds the passwords) and reads fall back to it, with a warning, while etcd
    is unreachable, so a node can restart during an etcd outage.  Writes never
    fall back.
    """

    def __init__(self, endpoint: str, prefix: str = DEFAULT_PREFIX,
                 secrets_prefix: str | None = None, timeout: float = 5.0,
                 cache_file: str | Path | None = None, auth: EtcdAuth | None = None) -> None:
        self.endpoints = parse_endpoints(endpoint)
        self.auth = auth or EtcdAuth()
        self._client_kwargs = self.auth.client_kwargs()
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise UserError(f"etcd prefix must start and end with '/' (got {prefix!r})")
        self.prefix = prefix
        self.secrets_prefix = secrets_prefix or prefix.rstrip("/") + "-secrets/"
        self.generation_key = prefix.rstrip("/") + ".generation"
        self.timeout = timeout
        self.cache_file = Path(cache_file) if cache_file else None
        self.description = f"etcd {','.join(fmt_endpoint(e) for e in self.endpoints)}{self.prefix}"
        self._current = 0
        self._clients: dict[int, etcd3.Etcd3Client] = {}
        self._clients_lock = threading.Lock()
        self._watches: list[_EtcdWatch] = []
        self._lock = threading.Lock()
        self._cached: list[Volume] | None = None

    @property
    def endpoint(self) -> str:
        """The member in use, ``HOST:PORT``."""
        return fmt_endpoint(self.endpoints[self._current])

    def _connect(self, index: int | None = None) -> etcd3.Etcd3Client:
        endpoint = self.endpoints[self._current if index is None else index]
        return member_client(endpoint, timeout=self.timeout, client_kwargs=self._client_kwargs,
                             grpc_options=GRPC_OPTIONS)

    def _client_at(self, index: int) -> etcd3.Etcd3Client:
        with self._clients_lock:
            if index not in self._clients:
                self._clients[index] = self._connect(index)
            return self._clients[index]

    def _drop_client(self, index: int) -> None:
        """Forgets a member's client (its auth token expired); the next call reconnects."""
        with self._clients_lock:
            client = self._clients.pop(index, None)
        if client is not None:
            client.close()

    def rotate(self, failed: int) -> None:
        """Moves on to the next member after ``failed`` did not answer."""
        with self._clients_lock:
            if self._current == failed:
                self._current = (failed + 1) % len(self.endpoints)

    # -- errors ----------------------------------------------------------------------

    def _unavailable(self, exc: BaseException, what: str) -> Exception:
        code = exc.code() if isinstance(exc, grpc.RpcError) else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return UserError(f"{self.description}: {what}: etcd refused: "
                             f"{exc.details()}")  # type: ignore[union-attr]
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert isinstance(exc, grpc.RpcError)
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
        where = ", ".join(fmt_endpoint(e) for e in self.endpoints)
        return BackendUnavailable(f"etcd at {where} is unavailable ({what}): {reason}")

    def _call(self, what: str, fn: Callable[[etcd3.Etcd3Client], T]) -> T:
        """Runs ``fn(client)``, trying each member once before giving up."""
        error: Exception | None = None
        reauthenticated = False
        attempts = len(self.endpoints)
        while attempts > 0:
            attempts -= 1
            index = self._current
            try:
                return fn(self._client_at(index))
            except (grpc.RpcError, Etcd3Exception) as exc:
                if (isinstance(exc, grpc.RpcError) and not reauthenticated
                        and exc.code() == grpc.StatusCode.UNAUTHENTICATED):
                    reauthenticated = True  # an expired auth token: log in again, once
                    self._drop_client(index)
                    attempts += 1
                    continue
                error = self._unavailable(exc, what)
                if not isinstance(error, BackendUnavailable):
                    raise error from None
                self.rotate(index)
        assert error is not None
        raise error

    # -- reading ---------------------------------------------------------------------

    def _snapshot(self, client: etcd3.Etcd3Client, strict: bool = True) -> _Snapshot:
        """The volumes at one revision.

        ``strict=False`` skips entries that do not parse (listing them in
        ``invalid``) instead of failing, so that a full replace can repair a
        hand-damaged store.
        """
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
        invalid: list[str] = []
        for kv in config.kvs:
            key = kv.key.decode(errors="replace")
            name = key[len(self.prefix):]
            try:
                volume = self._decode(key, name, kv.value, passwords.get(name))
            except VolumeConfigError as exc:
                errors.extend(exc.errors)
                invalid.append(name)
                continue
            raw[name] = kv.value
            volumes.append(volume)
        if errors and strict:
            raise VolumeConfigError(errors)
        volumes.sort(key=lambda v: v.name)
        return _Snapshot(volumes, raw, generation_rev, revision, invalid)

    def _decode(self, key: str, name: str, value: bytes, password: bytes | None) -> Volume:
        validate_name(name, f"etcd key {key}")
        try:
            entry = json.loads(value)
        except ValueError:
            raise VolumeConfigError(f"etcd key {key}: not JSON") from None
        volume = parse_volume(entry, f"etcd key {key}")
        if volume.name != name:
            raise VolumeConfigError(f"etcd key {key}: holds volume {volume.name!r}")
        if password is not None:
            try:
                volume = volume.with_password(password.decode())
            except UnicodeDecodeError:
                raise VolumeConfigError(f"etcd key {self.secrets_prefix}{name}: "
                                        "not UTF-8") from None
        return volume

    def _range(self, client: etcd3.Etcd3Client, key: str, prefix: bool = False,
               revision: int = 0) -> etcdrpc.RangeResponse:
        start = key.encode()
        request = etcdrpc.RangeRequest(key=start, revision=revision,
                                       range_end=_prefix_end(start) if prefix else b"")
        return client.kvstub.Range(request, self.timeout, credentials=client.call_credentials,
                                   metadata=client.metadata)

    def list(self) -> list[Volume]:
        try:
            volumes = self._call("read volumes", lambda client: self._snapshot(client).volumes)
        except BackendUnavailable as exc:
            if self.cache_file is None or not self.cache_file.exists():
                raise
            log.warning("%s; using the last good volume config from %s", exc, self.cache_file)
            return load_yaml_file(self.cache_file)
        self._save_cache(volumes)
        return volumes

    def _save_cache(self, volumes: list[Volume]) -> None:
        if self.cache_file is None or volumes == self._cached:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.cache_file, dump_yaml(volumes, show_secrets=True), 0o600)
            self._cached = volumes
        except OSError as exc:
            log.warning("cannot save the volume config cache %s: %s", self.cache_file,
                        exc.strerror)

    # -- writing ---------------------------------------------------------------------

    def replace_all(self, volumes: Iterable[Volume]) -> None:
        volumes = check_unique(volumes)
        self._update(lambda _current: volumes, strict=False)

    def _update(self, change: Callable[[list[Volume]], list[Volume]],
                strict: bool = True) -> None:
        with self._lock:
            for _attempt in range(_WRITE_ATTEMPTS):
                snapshot = self._call("read volumes",
                                      functools.partial(self._snapshot, strict=strict))
                new = check_unique(change(snapshot.volumes))
                ok = self._call("write volumes",
                                functools.partial(self._write, snapshot=snapshot, new=new))
                if ok:
                    log.info("wrote %d volume(s) to %s", len(new), self.description)
                    return
            raise BackendUnavailable(f"{self.description}: gave up after {_WRITE_ATTEMPTS} "
                                     "attempts: other writers kept changing the volumes")

    def _write(self, client: etcd3.Etcd3Client, *, snapshot: _Snapshot,
               new: list[Volume]) -> bool:
        tx = client.transactions
        old = {v.name: v for v in snapshot.volumes}
        ops: list[object] = []
        for volume in new:
            value = _encode(volume)
            key = self.prefix + volume.name
            secret_key = self.secrets_prefix + volume.name
            before = old.get(volume.name)
            old_password = before.mount.password if before else None
            secret_changed = (old_password != volume.mount.password
                              or volume.name in snapshot.invalid)
            if snapshot.raw.get(volume.name) != value or secret_changed:
                ops.append(tx.put(key, value))
            if secret_changed:
                if volume.mount.password is None:
                    ops.append(tx.delete(secret_key))
                else:
                    ops.append(tx.put(secret_key, volume.mount.password.reveal()))
        names = {v.name for v in new}
        for name in [*old, *snapshot.invalid]:
            if name not in names:
                ops.append(tx.delete(self.prefix + name))
                ops.append(tx.delete(self.secrets_prefix + name))
        if not ops:
            return True
        ops.append(tx.put(self.generation_key, str(snapshot.revision)))
        guard = (tx.mod(self.generation_key) == snapshot.generation_rev
                 if snapshot.generation_rev else tx.version(self.generation_key) == 0)
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
        with self._clients_lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


class _Snapshot(NamedTuple):
    volumes: list[Volume]
    raw: dict[str, bytes]  # config values by name, to write only what changed
    generation_rev: int  # mod revision of the generation key (0: absent)
    revision: int
    invalid: list[str]  # names whose entries do not parse (strict=False only)


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
        self.store._save_cache(volumes)
        try:
            self.callback(volumes)
        except Exception:  # noqa: BLE001 - a watcher must survive its callback
            log.exception("volume watch callback failed")

    def _run(self) -> None:
        backoff = 0.1
        failing = False
        while not self._stop.is_set():
            index = self.store._current
            client: etcd3.Etcd3Client | None = None
            try:
                client = self.store._connect(index)
                snapshot = self.store._snapshot(client)
                volumes, revision = snapshot.volumes, snapshot.revision
                if failing:
                    log.warning("volume watch on %s recovered", self.store.description)
                    failing = False
                backoff = 0.1
                self._deliver(volumes)
                for _ in self._events(client, revision + 1):
                    volumes = self.store._snapshot(client).volumes
                    self._deliver(volumes)
            except (grpc.RpcError, Etcd3Exception, UserError) as exc:
                if self._stop.is_set():
                    break
                self.store.rotate(index)
                if not failing:
                    log.warning("volume watch on %s interrupted: %s (retrying)",
                                self.store.description,
                                self.store._unavailable(exc, "watch")
                                if not isinstance(exc, UserError) else exc)
                    failing = True
            finally:
                if client is not None:
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

        call = etcdrpc.WatchStub(client.channel).Watch(
            requests(), credentials=client.call_credentials, metadata=client.metadata)
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
