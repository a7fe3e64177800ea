"""Where the node agents are: the config file, etcd, or API registrations with a TTL.

Lookup order: the manager's config file; then, when etcd is configured, the
agent's own key ``/azfs/agents/<name>`` (a JSON value under a lease, so a
dead node disappears when its lease runs out); then registrations made
through ``PUT /v1/agents/{name}`` (admin token), which expire after their
TTL unless renewed.  An agent the cluster has seen (``agent_presence``, kept
by the leader's reconcile loop) or that still has kernels, but that is no
longer registered, is *down*: it is listed as such and a call to it fails at
once with ``agent-down`` (503) instead of waiting for a dead host.

TCP agents are reached with the manager's shared agent secret; ``https://``
agents' certificates are checked with :attr:`AgentDirectory.tls`
(the manager's ``agent_ca_file``, and its client certificate for mutual TLS).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from sqlalchemy import select
from sqlalchemy.orm import Session

from azfs.secret import Secret
from managerd.agent_client import AgentAddress
from managerd.auth import Principal
from managerd.config import AgentConfig
from managerd.db.models import Agent, AgentPresence, Kernel, now
from managerd.db.session import Database
from managerd.errors import Forbidden, InvalidArgument, NotFound, Unavailable
from managerd.services.names import NAME_RE, validate_name

log = logging.getLogger(__name__)
ETCD_PREFIX = "/azfs/agents/"


class AgentNotFound(NotFound):
    code = "agent-not-found"


class AgentDown(Unavailable):
    code = "agent-down"


class _EtcdFailed(Exception):
    """etcd did not answer a lookup: the API registry is asked, then the caller told."""


def aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # SQLite returns naive datetimes
    return value


class AgentDirectory:
    def __init__(self, db: Database, configured: Mapping[str, AgentConfig],
                 secret: Secret | None, etcd: str | None = None,
                 timeout: float = 5.0, tls: ssl.SSLContext | None = None) -> None:
        self.db = db
        self.configured = configured
        self.secret = secret
        self.tls = tls
        self.etcd = etcd
        self.timeout = timeout
        self._etcd_client = None

    async def resolve(self, name: str) -> AgentAddress:
        validate_name(name, "agent name")
        if name in self.configured:
            cfg = self.configured[name]
            return AgentAddress(name, cfg.socket, cfg.url, cfg.secret or self.secret, self.tls)
        etcd_failed = False
        if self.etcd:
            try:
                found = await self._from_etcd(name)
            except _EtcdFailed:
                found, etcd_failed = None, True
            if found is not None:
                return found

        def work(session: Session) -> Agent | None:
            return session.get(Agent, name)

        agent = await self.db.read(work)
        expires = aware(agent.expires_at) if agent is not None else None
        if agent is None or (expires is not None and expires < now()):
            if etcd_failed:
                raise Unavailable(f"cannot look agent {name!r} up: etcd does not answer",
                                  code="agent-unreachable", status=502)
            if await self.db.read(_known, name):
                raise AgentDown(f"agent {name!r} is down (its registration expired); "
                                "nothing can be done on it until it registers again")
            raise AgentNotFound(f"no agent named {name!r} is registered")
        return AgentAddress(name, Path(agent.socket) if agent.socket else None, agent.url,
                            self.secret, self.tls)

    async def _from_etcd(self, name: str) -> AgentAddress | None:
        try:
            with trio.fail_after(self.timeout):
                raw = await trio.to_thread.run_sync(self._etcd_get, ETCD_PREFIX + name,
                                                    abandon_on_cancel=True)
        except trio.TooSlowError:
            raise Unavailable("etcd did not answer the agent lookup in time",
                              code="agent-unreachable", status=502) from None
        except Exception as exc:  # noqa: BLE001 - etcd down: fall back to the API registry
            log.warning("agent lookup in etcd failed: %s", exc)
            raise _EtcdFailed from None
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            socket, url = value.get("socket"), value.get("url")
        except (ValueError, AttributeError):
            log.warning("malformed etcd registration of agent %s", name)
            return None
        if url:
            return AgentAddress(name, None, str(url), self.secret, self.tls)
        if socket:
            return AgentAddress(name, Path(socket), None, None)
        return None

    async def registrations(self) -> dict[str, str]:
        """Every live registration: agent name -> a token that changes when the agent
        registers anew (its etcd lease; the API registration's time; "config")."""
        out: dict[str, str] = {}
        if self.etcd:
            with trio.fail_after(self.timeout):
                found = await trio.to_thread.run_sync(self._etcd_scan, abandon_on_cancel=True)
            out.update({name: token for name, (token, _value) in found.items()})

        def work(session: Session) -> dict[str, str]:
            rows = {}
            for agent in session.scalars(select(Agent)):
                expires = aware(agent.expires_at)
                if expires is None or expires >= now():
                    rows[agent.name] = f"api:{aware(agent.registered_at).isoformat()}"
            return rows

        for name, token in (await self.db.read(work)).items():
            out.setdefault(name, token)
        for name in self.configured:
            out[name] = "config"
        return out

    def _etcd_scan(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """name -> (lease token, value) of every registration under the prefix."""
        if self._etcd_client is None:
            self._etcd_client = self._etcd_connect()
        try:
            found = list(self._etcd_client.get_prefix(ETCD_PREFIX))
        except Exception:
            self._etcd_client.close()
            self._etcd_client = None
            raise
        out = {}
        for value, meta in found:
            name = meta.key.decode(errors="replace").removeprefix(ETCD_PREFIX)
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if NAME_RE.match(name) and isinstance(parsed, dict):
                out[name] = (f"etcd:{meta.lease_id:x}",
                             {"socket": parsed.get("socket"), "url": parsed.get("url")})
        return out

    def _etcd_get(self, key: str) -> bytes | None:
        if self._etcd_client is None:
            self._etcd_client = self._etcd_connect()
        try:
            value, _meta = self._etcd_client.get(key)
        except Exception:
            self._etcd_client.close()
            self._etcd_client = None  # reconnect (maybe to another member) next time
            raise
        return value

    def _etcd_connect(self):
        """A client of the first member that answers; TLS/auth from the environment,
        as for the volume store and the agents' own registrations."""
        from azfs.volumes.etcd_client import connect_first

        return connect_first(self.etcd or "", timeout=self.timeout)

    async def register(self, who: Principal, name: str, socket: str | None, url: str | None,
                       ttl: int) -> dict[str, Any]:
        if not who.is_admin:
            raise Forbidden("only admins (or agents with an admin token) register agents")
        validate_name(name, "agent name")
        if (socket is None) == (url is None):
            raise InvalidArgument("give exactly one of 'socket' or 'url'")
        if socket is not None and (not socket.startswith("/") or "\0" in socket):
            raise InvalidArgument("socket must be an absolute path")
        if url is not None and not url.startswith(("http://", "https://")):
            raise InvalidArgument("url must start with http:// or https://")
        if name in self.configured:
            raise InvalidArgument(f"agent {name!r} is set in the manager's config file")
        if not 0 <= ttl <= 86400:
            raise InvalidArgument("ttl must be 0-86400 seconds (0: no expiry)")

        def work(session: Session) -> dict[str, Any]:
            agent = session.get(Agent, name) or Agent(name=name)
            agent.socket, agent.url = socket, url
            agent.expires_at = now() + timedelta(seconds=ttl) if ttl else None
            agent.registered_at = now()
            session.add(agent)
            session.flush()
            return _agent_dict(agent)

        return await self.db.run(work)

    async def list(self, who: Principal) -> list[dict[str, Any]]:
        """Registered agents (``state`` up) and the ones seen before that are gone (down)."""
        if not who.is_admin:
            raise Forbidden("only admins list agents")
        etcd: dict[str, dict[str, Any]] = {}
        unknown = False  # etcd did not answer: agents seen only there cannot be judged
        if self.etcd:
            try:
                with trio.fail_after(self.timeout):
                    found = await trio.to_thread.run_sync(self._etcd_scan,
                                                          abandon_on_cancel=True)
                etcd = {name: value for name, (_token, value) in found.items()}
            except Exception as exc:  # noqa: BLE001 - list what is known, say what is not
                log.warning("agent listing: etcd did not answer: %s", type(exc).__name__)
                unknown = True

        def work(session: Session) -> list[dict[str, Any]]:
            rows: dict[str, dict[str, Any]] = {}
            for a in session.scalars(select(Agent).order_by(Agent.name)):
                rows[a.name] = _agent_dict(a)
            for name, value in etcd.items():
                rows[name] = {"name": name, "socket": value.get("socket"),
                              "url": value.get("url"), "expires_at": None, "source": "etcd",
                              "state": "up"}
            for name, cfg in self.configured.items():
                rows[name] = {"name": name, "socket": str(cfg.socket) if cfg.socket else None,
                              "url": cfg.url, "expires_at": None, "source": "config",
                              "state": "up"}
            seen = {p.name: p for p in session.scalars(select(AgentPresence))}
            with_kernels = set(session.scalars(select(Kernel.agent).distinct()))
            for name in (set(seen) | with_kernels) - {n for n, r in rows.items()
                                                      if r["state"] == "up"}:
                presence = seen.get(name)
                rows[name] = {**rows.get(name, {"name": name, "socket": None, "url": None,
                                                "expires_at": None, "source": "etcd"}),
                              "state": "unknown" if unknown and name not in rows else "down"}
                if presence is not None:
                    rows[name]["last_seen"] = aware(presence.last_seen).isoformat()
            return [rows[n] for n in sorted(rows)]

        return await self.db.read(work)

    async def remove(self, who: Principal, name: str) -> None:
        if not who.is_admin:
            raise Forbidden("only admins remove agents")

        def work(session: Session) -> None:
            agent = session.get(Agent, name)
            if agent is not None:
                session.delete(agent)
            presence = session.get(AgentPresence, name)  # a retired node: no longer "down"
            if presence is not None:
                session.delete(presence)

        await self.db.run(work)


def agent_tls(ca_file: Path | None, cert_file: Path | None,
              key_file: Path | None) -> ssl.SSLContext | None:
    """The context that verifies agents' certificates (None: none configured, httpx's
    verifying default applies)."""
    if ca_file is None and cert_file is None:
        return None
    from azfs.tls import client_context

    return client_context(ca_file, cert_file, key_file, what="agent TLS")


def _agent_dict(agent: Agent) -> dict[str, Any]:
    expires = aware(agent.expires_at)
    return {"name": agent.name, "socket": agent.socket, "url": agent.url,
            "expires_at": expires.isoformat() if expires else None, "source": "api",
            "state": "down" if expires is not None and expires < now() else "up"}


def _known(session: Session, name: str) -> bool:
    """True if the cluster has seen agent ``name`` or still records kernels on it."""
    if session.get(AgentPresence, name) is not None:
        return True
    return session.scalar(select(Kernel.id).where(Kernel.agent == name).limit(1)) is not None
