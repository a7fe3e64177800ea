"""Volume stores against a real etcd and a real YAML file: same behaviour, both kinds.

Covers atomic and validated writes, secrets kept apart, watches, concurrent
writers (etcd transactions, file locks) and etcd restarting under the client.
"""

# ruff: noqa: F811 - pytest fixtures are imported by name and requested by name

from __future__ import annotations

import json
import logging
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import etcd3
import grpc
import pytest

from azfs.errors import BackendUnavailable, NotFound, UserError
from azfs.secret import Secret
from azfs.volumes.etcd_store import EtcdAuth, EtcdVolumeStore, parse_endpoint
from azfs.volumes.model import MountSpec, Volume, VolumeConfigError, load_yaml_text
from azfs.volumes.store import VolumeStore, open_store
from azfs.volumes.yaml_store import YamlVolumeStore
from tests.support.etcd import EtcdServer, etcd_server, secure_etcd  # noqa: F401
from tests.support.services import wait_until

PASSWORD = "Zx9-very-secret-key=="


def cifs(name: str, password: str | None = PASSWORD, at: str = "requested") -> Volume:
    return Volume(name, MountSpec(at=at, fstype="cifs",  # type: ignore[arg-type]
                                  path=f"//acct.file.core.windows.net/{name}",
                                  options="vers=3.0,username=acct,sec=ntlmssp",
                                  password=Secret(password) if password else None))


def bind(name: str, path: str = "/srv/data") -> Volume:
    return Volume(name, MountSpec(at="startup", fstype="bind", path=path))


@pytest.fixture(params=["yaml", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VolumeStore]:
    if request.param == "etcd":
        server = request.getfixturevalue("etcd_server")
        opened: VolumeStore = EtcdVolumeStore(server.endpoint)
    else:
        opened = YamlVolumeStore(tmp_path / "volumes.yaml", poll_interval=0.05)
    try:
        yield opened
    finally:
        opened.close()


def test_empty_store_lists_nothing(store: VolumeStore) -> None:
    assert store.list() == []
    with pytest.raises(NotFound, match="no volume named 'x'"):
        store.get("x")


def test_import_list_get_remove(store: VolumeStore) -> None:
    store.import_volumes([cifs("b"), bind("a")])
    assert store.list() == [bind("a"), cifs("b")]
    assert store.get("b").mount.password == Secret(PASSWORD)
    store.remove("a")
    assert [v.name for v in store.list()] == ["b"]
    with pytest.raises(NotFound):
        store.remove("a")
    with pytest.raises(VolumeConfigError, match="must not contain '/'"):
        store.get("../b")


def test_import_merges_and_replace_drops_others(store: VolumeStore) -> None:
    store.import_volumes([cifs("a"), cifs("b")])
    store.import_volumes([cifs("b", password="new"), bind("c")])
    assert [v.name for v in store.list()] == ["a", "b", "c"]
    assert store.get("b").mount.password == Secret("new")
    store.import_volumes([bind("c", "/other")], replace=True)
    assert store.list() == [bind("c", "/other")]


def test_password_can_be_removed(store: VolumeStore) -> None:
    store.import_volumes([cifs("a")])
    store.import_volumes([cifs("a", password=None)])
    assert store.get("a").mount.password is None


def test_invalid_write_changes_nothing(store: VolumeStore) -> None:
    store.import_volumes([cifs("a"), bind("b")])
    before = store.list()
    with pytest.raises(VolumeConfigError, match="duplicate"):
        store.replace_all([cifs("x"), cifs("x")])
    with pytest.raises(VolumeConfigError, match="must not contain spaces"):
        store.import_volumes([cifs("ok"), Volume("bad name", bind("z").mount)])
    assert store.list() == before


def test_round_trip_of_a_parsed_document(store: VolumeStore) -> None:
    volumes = load_yaml_text(
        "volumes:\n"
        "- name: azure-shard-1\n"
        "  mount: {at: requested, fstype: cifs, path: //A.file.core.windows.net/v,\n"
        f"          options: 'vers=3.0,username=A,password={PASSWORD},dir_mode=0777'}}\n"
        "- name: scratch\n"
        "  mount: {at: startup, fstype: tmpfs, path: tmpfs, options: size=1g}\n")
    store.replace_all(volumes)
    assert store.list() == volumes


def test_watch_sees_every_change(store: VolumeStore) -> None:
    seen: list[list[Volume]] = []
    with store.watch(seen.append):
        store.import_volumes([cifs("a")])
        wait_until(lambda: seen and seen[-1] == [cifs("a")], 10, "watch: add")
        store.import_volumes([cifs("a", password="rotated")])  # only the secret changes
        wait_until(lambda: seen[-1] == [cifs("a", password="rotated")], 10, "watch: secret")
        store.remove("a")
        wait_until(lambda: seen[-1] == [], 10, "watch: remove")
    count = len(seen)
    store.import_volumes([cifs("late")])
    assert store.list() == [cifs("late")]
    assert len(seen) == count  # cancelled watches stay quiet


def test_watch_callback_errors_do_not_stop_the_watch(store: VolumeStore) -> None:
    calls: list[int] = []

    def flaky(volumes: list[Volume]) -> None:
        calls.append(len(volumes))
        if len(calls) == 1:
            raise RuntimeError("callback bug")

    with store.watch(flaky):
        store.import_volumes([cifs("a")])
        wait_until(lambda: len(calls) >= 1, 10, "first change")
        store.import_volumes([cifs("b")])
        wait_until(lambda: calls[-1:] == [2], 10, "second change")


def test_concurrent_writers_lose_no_update(store: VolumeStore) -> None:
    errors: list[BaseException] = []

    def writer(prefix: str) -> None:
        try:
            for i in range(10):
                store.import_volumes([bind(f"{prefix}{i}")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(store.list()) == 30


def test_secrets_never_logged(store: VolumeStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with store.watch(lambda _v: None):
        store.import_volumes([cifs("a")])
        store.list()
        store.remove("a")
    with pytest.raises(VolumeConfigError):
        store.replace_all([cifs("x"), cifs("x")])
    assert caplog.records
    assert PASSWORD not in caplog.text


# -- etcd specifics --------------------------------------------------------------------


def raw_etcd(server: EtcdServer) -> etcd3.Etcd3Client:
    host, port = parse_endpoint(server.endpoint)
    return etcd3.client(host=host, port=port, timeout=5)


def test_etcd_layout_one_key_per_volume_and_secrets_apart(etcd_server: EtcdServer) -> None:  # noqa: F811
    with EtcdVolumeStore(etcd_server.endpoint) as store:
        store.import_volumes([cifs("a"), bind("b")])
    client = raw_etcd(etcd_server)
    try:
        config = {m.key.decode(): v for v, m in client.get_prefix("/azfs/volumes/")}
        secrets = {m.key.decode(): v for v, m in client.get_prefix("/azfs/volumes-secrets/")}
    finally:
        client.close()
    assert sorted(config) == ["/azfs/volumes/a", "/azfs/volumes/b"]
    assert all(PASSWORD.encode() not in value for value in config.values())
    assert json.loads(config["/azfs/volumes/a"])["mount"]["options"] == \
        "vers=3.0,username=acct,sec=ntlmssp"
    assert secrets == {"/azfs/volumes-secrets/a": PASSWORD.encode()}


def test_etcd_prefixes_isolate_installations(etcd_server: EtcdServer) -> None:  # noqa: F811
    with EtcdVolumeStore(etcd_server.endpoint, prefix="/one/") as one, \
            EtcdVolumeStore(etcd_server.endpoint, prefix="/two/") as two:
        one.import_volumes([cifs("a")])
        two.import_volumes([bind("b")])
        assert [v.name for v in one.list()] == ["a"]
        assert [v.name for v in two.list()] == ["b"]


def test_etcd_write_is_one_transaction(etcd_server: EtcdServer) -> None:  # noqa: F811
    """Too many volumes for one etcd transaction: a clear error and nothing written."""
    with EtcdVolumeStore(etcd_server.endpoint) as store:
        store.import_volumes([cifs("keep")])
        revision_before = _revision(etcd_server)
        with pytest.raises(UserError, match="--max-txn-ops"):
            store.import_volumes([cifs(f"v{i:03d}") for i in range(100)])
        assert store.list() == [cifs("keep")]
        assert _revision(etcd_server) == revision_before


def _revision(server: EtcdServer) -> int:
    client = raw_etcd(server)
    try:
        return client.get_prefix_response("/").header.revision
    finally:
        client.close()


def test_etcd_hand_written_garbage_is_reported_with_its_key(etcd_server: EtcdServer) -> None:  # noqa: F811
    client = raw_etcd(etcd_server)
    try:
        client.put("/azfs/volumes/bad", b"{not json")
        client.put("/azfs/volumes/worse", json.dumps(
            {"name": "worse", "mount": {"at": "never", "fstype": "bind", "path": "/d"}}))
    finally:
        client.close()
    with EtcdVolumeStore(etcd_server.endpoint) as store, \
            pytest.raises(VolumeConfigError) as info:
        store.list()
    assert "etcd key /azfs/volumes/bad: not JSON" in info.value.errors
    assert any(e.startswith("etcd key /azfs/volumes/worse.mount.at: must be")
               for e in info.value.errors)
    with EtcdVolumeStore(etcd_server.endpoint) as store:
        with pytest.raises(VolumeConfigError):  # a merge needs the current config
            store.import_volumes([bind("ok")])
        store.replace_all([cifs("worse"), bind("ok")])  # a full replace repairs the store
        assert store.list() == [bind("ok"), cifs("worse")]
    client = raw_etcd(etcd_server)
    try:
        keys = sorted(m.key.decode() for _v, m in client.get_prefix("/azfs/"))
    finally:
        client.close()
    assert keys == ["/azfs/volumes-secrets/worse", "/azfs/volumes.generation",
                    "/azfs/volumes/ok", "/azfs/volumes/worse"]


def test_etcd_restart_under_the_client(etcd_server: EtcdServer,  # noqa: F811
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="azfs")
    with EtcdVolumeStore(etcd_server.endpoint, timeout=3) as store:
        store.import_volumes([cifs("a")])
        seen: list[list[Volume]] = []
        with store.watch(seen.append):
            etcd_server.stop()
            with pytest.raises(BackendUnavailable,
                               match=f"etcd at {etcd_server.endpoint} is unavailable"):
                store.list()
            with pytest.raises(BackendUnavailable):
                store.import_volumes([cifs("b")])
            wait_until(lambda: "interrupted" in caplog.text, 10, "watch notices the outage")
            etcd_server.start()
            # the same client recovers, data survived, and the watch follows again
            wait_until(lambda: _answers(store), 15, "the client reconnects")
            assert store.list() == [cifs("a")]
            store.import_volumes([cifs("b")])
            wait_until(lambda: seen and [v.name for v in seen[-1]] == ["a", "b"], 15,
                       "watch after restart")
        assert "recovered" in caplog.text
        assert PASSWORD not in caplog.text


def _answers(store: VolumeStore) -> bool:
    try:
        store.list()
    except BackendUnavailable:
        return False
    return True


def test_etcd_watch_started_while_etcd_is_down(etcd_server: EtcdServer) -> None:  # noqa: F811
    etcd_server.stop()
    seen: list[list[Volume]] = []
    with EtcdVolumeStore(etcd_server.endpoint, timeout=2) as store:
        watch = store.watch(seen.append)
        etcd_server.start()
        writer = EtcdVolumeStore(etcd_server.endpoint)
        try:
            writer.import_volumes([bind("x")])
        finally:
            writer.close()
        wait_until(lambda: seen and seen[-1] == [bind("x")], 15, "watch after late start")
        watch.cancel()


def test_etcd_unreachable_is_a_clear_error() -> None:
    from tests.support.services import free_port

    with EtcdVolumeStore(f"127.0.0.1:{free_port()}", timeout=2) as store, \
            pytest.raises(BackendUnavailable, match=r"etcd at 127\.0\.0\.1:\d+ is unavailable"):
        store.list()


def test_etcd_fails_over_to_the_next_member(etcd_server: EtcdServer) -> None:  # noqa: F811
    from tests.support.services import free_port

    dead = f"127.0.0.1:{free_port()}"
    with EtcdVolumeStore(f"{dead},{etcd_server.endpoint}", timeout=2) as store:
        store.import_volumes([cifs("a")])
        assert store.endpoint == etcd_server.endpoint
        assert store.list() == [cifs("a")]
        seen: list[list[Volume]] = []
        with store.watch(seen.append):
            store.import_volumes([cifs("b")])
            wait_until(lambda: seen and len(seen[-1]) == 2, 10, "watch via second member")
        etcd_server.stop()
        with pytest.raises(BackendUnavailable, match=f"etcd at {dead}, {etcd_server.endpoint} "
                                                     "is unavailable"):
            store.list()


def test_etcd_cache_serves_reads_during_an_outage(etcd_server: EtcdServer,  # noqa: F811
                                                  tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache" / "volumes.yaml"
    with EtcdVolumeStore(etcd_server.endpoint, timeout=2, cache_file=cache) as store:
        with pytest.raises(NotFound):
            store.get("a")
        store.import_volumes([cifs("a"), bind("b")])
        assert store.list() == [cifs("a"), bind("b")]
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        etcd_server.stop()
        assert store.list() == [cifs("a"), bind("b")]
        assert store.get("a").mount.password == Secret(PASSWORD)
        assert "using the last good volume config" in caplog.text
        assert PASSWORD not in caplog.text
        with pytest.raises(BackendUnavailable):
            store.remove("a")  # writes never fall back


def test_etcd_tls_and_authentication(secure_etcd: EtcdServer,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tls = secure_etcd.tls_files
    certs = {"ca_cert": tls["ca"], "cert": tls["cert"], "key": tls["key"]}

    def store(**auth: object) -> EtcdVolumeStore:
        return EtcdVolumeStore(secure_etcd.endpoint, timeout=3,
                               auth=EtcdAuth(**auth))  # type: ignore[arg-type]

    with store(user="root", password=Secret("root-pw"), **certs) as root:
        root.import_volumes([cifs("a")])
        seen: list[list[Volume]] = []
        with root.watch(seen.append):
            root.import_volumes([cifs("b")])
            wait_until(lambda: seen and len(seen[-1]) == 2, 10, "authenticated watch")
    with store(user="reader", password=Secret("reader-pw"), **certs) as reader:
        assert [v.name for v in reader.list()] == ["a", "b"]
        with pytest.raises(UserError, match="write volumes: etcd refused: .*permission denied"):
            reader.remove("a")
    with store(user="root", password=Secret("wrong-pw"), **certs) as wrong, \
            pytest.raises(UserError, match="authentication failed"):
        wrong.list()
    with store(**certs) as anonymous, pytest.raises(UserError, match="permission denied"):
        anonymous.list()
    with store() as plain, pytest.raises(BackendUnavailable):
        plain.list()
    assert "root-pw" not in caplog.text and "wrong-pw" not in caplog.text


def test_etcd_expired_auth_token_logs_in_again(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = EtcdServer(tmp_path_factory.mktemp("etcd-ttl"), extra_args=["--auth-token-ttl=1"])
    server.start()
    try:
        server.enable_auth("root-pw")
        with EtcdVolumeStore(server.endpoint, timeout=3,
                             auth=EtcdAuth(user="root", password=Secret("root-pw"))) as store:
            store.import_volumes([cifs("a")])
            time.sleep(3)  # idle: etcd drops a simple token 1 s after its last use
            assert _token_expired(store)
            assert store.list() == [cifs("a")]
            store.remove("a")
    finally:
        server.stop()


def _token_expired(store: EtcdVolumeStore) -> bool:
    client = store._client_at(store._current)
    try:
        store._range(client, store.prefix, prefix=True)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def test_etcd_auth_from_environment(tmp_path: Path) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text("from-a-file\n")
    auth = EtcdAuth.from_env({"AZFS_ETCD_USER": "azfs",
                              "AZFS_ETCD_PASSWORD_FILE": str(password_file)})
    assert auth.user == "azfs" and auth.password == Secret("from-a-file")
    assert "from-a-file" not in repr(auth)
    with pytest.raises(UserError, match="cannot read"):
        EtcdAuth.from_env({"AZFS_ETCD_PASSWORD_FILE": str(tmp_path / "missing")})
    with pytest.raises(UserError, match="both a user and a password"):
        EtcdVolumeStore("127.0.0.1:1", auth=EtcdAuth(user="azfs"))
    with pytest.raises(UserError, match="needs the CA, the cert and the key"):
        EtcdVolumeStore("127.0.0.1:1", auth=EtcdAuth(cert=str(password_file)))
    with pytest.raises(UserError, match="does not exist"):
        EtcdVolumeStore("127.0.0.1:1", auth=EtcdAuth(ca_cert=str(tmp_path / "nope.crt")))


@pytest.mark.parametrize(("endpoint", "expected"), [
    ("127.0.0.1:2379", ("127.0.0.1", 2379)),
    ("http://etcd.example.com:4001", ("etcd.example.com", 4001)),
    ("etcd", ("etcd", 2379)),
    ("[::1]:2379", ("::1", 2379)),
])
def test_parse_endpoint(endpoint: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["", "host:port", "a b:1", "host:70000", "h:1/x"])
def test_parse_endpoint_refuses_garbage(endpoint: str) -> None:
    with pytest.raises(UserError, match="malformed etcd endpoint"):
        parse_endpoint(endpoint)


# -- YAML file specifics ---------------------------------------------------------------


def test_yaml_file_keeps_passwords_in_a_0600_side_file(tmp_path: Path) -> None:
    store = YamlVolumeStore(tmp_path / "volumes.yaml")
    store.import_volumes([cifs("a"), bind("b")])
    main = (tmp_path / "volumes.yaml").read_text()
    secrets = tmp_path / "volumes.secrets.yaml"
    assert PASSWORD not in main and "password" not in main
    assert PASSWORD in secrets.read_text()
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert load_yaml_text(main) == [cifs("a", password=None), bind("b")]


def test_yaml_file_hand_written_in_the_concept_scheme(tmp_path: Path) -> None:
    path = tmp_path / "volumes.yaml"
    path.write_text("volumes:\n- name: a\n  mount:\n    at: requested\n    fstype: cifs\n"
                    "    path: //acct.file.core.windows.net/a\n"
                    f"    options: vers=3.0,username=acct,password={PASSWORD},sec=ntlmssp\n")
    store = YamlVolumeStore(path)
    assert store.list() == [cifs("a")]
    store.import_volumes([bind("b")])  # the next write moves the password out
    assert PASSWORD not in path.read_text()
    assert store.get("a") == cifs("a")


def test_yaml_broken_file_is_a_clear_error_until_replaced(tmp_path: Path) -> None:
    path = tmp_path / "volumes.yaml"
    path.write_text("volumes: [\n")
    store = YamlVolumeStore(path)
    with pytest.raises(VolumeConfigError, match="broken YAML"):
        store.list()
    with pytest.raises(VolumeConfigError, match="broken YAML"):
        store.import_volumes([bind("b")])
    assert path.read_text() == "volumes: [\n"
    store.replace_all([bind("b")])  # a full replace repairs the file
    assert store.list() == [bind("b")]


def test_yaml_broken_secrets_file(tmp_path: Path) -> None:
    store = YamlVolumeStore(tmp_path / "volumes.yaml")
    store.import_volumes([cifs("a")])
    (tmp_path / "volumes.secrets.yaml").write_text("- a\n")
    with pytest.raises(VolumeConfigError, match="must map volume names to passwords"):
        store.list()


# -- open_store --------------------------------------------------------------------------


def test_open_store_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZFS_ETCD", raising=False)
    monkeypatch.setenv("AZFS_VOLUMES_FILE", str(tmp_path / "env.yaml"))
    with open_store() as store:
        assert isinstance(store, YamlVolumeStore) and store.path == tmp_path / "env.yaml"
    with open_store(config_file=tmp_path / "flag.yaml") as store:
        assert store.path == tmp_path / "flag.yaml"  # type: ignore[attr-defined]
    with open_store(etcd="127.0.0.1:1") as store:
        assert isinstance(store, EtcdVolumeStore)
    monkeypatch.setenv("AZFS_ETCD", "127.0.0.1:2")
    with pytest.raises(UserError, match="both"):
        open_store()
    with pytest.raises(UserError, match="not both"):
        open_store(etcd="h:1", config_file="f")
    monkeypatch.delenv("AZFS_VOLUMES_FILE")
    with open_store() as store:
        assert isinstance(store, EtcdVolumeStore) and store.endpoint == "127.0.0.1:2"
