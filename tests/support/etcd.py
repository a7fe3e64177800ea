"""A real etcd for tests: ``/usr/bin/etcd`` on free loopback ports, temp data dir.

Use the ``etcd_server`` fixture (import it into a test module or conftest)::

    from tests.support.etcd import etcd_server  # noqa: F401

    def test_something(etcd_server):  # noqa: F811 (ruff sees the import shadowed)
        store = EtcdVolumeStore(etcd_server.endpoint)   # "127.0.0.1:PORT"
        etcd_server.stop(); etcd_server.start()        # restart, same data and ports

The server is always stopped at teardown, even when the test fails.
``EtcdServer(workdir, tls=True)`` serves TLS with a throw-away CA (client
certificates required; see :attr:`EtcdServer.tls_files`), and
:meth:`EtcdServer.enable_auth` turns on etcd's user/password authentication.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import etcd3
import etcd3.etcdrpc as etcdrpc
import pytest
from etcd3.etcdrpc import auth_pb2

from tests.support.services import free_port, missing_service, stop_process, wait_until

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdServer:
    """One single-member etcd cluster; restartable on the same ports and data."""

    def __init__(self, workdir: Path, tls: bool = False, extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.tls = tls
        self.extra_args = list(extra_args)
        #: with tls: {"ca", "cert", "key"} of a client certificate the server trusts
        self.tls_files: dict[str, str] = make_certificates(workdir / "tls") if tls else {}
        self.root_password: str | None = None
        self.data_dir = workdir / "data"
        self.log = workdir / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def _healthy(self) -> bool:
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls_files["ca"])
            context.load_cert_chain(self.tls_files["cert"], self.tls_files["key"])
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1,
                                        context=context) as response:
                return b'"true"' in response.read()
        except OSError:
            return False

    def client(self, **kwargs: object) -> etcd3.Etcd3Client:
        """A raw etcd3 client (as root once auth is enabled)."""
        if self.tls:
            kwargs.setdefault("ca_cert", self.tls_files["ca"])
            kwargs.setdefault("cert_cert", self.tls_files["cert"])
            kwargs.setdefault("cert_key", self.tls_files["key"])
        if self.root_password:
            kwargs.setdefault("user", "root")
            kwargs.setdefault("password", self.root_password)
        return etcd3.client(host="127.0.0.1", port=self.client_port, timeout=5, **kwargs)

    def enable_auth(self, root_password: str,
                    users: dict[str, tuple[str, str, str]] | None = None) -> None:
        """Turns on authentication; ``users``: name → (password, key prefix, "READ"|...)."""
        client = self.client()
        try:
            auth = etcdrpc.AuthStub(client.channel)
            auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name="root"))
            auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password=root_password))
            auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"))
            for name, (password, prefix, perm) in (users or {}).items():
                auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name=name))
                key = prefix.encode()
                permission = auth_pb2.Permission(
                    permType=auth_pb2.Permission.Type.Value(perm), key=key,
                    range_end=etcd3.utils.increment_last_byte(key))
                auth.RoleGrantPermission(
                    etcdrpc.AuthRoleGrantPermissionRequest(name=name, perm=permission))
                auth.UserAdd(etcdrpc.AuthUserAddRequest(name=name, password=password))
                auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=name, role=name))
            auth.AuthEnable(etcdrpc.AuthEnableRequest())
        finally:
            client.close()
        self.root_password = root_password

    def start(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if not Path(ETCD_BINARY).exists():
            missing_service(f"etcd is not installed ({ETCD_BINARY}; Debian package etcd-server)")
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            ETCD_BINARY, "--name", "test", "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--initial-cluster-state", "new",
            "--log-level", "warn", "--logger", "zap",
        ]
        cmd += self.extra_args
        if self.tls:
            tls = self.workdir / "tls"
            cmd += ["--cert-file", str(tls / "server.crt"), "--key-file", str(tls / "server.key"),
                    "--trusted-ca-file", self.tls_files["ca"], "--client-cert-auth"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_until(self._healthy, timeout, "etcd", self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def make_certificates(directory: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, in PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def write_key(name: str, key: ec.EllipticCurvePrivateKey) -> None:
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    def certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                    signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False).add_extension(x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False)
        cert = builder.sign(signer, hashes.SHA256())
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(name, key)
        return cert

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    certificate("test-ca", ca_key, ca_name, ca_key, ca=True)
    (directory / "test-ca.crt").rename(directory / "ca.crt")
    for name in ("server", "client"):
        certificate(name, ec.generate_private_key(ec.SECP256R1()), ca_name, ca_key, ca=False)
    return {"ca": str(directory / "ca.crt"), "cert": str(directory / "client.crt"),
            "key": str(directory / "client.key")}


@pytest.fixture
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def secure_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """etcd with TLS client certificates and user/password authentication."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd-tls"), tls=True)
    server.start()
    try:
        server.enable_auth("root-pw", {"reader": ("reader-pw", "/azfs/", "READ")})
        yield server
    finally:
        server.stop()
