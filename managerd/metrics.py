"""Prometheus metrics of the manager: requests by route and outcome, vfolders by state,
and whether this manager holds the leader lease.

Request counters and latency histograms live in a registry of this app (not
the process-global one, so several apps in one process stay apart).  The
vfolder and kernel counts are read from the database at scrape time, so they
are right after a restart and never drift.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from managerd.db.models import Kernel, Vfolder
from managerd.db.session import Database

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _counts(session: Session) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    vfolders = session.execute(
        select(Vfolder.status, func.count()).group_by(Vfolder.status)).all()
    kernels = session.execute(select(Kernel.status, func.count()).group_by(Kernel.status)).all()
    return [(s, int(n)) for s, n in vfolders], [(s, int(n)) for s, n in kernels]


class ManagerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, db: Database, is_leader: Callable[[], bool] | None = None) -> None:
        self.db = db
        self.is_leader = is_leader
        self.registry = CollectorRegistry()
        self.requests = Counter("azfs_manager_requests", "API requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("azfs_manager_request_seconds", "API request latency",
                                 ["method", "route"], buckets=BUCKETS, registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    async def render(self) -> bytes:
        vfolders, kernels = await self.db.read(_counts)
        records = CollectorRegistry()
        records.register(_Records(vfolders, kernels,
                                  self.is_leader() if self.is_leader else None))
        return generate_latest(self.registry) + generate_latest(records)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by its route template and status.

    (Pure ASGI rather than ``BaseHTTPMiddleware``: no extra task and streams per
    request.)  The router writes the matched route into the shared ``scope``.
    """

    def __init__(self, app: Callable[..., Awaitable[Any]], metrics: ManagerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - start)


class _Records:
    def __init__(self, vfolders: list[tuple[str, int]], kernels: list[tuple[str, int]],
                 leader: bool | None = None) -> None:
        self.vfolders = vfolders
        self.kernels = kernels
        self.leader = leader

    def collect(self):
        vf = GaugeMetricFamily("azfs_manager_vfolders", "vfolders by lifecycle state",
                               labels=["status"])
        for status, count in self.vfolders:
            vf.add_metric([status], count)
        yield vf
        kernels = GaugeMetricFamily("azfs_manager_kernels", "kernels by state",
                                    labels=["status"])
        for status, count in self.kernels:
            kernels.add_metric([status], count)
        yield kernels
        if self.leader is not None:
            yield GaugeMetricFamily("azfs_manager_leader",
                                    "1 on the manager that runs the cluster's background work",
                                    value=1 if self.leader else 0)
