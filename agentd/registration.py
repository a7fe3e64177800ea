"""The agent's registration in etcd: a key under a lease, so a dead node disappears.

``/azfs/agents/<agent_id>`` holds ``{"agent_id", "socket", "url", "started"}``
(``url`` only when the agent listens on TCP for managers on other hosts),
under a lease of ``registration_ttl`` seconds refreshed at a third of it; if
etcd is unreachable the agent keeps serving and retries.  Single-node
installs (no etcd configured) register nothing.
"""

from __future__ import annotations

import json
import logging
import time

import trio

from agentd.config import Config

log = logging.getLogger("agentd.registration")

PREFIX = "/azfs/agents/"


class Registration:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.key = PREFIX + config.agent_id
        self._client = None
        self._lease = None

    def _value(self) -> str:
        # the manager reaches the agent at "url" when there is one, else at "socket"
        return json.dumps({"agent_id": self.config.agent_id, "socket": str(self.config.socket),
                           "url": self.config.manager_url, "started": time.time()})

    def _connect(self):
        """A client of the first member that answers (TLS/auth as for the volume store)."""
        from azfs.volumes.etcd_client import connect_first

        return connect_first(self.config.etcd or "", timeout=5)

    def _register(self) -> None:
        if self._client is None:
            self._client = self._connect()
        try:
            self._lease = self._client.lease(self.config.registration_ttl)
        except Exception:
            self._client.close()
            self._client = None
            raise
        self._client.put(self.key, self._value(), lease=self._lease)

    def _refresh(self) -> None:
        assert self._lease is not None
        response = list(self._lease.refresh())
        if not response or response[0].TTL <= 0:  # the lease expired meanwhile
            self._register()

    def _revoke(self) -> None:
        if self._lease is not None:
            self._lease.revoke()
        if self._client is not None:
            self._client.close()

    async def run(self) -> None:
        """Registers and keeps the lease alive until cancelled; then revokes it."""
        if not self.config.etcd:
            return
        interval = max(1.0, self.config.registration_ttl / 3)
        try:
            while True:
                try:
                    if self._lease is None:
                        await trio.to_thread.run_sync(self._register)
                        log.info("registered as %s", self.key)
                    else:
                        await trio.to_thread.run_sync(self._refresh)
                except Exception as exc:  # noqa: BLE001 - etcd down: keep serving, retry
                    log.warning("etcd registration failed: %s", exc)
                    self._lease = None
                await trio.sleep(interval)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await trio.to_thread.run_sync(self._revoke)
                except Exception:  # noqa: BLE001 - the lease expires anyway
                    log.debug("revoke failed", exc_info=True)
