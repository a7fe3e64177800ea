"""Connecting to etcd: endpoints, authentication, and failover between members.

Shared by the volume store (:mod:`azfs.volumes.etcd_store`), the agent's
registration and the manager's agent lookup, so that they parse
``HOST:PORT[,HOST:PORT...]`` alike, authenticate alike (:class:`EtcdAuth`,
from ``$AZFS_ETCD_*`` by default) and fail over alike: :func:`connect_first`
gives a client of the first member that answers.  The volume store keeps
one client per member (:func:`member_client`) and moves on to the next
member when a call fails.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import etcd3

from azfs.errors import UserError
from azfs.secret import Secret

DEFAULT_PORT = 2379
_ENDPOINT_RE = re.compile(r"^(?:https?://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?/?$")

#: gRPC backs off up to 120 s between reconnects by default; a restarted etcd
#: should be used again within a second or two.
GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``http://HOST:PORT``, ``[::1]:2379``; port defaults to 2379)."""
    match = _ENDPOINT_RE.fullmatch(endpoint.strip())
    port = int(match.group(2) or DEFAULT_PORT) if match else 0
    if not match or not 0 < port < 65536:
        raise UserError(f"malformed etcd endpoint {endpoint!r} (expected HOST:PORT)")
    return match.group(1).strip("[]"), port



@dataclass(frozen=True)
class EtcdAuth:
    """How to authenticate to etcd: a user and password, and/or TLS.

    ``ca_cert`` alone gives a TLS channel; with ``cert`` and ``key`` also a
    client certificate.  From the environment (:meth:`from_env`):
    ``AZFS_ETCD_USER``, ``AZFS_ETCD_PASSWORD_FILE`` (a file, so that the
    password is never on a command line), ``AZFS_ETCD_CA``,
    ``AZFS_ETCD_CERT``, ``AZFS_ETCD_KEY``.
    """

    user: str | None = None
    password: Secret | None = None
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EtcdAuth:
        env = os.environ if environ is None else environ
        password = None
        if env.get("AZFS_ETCD_PASSWORD_FILE"):
            path = Path(env["AZFS_ETCD_PASSWORD_FILE"])
            try:
                password = Secret(path.read_text().rstrip("\r\n"))
            except OSError as exc:
                raise UserError(f"$AZFS_ETCD_PASSWORD_FILE {path}: cannot read: "
                                f"{exc.strerror}") from None
        return cls(user=env.get("AZFS_ETCD_USER") or None, password=password,
                   ca_cert=env.get("AZFS_ETCD_CA") or None, cert=env.get("AZFS_ETCD_CERT") or None,
                   key=env.get("AZFS_ETCD_KEY") or None)

    def client_kwargs(self) -> dict[str, object]:
        if bool(self.user) != bool(self.password):
            raise UserError("etcd authentication needs both a user and a password")
        if (self.cert or self.key) and not (self.cert and self.key and self.ca_cert):
            raise UserError("an etcd client certificate needs the CA, the cert and the key")
        for what, path in (("CA", self.ca_cert), ("cert", self.cert), ("key", self.key)):
            if path and not os.path.isfile(path):
                raise UserError(f"etcd TLS {what} file {path} does not exist")
        return {"user": self.user, "password": self.password.reveal() if self.password else None,
                "ca_cert": self.ca_cert, "cert_cert": self.cert, "cert_key": self.key}


def parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    """A comma-separated list of endpoints (the members of one etcd cluster)."""
    parsed = [parse_endpoint(e) for e in endpoints.split(",") if e.strip()]
    if not parsed:
        raise UserError("no etcd endpoint given (expected HOST:PORT[,HOST:PORT...])")
    return parsed


def fmt_endpoint(endpoint: tuple[str, int]) -> str:
    """``HOST:PORT`` again (IPv6 hosts in brackets)."""
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def member_client(endpoint: tuple[str, int], *, timeout: float,
                  client_kwargs: Mapping[str, object],
                  grpc_options: list[tuple[str, int]] | None = None) -> etcd3.Etcd3Client:
    """A client of one member (no request made yet); ``client_kwargs`` from :class:`EtcdAuth`."""
    host, port = endpoint
    extra = {"grpc_options": grpc_options} if grpc_options is not None else {}
    client = etcd3.client(host=host, port=port, timeout=timeout, **extra, **client_kwargs)
    if not client.uses_secure_channel:
        # gRPC refuses call credentials on a plain channel; the auth token
        # also travels in the metadata, which is what etcd reads.
        client.call_credentials = None
    return client


def connect_first(endpoints: str, *, timeout: float = 5.0,
                  auth: EtcdAuth | None = None) -> etcd3.Etcd3Client:
    """A client of the first member of ``endpoints`` that answers a status request.

    ``auth`` defaults to :meth:`EtcdAuth.from_env`.  A member that does not
    answer, or refuses the login, is skipped; when none answers, the last
    member's error is raised.
    """
    kwargs = (auth or EtcdAuth.from_env()).client_kwargs()
    last: Exception | None = None
    for endpoint in parse_endpoints(endpoints):
        client = None
        try:
            # with a login, making the client is already a request (it authenticates)
            client = member_client(endpoint, timeout=timeout, client_kwargs=kwargs)
            client.status()
            return client
        except Exception as exc:  # noqa: BLE001 - try the next member
            last = exc
            if client is not None:
                client.close()
    raise last or RuntimeError("no etcd member answered")
