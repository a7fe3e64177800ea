"""Prometheus metrics of the node, built per scrape from the fusehost's counters.

The fusehost keeps cheap counters (:class:`azfs.fs.stats.OpStats`, usage
ledgers, blob read and cache counters); agentd turns one snapshot of them
into the text format at each scrape, so no registry state lives between
scrapes and an agent restart loses nothing the fusehost still counts.
"""

from __future__ import annotations

import errno as errno_mod
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from azfs.fs.stats import BUCKETS

if TYPE_CHECKING:
    from agentd.agent import Agent


class _Snapshot:
    def __init__(self, agent: Agent, stats: dict[str, Any] | None) -> None:
        self.agent = agent
        self.stats = stats

    def describe(self) -> list:
        return []

    def collect(self):  # noqa: C901 - one flat list of families
        agent, stats = self.agent, self.stats
        up = GaugeMetricFamily("azfs_fusehost_up", "1 if the FUSE process answers")
        up.add_metric([], 1.0 if stats is not None else 0.0)
        yield up
        kernels = GaugeMetricFamily("azfs_agent_kernels", "kernels with recorded exports")
        kernels.add_metric([], len(agent.journal.kernels))
        yield kernels
        refs = GaugeMetricFamily("azfs_agent_volume_refcount",
                                 "kernels using a mounted host volume", labels=["volume"])
        for name, count in sorted(agent.service.volume_refcounts().items()):
            refs.add_metric([name], count)
        yield refs
        restarts = CounterMetricFamily("azfs_fusehost_restarts",
                                       "fusehost restarts by this agent's watchdog")
        restarts.add_metric([], agent.fusehost_restarts)
        yield restarts
        if stats is None:
            return
        fs = stats.get("fs", {})
        hist = HistogramMetricFamily("azfs_fuse_op_duration_seconds",
                                     "FUSE operation latency", labels=["op"])
        errors = CounterMetricFamily("azfs_fuse_op_errors", "FUSE operations answered with "
                                     "an error", labels=["op", "errno"])
        for op, c in sorted(fs.get("ops", {}).items()):
            cumulative, buckets = 0, []
            for bound, n in zip(BUCKETS, c["buckets"], strict=False):
                cumulative += n
                buckets.append((repr(float(bound)), cumulative))
            buckets.append(("+Inf", c["count"]))
            hist.add_metric([op], buckets, sum_value=c["seconds"])
            for code, n in sorted(c.get("errors", {}).items()):
                name = errno_mod.errorcode.get(int(code), str(code))
                errors.add_metric([op, name], n)
        yield hist
        yield errors
        read = CounterMetricFamily("azfs_vfolder_read_bytes", "bytes read through FUSE",
                                   labels=["vfolder"])
        for label, n in sorted(fs.get("bytes_read", {}).items()):
            read.add_metric([label], n)
        yield read
        written = CounterMetricFamily("azfs_vfolder_written_bytes",
                                      "bytes written through FUSE", labels=["vfolder"])
        for label, n in sorted(fs.get("bytes_written", {}).items()):
            written.add_metric([label], n)
        yield written
        usage = GaugeMetricFamily("azfs_vfolder_usage_bytes", "bytes used by an attached "
                                  "vfolder (from its usage ledger)", labels=["vfolder"])
        files = GaugeMetricFamily("azfs_vfolder_usage_files", "files in an attached vfolder",
                                  labels=["vfolder"])
        for label, u in sorted(stats.get("usage", {}).items()):
            usage.add_metric([label], u["bytes"])
            files.add_metric([label], u["files"])
        yield usage
        yield files
        cache = stats.get("cache")
        if cache is not None:
            for key, kind, doc in (("hits", CounterMetricFamily, "block cache hits"),
                                   ("misses", CounterMetricFamily, "block cache misses"),
                                   ("evictions", CounterMetricFamily, "block cache evictions"),
                                   ("bytes", GaugeMetricFamily, "bytes in the block cache"),
                                   ("max_bytes", GaugeMetricFamily, "block cache size limit")):
                family = kind(f"azfs_blob_cache_{key}", doc)
                family.add_metric([], cache.get(key, 0))
                yield family
        yield from _volume_io(stats.get("volumes", {}))
        blob_http = CounterMetricFamily("azfs_blob_http_received_bytes",
                                        "bytes received from blob storage", labels=["dataset"])
        blob_requests = CounterMetricFamily(
            "azfs_blob_http_requests", "successful requests to blob storage by kind (data "
            "GETs, HEADs, listing pages)", labels=["dataset", "kind"])
        blob_cached = CounterMetricFamily(
            "azfs_blob_cache_served_blocks", "blocks of a dataset served by the node's block "
            "cache (no GET)", labels=["dataset"])
        for label, b in sorted(stats.get("blob", {}).items()):
            blob_http.add_metric([label], b.get("http.bytes", 0))
            for kind, key in (("get", "http.data_gets"), ("head", "http.heads"),
                              ("list", "http.lists")):
                blob_requests.add_metric([label, kind], b.get(key, 0))
            blob_cached.add_metric([label], b.get("read.cache_hits", 0))
        yield blob_http
        yield blob_requests
        yield blob_cached


def _volume_io(volumes: dict[str, Any]):
    """Per host volume: health, threads, calls in flight, timeouts and call latency."""
    state = GaugeMetricFamily("azfs_volume_healthy", "1 while the host volume answers, "
                              "0 while degraded", labels=["volume"])
    gauges = {key: GaugeMetricFamily(f"azfs_volume_{key}", doc, labels=["volume"])
              for key, doc in (("threads", "worker threads of the volume"),
                               ("in_flight", "calls queued or running"),
                               ("stuck", "calls abandoned at their deadline, still running"))}
    counters = {key: CounterMetricFamily(f"azfs_volume_{key}", doc, labels=["volume"])
                for key, doc in (("timeouts", "calls past their deadline"),
                                 ("rejected", "calls refused at once while degraded"),
                                 ("transitions", "changes between healthy and degraded"))}
    hist = HistogramMetricFamily("azfs_volume_call_duration_seconds",
                                 "time a call took in a volume's worker", labels=["volume"])
    for name, v in sorted(volumes.items()):
        state.add_metric([name], 1.0 if v.get("state") == "healthy" else 0.0)
        for key, family in (*gauges.items(), *counters.items()):
            family.add_metric([name], v.get(key, 0))
        cumulative, buckets = 0, []
        for bound, n in zip(BUCKETS, v.get("buckets", []), strict=False):
            cumulative += n
            buckets.append((repr(float(bound)), cumulative))
        buckets.append(("+Inf", sum(v.get("buckets", []))))
        hist.add_metric([name], buckets, sum_value=v.get("seconds", 0.0))
    yield state
    yield from gauges.values()
    yield from counters.values()
    yield hist


def render_metrics(agent: Agent, stats: dict[str, Any] | None) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(agent, stats))
    return generate_latest(registry), CONTENT_TYPE_LATEST
