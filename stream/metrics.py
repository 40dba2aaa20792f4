"""Prometheus metrics of a stream worker (``GET /metrics`` on its web port,
stream/web.py). Counters and histograms are kept as batches are folded;
lag and store size are read when Prometheus scrapes (``refresh``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "usertrail_stream_records_read",
            "Records of the events topic read (rate(): records per second)",
            registry=r,
        )
        self.profiles = Counter(
            "usertrail_stream_profiles_published",
            "Profiles (and tombstones) published to the profiles topic",
            registry=r,
        )
        self.forwarded = Counter(
            "usertrail_stream_records_copied_home",
            "Records a producer put away from their user's home partition, copied there",
            registry=r,
        )
        self.left_out = Counter(
            "usertrail_stream_records_left_out",
            "Records the fold helper died on twice, left out of the profile (the sink "
            "dead-letters what is not an event; these are the stream's dead letters)",
            registry=r,
        )
        self.batch_seconds = Histogram(
            "usertrail_stream_batch_seconds",
            "Time to fold one batch and hand its writes to the broker",
            buckets=_SECONDS,
            registry=r,
        )
        self.fold_seconds = Histogram(
            "usertrail_stream_fold_seconds",
            "Time to decode and fold one batch (in the helper process by default)",
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_records = Histogram(
            "usertrail_stream_batch_records",
            "Records per batch",
            buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.lag = Gauge(
            "usertrail_stream_lag",
            "Records of an assigned events partition not yet folded (high-water mark "
            "minus the applied offset)",
            ["topic", "partition"],
            registry=r,
        )
        self.store_bytes = Gauge(
            "usertrail_stream_store_bytes",
            "Bytes of the worker's local table store on disk (0: the table is in memory)",
            registry=r,
        )
        self.store_keys = Gauge(
            "usertrail_stream_store_keys",
            "Keys in the worker's table when it is in memory (users, their chunks of "
            "event ids, applied offsets); -1 on disk (see the store's bytes)",
            registry=r,
        )
        self.recovered = Gauge(
            "usertrail_stream_changelog_records_recovered",
            "Changelog records the table's recovery read since the worker started",
            registry=r,
        )

    def refresh(
        self,
        lags: Iterable[tuple[str, int, int]],
        store_dir: Path | None,
        keys: Callable[[], int] | None,
        recovered: int | None,
    ) -> None:
        """What a scrape reads now: ``lags`` as (topic, partition, lag) of
        the partitions assigned (the others are dropped)."""
        self.lag.clear()
        for topic, partition, lag in lags:
            self.lag.labels(topic, str(partition)).set(lag)
        self.store_bytes.set(0 if store_dir is None else _size(store_dir))
        self.store_keys.set(-1 if keys is None else keys())
        if recovered is not None:
            self.recovered.set(recovered)


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # compacted away meanwhile
                pass
    return total
