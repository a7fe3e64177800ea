"""Cheap per-operation counters of the FUSE layer, exported by the agent as metrics."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

# latency histogram bucket bounds in seconds (Prometheus style, cumulative on export),
# the same for FUSE operations and for the calls of a volume's workers
from azfs.volumes.io import BUCKETS


@dataclass(slots=True)
class OpCounter:
    count: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    errors: dict[int, int] = field(default_factory=lambda: defaultdict(int))


class OpStats:
    """Counts, latency histograms and errno counts per FUSE operation."""

    def __init__(self) -> None:
        self.ops: dict[str, OpCounter] = defaultdict(OpCounter)
        #: per view (vfolder) bytes moved
        self.bytes_read: dict[str, int] = defaultdict(int)
        self.bytes_written: dict[str, int] = defaultdict(int)

    def observe(self, op: str, seconds: float) -> None:
        c = self.ops[op]
        c.count += 1
        c.seconds += seconds
        c.buckets[bisect_left(BUCKETS, seconds)] += 1

    def error(self, op: str, code: int) -> None:
        self.ops[op].errors[code] += 1

    def snapshot(self) -> dict:
        return {
            "ops": {name: {"count": c.count, "seconds": c.seconds, "buckets": list(c.buckets),
                           "errors": dict(c.errors)} for name, c in self.ops.items()},
            "bytes_read": dict(self.bytes_read),
            "bytes_written": dict(self.bytes_written),
        }
