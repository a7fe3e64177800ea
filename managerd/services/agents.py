"""Where the node agents are: the config file, etcd, or API registrations with a TTL.

Lookup order: the manager's config file; then, when etcd is configured, the
agent's own key ``/azfs/agents/<name>`` (a JSON value under a lease, so a
dead node disappears when its lease runs out); then registrations made
through ``PUT /v1/agents/{name}`` (admin token), which expire after their
TTL unless renewed.  TCP agents are reached with the manager's shared agent
secret; ``https://`` agents' certificates are checked with :attr:`AgentDirectory.tls`
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
from managerd.db.models import Agent, now
from managerd.db.session import Database
from managerd.errors import Forbidden, InvalidArgument, NotFound, Unavailable
from managerd.services.names import validate_name

log = logging.getLogger(__name__)
ETCD_PREFIX = "/azfs/agents/"


class AgentNotFound(NotFound):
    code = "agent-not-found"


def _aware(value: datetime | None) -> datetime | None:
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
        if self.etcd:
            found = await self._from_etcd(name)
            if found is not None:
                return found

        def work(session: Session) -> Agent | None:
            return session.get(Agent, name)

        agent = await self.db.read(work)
        expires = _aware(agent.expires_at) if agent is not None else None
        if agent is None or (expires is not None and expires < now()):
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
            return None
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
        if not who.is_admin:
            raise Forbidden("only admins list agents")

        def work(session: Session) -> list[dict[str, Any]]:
            rows = [_agent_dict(a) for a in session.scalars(select(Agent).order_by(Agent.name))]
            for name, cfg in sorted(self.configured.items()):
                rows.append({"name": name, "socket": str(cfg.socket) if cfg.socket else None,
                             "url": cfg.url, "expires_at": None, "source": "config"})
            return rows

        return await self.db.read(work)

    async def remove(self, who: Principal, name: str) -> None:
        if not who.is_admin:
            raise Forbidden("only admins remove agents")

        def work(session: Session) -> None:
            agent = session.get(Agent, name)
            if agent is not None:
                session.delete(agent)

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
    expires = _aware(agent.expires_at)
    return {"name": agent.name, "socket": agent.socket, "url": agent.url,
            "expires_at": expires.isoformat() if expires else None, "source": "api"}
