"""Sink rows/s against a raw COPY of the same rows, in the same run.

Both write the same interactions into a freshly migrated database each round
(the full schema: the foreign key to "User" and the three indexes), with the
users already in "User". The raw COPY sends pre-built COPY text (what a team
loading the rows by hand would send); the sink reads a pre-filled topic,
validates, plans and writes as in production (in COPY's binary format,
sink/rows.py; each round also times a raw COPY in that format, and prints
the sink's ratio to it beside the target's). The sink is timed from its
first written batch to its last (the group join before it is not
throughput). Prints each round and the median ratio sink/raw (target:
>= 0.8), and where each spends CPU per row over the same window:
PostgreSQL's processes (every backend and helper of the server), the Python
process (the sink, or the COPY's client) and the broker's.

``--busy`` runs a CPU-bound process (one core, spinning) beside both for the
whole run: the sink needs its own Python and PostgreSQL where the raw COPY
needs PostgreSQL alone, so a busy host is where it loses most.

    ./dev bench sink_rate [--rows 100000] [--rounds 3] [--busy]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import brokers
import psycopg
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from usertrail.producers.events import Interaction, build, encode
from usertrail.producers.ids import uuid7
from usertrail.sink.consumer import Sink, SinkOptions
from usertrail.sink.rows import (
    BINARY_HEADER,
    BINARY_TRAILER,
    binary_row,
    interaction_copy_rows,
)

from usertrail.apache_kafka import KafkaCluster
from usertrail.embedded import EmbeddedPostgres, free_port
from usertrail.runtime import tune_gc
from usertrail.settings import Settings
from usertrail.topics import ensure_topics

USERS = 5000


def make_events(n: int) -> list[Interaction]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        event = build(
            "interaction",
            event_id=uuid7(),
            user_id=f"user-{i % USERS}",
            occurred_at=t0 + timedelta(milliseconds=i),
            source="bench",
            type="reading",
            service=("saju", "tarot", "astrology")[i % 3],
            theme=("love", "career", None)[i % 3],
            rating=1 + i % 5,
            metadata={"duration": i % 600},
        )
        assert isinstance(event, Interaction)
        out.append(event)
    return out


def sink_settings(bootstrap: str, tmp: Path) -> Settings:
    """The settings a sink reads ``bench.events`` (8 partitions) with."""
    return Settings(
        kafka_bootstrap_servers=bootstrap,
        events_topic="bench.events",
        events_partitions=8,
        data_dir=tmp,
        group_session_timeout_ms=2000,
        group_heartbeat_interval_ms=200,
    )


async def filled_topic(bootstrap: str, tmp: Path, events: list[Interaction]) -> Settings:
    """``bench.events`` (8 partitions, and the profiles topic made with it)
    holding ``events``; the settings a sink reads it with."""
    base = sink_settings(bootstrap, tmp)
    await ensure_topics(base)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    for e in events:
        await producer.send("bench.events", encode(e), key=e.user_id.encode())
    await producer.stop()
    return base


def fresh_database(pg: EmbeddedPostgres, name: str, users: Sequence[str] | None = None) -> str:
    """A freshly migrated database ``name`` with ``users`` in "User" (by
    default make_events' users); its URL."""
    admin = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    url = brokers.migrated_database(pg, name)
    with psycopg.connect(url) as conn:
        if users is None:
            conn.execute(
                "INSERT INTO \"User\" (id) SELECT 'user-' || g FROM generate_series(0, %s) g",
                (USERS - 1,),
            )
        else:
            conn.execute('INSERT INTO "User" (id) SELECT unnest(%s::text[])', (list(users),))
    # Each measured phase starts from a clean checkpoint: otherwise the one
    # after it pays for writing out the pages the one before it dirtied
    # (the sink always runs right after the raw COPY).
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    return url


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int | None) -> float:
    """CPU seconds (user + system) of process ``root`` and its children."""
    if root is None:
        return 0.0
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(entry.name) == root or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


@dataclass
class Cpu:
    """Where a phase spent CPU: seconds so far, then per row."""

    pg: float = 0.0
    python: float = 0.0
    broker: float = 0.0

    @classmethod
    def now(cls, pg: int | None, broker: int | None) -> Cpu:
        return cls(tree_cpu(pg), time.process_time(), tree_cpu(broker))

    def per_row_since(self, before: Cpu, rows: int) -> Cpu:
        us = 1e6 / rows
        return Cpu(
            (self.pg - before.pg) * us,
            (self.python - before.python) * us,
            (self.broker - before.broker) * us,
        )

    def __str__(self) -> str:
        return (
            f"PostgreSQL {self.pg:.1f} + Python {self.python:.1f} + broker {self.broker:.1f} us/row"
        )


def raw_copy(
    url: str,
    data: bytes,
    rows: int,
    pids: tuple[int | None, int | None] = (None, None),
    binary: bool = False,
) -> tuple[float, Cpu]:
    """``data`` (COPY text, or the binary format's whole stream if
    ``binary``) COPYed into "UserInteraction": rows/s and CPU per row."""
    with psycopg.connect(url) as conn:
        before = Cpu.now(*pids)
        started = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy(
                'COPY "UserInteraction" (id, "userId", "createdAt", type, service, theme, rating, '
                f"metadata) FROM STDIN{' (FORMAT binary)' if binary else ''}"
            ) as copy,
        ):
            copy.write(data)
        conn.commit()
        rate = rows / (time.perf_counter() - started)
        return rate, Cpu.now(*pids).per_row_since(before, rows)


async def sink_round(
    settings: Settings,
    rows: int,
    batch: int,
    archive: bool,
    count: str = "records",
    writers: int = SinkOptions().writers,
    pids: tuple[int | None, int | None] = (None, None),
) -> tuple[float, Cpu]:
    """The sink's ``count`` (a WriteResult field: records read, or
    ``interactions`` written) per second, from its first written batch to
    the one that brings it to ``rows``, and its CPU per row meanwhile."""
    options = SinkOptions(
        group=f"bench-{uuid7()}", batch_max_records=batch, archive=archive, writers=writers
    )
    sink = Sink(settings, options)
    task = asyncio.create_task(sink.run())
    first_at = first_count = first_cpu = None
    while (written := getattr(sink.written, count)) < rows:
        if task.done():
            task.result()
        if first_at is None and written:
            first_at, first_count, first_cpu = time.perf_counter(), written, Cpu.now(*pids)
        await asyncio.sleep(0.002)
    ended, cpu = time.perf_counter(), Cpu.now(*pids)
    sink.stop()
    await task
    assert first_at is not None and first_count is not None and first_cpu is not None
    measured = rows - first_count
    return measured / (ended - first_at), cpu.per_row_since(first_cpu, measured)


def spin() -> None:
    """A CPU-bound process: what else runs on a busy host."""
    while True:
        pass


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--batch",
        type=int,
        default=SinkOptions().batch_max_records,
        help="sink records per fetched batch (default: the sink's)",
    )
    parser.add_argument(
        "--writers", type=int, default=SinkOptions().writers, help="the sink's writers"
    )
    parser.add_argument(
        "--busy", action="store_true", help="a CPU-bound process runs beside the benchmark"
    )
    brokers.add_argument(parser)
    args = parser.parse_args()
    busy = multiprocessing.get_context("spawn").Process(target=spin, daemon=True)
    if args.busy:
        busy.start()
        print(f"a CPU-bound process (pid {busy.pid}) runs beside the benchmark")
    try:
        await measure(args)
    finally:
        if args.busy:
            busy.kill()
            busy.join()


async def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, brokers.started(args.broker, Path(tmp)) as broker:
        pg = EmbeddedPostgres(data_dir=Path(tmp) / "pg", port=free_port(), database="bench")
        pg.start()
        try:
            events = make_events(args.rows)
            data = interaction_copy_rows(events)
            binary = b"".join((BINARY_HEADER, *map(binary_row, events), BINARY_TRAILER))
            base = await filled_topic(broker.bootstrap_servers, Path(tmp), events)
            # The sink's process holds no producer's events: neither does
            # this one while it measures (a full garbage collection would
            # otherwise walk every event built above). Then the process is
            # set up as `usertrail sink` sets up its own.
            del events
            tune_gc()

            pids = (pg.pid, broker.pids[0] if isinstance(broker, KafkaCluster) else broker.pid)
            ratios, binary_ratios, costs = [], [], []
            # the sink as `up` runs it on the broker asked for (the log
            # archived on tansu, docs/log.md), and the cost of the archive:
            # the same sink with it and without it
            archived = base.archiving
            for r in range(args.rounds):
                raw, raw_cpu = raw_copy(fresh_database(pg, "bench_raw"), data, args.rows, pids)
                raw_binary, _ = raw_copy(
                    fresh_database(pg, "bench_raw"), binary, args.rows, pids, binary=True
                )
                rates, cpus = {}, {}
                for archive in (archived, not archived):
                    url = fresh_database(pg, "bench_sink")
                    settings = base.model_copy(update={"database_url": SecretStr(url)})
                    rates[archive], cpus[archive] = await sink_round(
                        settings, args.rows, args.batch, archive, pids=pids, writers=args.writers
                    )
                    with psycopg.connect(url) as conn:
                        count = conn.execute('SELECT count(*) FROM "UserInteraction"').fetchone()
                    assert count is not None and count[0] == args.rows, count
                sink = rates[archived]
                ratios.append(sink / raw)
                binary_ratios.append(sink / raw_binary)
                costs.append(rates[True] / rates[False])
                print(
                    f"round {r + 1}: raw COPY {raw:,.0f} rows/s   sink {sink:,.0f} rows/s "
                    f"(archive {'on' if archived else 'off'})   ratio {sink / raw:.2f}   "
                    f"archive on/off {rates[True] / rates[False]:.2f}\n"
                    f"  raw COPY in the binary format the sink sends {raw_binary:,.0f} rows/s, "
                    f"ratio {sink / raw_binary:.2f}\n"
                    f"  CPU: raw COPY {raw_cpu}; sink {cpus[archived]}"
                )
            print(f"median ratio sink/raw COPY: {statistics.median(ratios):.2f} (target >= 0.8)")
            print(
                "median ratio sink/raw binary COPY (the sink's own format): "
                f"{statistics.median(binary_ratios):.2f}"
            )
            print(f"median ratio sink with the archive / without: {statistics.median(costs):.2f}")
        finally:
            pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
