"""Brings the manager's kernel records in line with what each agent's journal holds.

An agent that comes back (a new registration: a new etcd lease, or a new
API registration) may have lost kernels with its node, and may still export
kernels that were force-destroyed while it was away.  The leader notices
the new registration and reconciles that agent once; every agent is also
reconciled every ``full_every`` seconds in case a change was missed.

* A kernel the manager records as ``running`` on the agent but that the
  agent does not hold is marked ``gone``: its mounts are dropped, so its
  vfolders are no longer counted as in use (``mounted`` becomes ``ready``
  when no other kernel uses them).  A ``destroying`` one is forgotten.
* A kernel the agent holds but the manager has no record of is unexported
  on the agent.
* ``creating`` kernels are left to the undo of stale creates.

The reads are ordered so that a create or destroy in flight is never
undone: the manager's records are read before the agent's list for the
first rule (and the change is conditional on the row being unchanged), and
after it for the second (a create writes its row before it calls the
agent).  Kernel ids are not reused by schedulers, which closes the rest.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import trio
from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import Session

from managerd.agent_client import AgentClient
from managerd.db.models import MOUNTED, READY, AgentPresence, Kernel, KernelMount, Vfolder, now
from managerd.db.session import Database
from managerd.errors import ApiError
from managerd.services.agents import AgentDirectory, aware

log = logging.getLogger(__name__)

GONE = "gone"


@dataclass
class Outcome:
    agent: str
    gone: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    unexported: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, db: Database, agents: AgentDirectory, agent_timeout: float = 30.0,
                 interval: float = 10.0, full_every: float = 600.0) -> None:
        self.db = db
        self.agents = agents
        self.agent_timeout = agent_timeout
        self.interval = interval
        self.full_every = full_every

    async def run(self) -> None:
        """Scans the registrations every ``interval`` seconds until cancelled."""
        failing = False
        while True:
            try:
                await self.scan()
                failing = False
            except Exception as exc:  # noqa: BLE001 - a failed scan waits for the next one
                if not failing:  # once per outage, not at every interval
                    log.warning("agent scan failed: %s", str(exc) or type(exc).__name__)
                failing = True
            await trio.sleep(self.interval)

    async def scan(self) -> list[Outcome]:
        """Records who is registered; reconciles agents that are new or due."""
        live = {name: lease[:64] for name, lease in (await self.agents.registrations()).items()}
        seen = await self.db.read(_presence)
        due_before = now() - timedelta(seconds=self.full_every)
        outcomes: list[Outcome] = []
        reconciled: dict[str, datetime] = {}
        for name, lease in sorted(live.items()):
            last = seen.get(name)
            if last is None or last[0] != lease or last[1] is None or last[1] < due_before:
                try:
                    outcomes.append(await self.reconcile(name))
                    reconciled[name] = now()
                except ApiError as exc:
                    log.warning("cannot reconcile agent %s: %s", name, exc.message)
        await self.db.run(_record, live, reconciled)
        return outcomes

    async def reconcile(self, name: str) -> Outcome:
        out = Outcome(name)
        before = await self.db.read(_records, name)
        address = await self.agents.resolve(name)
        client = AgentClient(address, self.agent_timeout)
        held = await client.kernel_ids()
        for kernel_id, (status, created) in before.items():
            if kernel_id in held:
                continue
            if status == "running" and await self.db.run(_mark_gone, kernel_id, created):
                out.gone.append(kernel_id)
            elif status == "destroying" and await self.db.run(_drop, kernel_id, created):
                out.forgotten.append(kernel_id)
        after = await self.db.read(_records, name)
        for kernel_id in sorted(held - set(after)):
            await client.unexport(kernel_id)
            out.unexported.append(kernel_id)
        if out.gone or out.forgotten or out.unexported:
            log.warning("agent %s reconciled: gone %s, forgotten %s, unexported %s", name,
                        out.gone, out.forgotten, out.unexported)
        return out


# -- units of work ------------------------------------------------------------------

def _presence(session: Session) -> dict[str, tuple[str, datetime | None]]:
    return {p.name: (p.lease, aware(p.reconciled_at))
            for p in session.scalars(select(AgentPresence))}


def _record(session: Session, live: dict[str, str], reconciled: dict[str, datetime]) -> None:
    """One transaction per scan: who is registered now, and who was reconciled."""
    rows = {p.name: p for p in session.scalars(
        select(AgentPresence).where(AgentPresence.name.in_(list(live))))}
    for name, lease in live.items():
        row = rows.get(name)
        if row is None:
            row = AgentPresence(name=name, lease=lease, first_seen=now())
            session.add(row)
        elif row.lease != lease and name not in reconciled:
            row.reconciled_at = None  # a new registration not yet reconciled: try again
        row.lease, row.last_seen = lease, now()
        if name in reconciled:
            row.reconciled_at = reconciled[name]


def _records(session: Session, agent: str) -> dict[str, tuple[str, datetime]]:
    return {k.id: (k.status, k.created_at)
            for k in session.scalars(select(Kernel).where(Kernel.agent == agent))}


def _same(session: Session, kernel_id: str, created: datetime, status: str) -> Kernel | None:
    kernel = session.get(Kernel, kernel_id, with_for_update=True)
    if kernel is None or kernel.status != status or kernel.created_at != created:
        return None
    return kernel


def _release(session: Session, kernel_id: str) -> None:
    """Drops the kernel's mounts; its vfolders no other kernel uses become ready."""
    vfids: list[uuid.UUID] = list(session.scalars(select(KernelMount.vfolder_id).where(
        KernelMount.kernel_id == kernel_id, KernelMount.vfolder_id.is_not(None))))
    if vfids:  # lock the vfolder rows in one global order (as the kernel service does)
        session.execute(select(Vfolder.id).where(Vfolder.id.in_(vfids))
                        .order_by(Vfolder.id).with_for_update()).all()
    session.execute(delete(KernelMount).where(KernelMount.kernel_id == kernel_id))
    if vfids:
        session.execute(
            update(Vfolder).where(Vfolder.id.in_(vfids), Vfolder.status == MOUNTED,
                                  ~exists().where(KernelMount.vfolder_id == Vfolder.id))
            .values(status=READY))


def _mark_gone(session: Session, kernel_id: str, created: datetime) -> bool:
    kernel = _same(session, kernel_id, created, "running")
    if kernel is None:
        return False
    _release(session, kernel_id)
    kernel.status = GONE
    return True


def _drop(session: Session, kernel_id: str, created: datetime) -> bool:
    if _same(session, kernel_id, created, "destroying") is None:
        return False
    _release(session, kernel_id)
    session.execute(delete(Kernel).where(Kernel.id == kernel_id))
    return True
