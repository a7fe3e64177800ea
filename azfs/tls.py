"""TLS for the daemons' TCP endpoints and their clients: contexts made and checked in one place.

Servers (``azfs-managerd``, ``azfs-agentd``'s TCP listener) are served by
hypercorn from a certificate chain and a key file; :func:`check_server_files`
loads them once at start so that a missing file, a key that does not match
its certificate or a key other users may read stops the daemon with one
clear line, not a traceback from inside the server.  Clients verify the
server's certificate and host name by default: against a given CA file, or
the system's trust (``$SSL_CERT_FILE`` or certifi's bundle).  Messages name
files, never their contents.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

from azfs.errors import UserError

#: the CA file for azfs's clients (the CLI, a manager's agent client) when none is given
CA_ENV = "AZFS_CA_FILE"


def _check_key_mode(key_file: Path, what: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(key_file).st_mode)
    except OSError as exc:
        raise UserError(f"{what}: key file {key_file}: {exc.strerror}") from None
    if mode & 0o007:
        raise UserError(f"{what}: key file {key_file} has mode {mode:04o}: every user of "
                        f"the host can read it; 'chmod 0600 {key_file}'")


def check_server_files(cert_file: Path, key_file: Path, client_ca_file: Path | None,
                       what: str) -> None:
    """Raises :class:`UserError` unless a TLS server can start from these files."""
    _check_key_mode(key_file, what)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except FileNotFoundError as exc:
        raise UserError(f"{what}: {exc.filename or cert_file}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"{what}: cannot use certificate {cert_file} with key {key_file}: "
                        f"{_reason(exc)}") from None
    if client_ca_file is not None:
        _load_ca(context, client_ca_file, what)


def client_context(ca_file: Path | str | None = None, cert_file: Path | None = None,
                   key_file: Path | None = None, what: str = "TLS") -> ssl.SSLContext:
    """A verifying client context: the server's certificate and host name are checked.

    ``ca_file`` (else ``$AZFS_CA_FILE``, else the system's trust); ``cert_file``
    and ``key_file``: a client certificate for mutual TLS.
    """
    ca_file = ca_file or os.environ.get(CA_ENV) or None
    if ca_file is None:
        import httpx

        context = httpx.create_ssl_context()  # $SSL_CERT_FILE or certifi, verifying
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        _load_ca(context, Path(ca_file), what)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        if key_file is None:
            raise UserError(f"{what}: a client certificate needs its key file")
        _check_key_mode(key_file, what)
        try:
            context.load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"{what}: cannot use client certificate {cert_file}: "
                            f"{_reason(exc)}") from None
    return context


def _load_ca(context: ssl.SSLContext, ca_file: Path, what: str) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except FileNotFoundError:
        raise UserError(f"{what}: CA file {ca_file}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"{what}: CA file {ca_file}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
