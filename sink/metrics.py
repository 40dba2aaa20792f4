"""Prometheus metrics of the sink (served by ``usertrail sink --web-port``, sink/web.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rows = Counter(
            "usertrail_sink_rows_written",
            "Rows written, per table",
            ["table"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "usertrail_sink_batch_records",
            "Records per batch",
            buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "usertrail_sink_batch_seconds",
            "Time to write one batch (one transaction)",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "usertrail_sink_dead_letters",
            "Dead letters, per reason",
            ["reason"],
            registry=self.registry,
        )
        self.lag = Gauge(
            "usertrail_sink_lag",
            "Records behind the high-water mark",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.retries = Counter(
            "usertrail_sink_retries",
            "Batches retried after an outage",
            ["cause"],
            registry=self.registry,
        )
