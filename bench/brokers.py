"""The broker a benchmark runs on: ``--broker tansu`` (the embedded default)
or ``--broker kafka`` (one Apache Kafka node from Maven Central, KRaft)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaConsumer
from usertrail.migrations import runner

from usertrail.apache_kafka import KafkaCluster, free_cluster_port
from usertrail.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from usertrail.settings import Settings
from usertrail.topics import TopicSpec, ensure_topics

Broker = EmbeddedBroker | KafkaCluster


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        choices=["tansu", "kafka"],
        default="tansu",
        help="tansu (embedded, memory only; default) or kafka (one Apache Kafka node)",
    )


def reader(bootstrap: str, topic: str, **options: int) -> AIOKafkaConsumer:
    """A consumer of ``topic`` from its start, in no group, with 4 MiB
    fetches per partition (``options`` override); not started yet."""
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        **{"max_partition_fetch_bytes": 4 * 1024 * 1024, **options},
    )


@contextlib.contextmanager
def started(kind: str, folder: Path) -> Iterator[Broker]:
    """A broker of ``kind`` on free ports, its files in ``folder``; stopped
    (SIGKILL: nothing in it is kept) on leaving."""
    broker: Broker
    if kind == "kafka":
        port = free_cluster_port(1)
        # sessions from 1 s, so that benchmarks may use tansu's short ones
        broker = KafkaCluster(
            data_dir=folder / "kafka",
            port=port,
            extra_config={"group.min.session.timeout.ms": "1000"},
        )
    else:
        broker = EmbeddedBroker(port=free_port(), log_path=folder / "tansu.log")
    broker.start()
    try:
        print(f"broker: {kind} on {broker.bootstrap_servers}", flush=True)
        yield broker
    finally:
        if isinstance(broker, KafkaCluster):
            broker.kill()
        else:
            broker.stop()


async def events_and_profiles(
    broker: Broker, folder: Path, topic: str, partitions: int
) -> Settings:
    """Settings for ``topic`` and ``bench.profiles`` on ``broker``, both
    created with ``partitions`` partitions."""
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        events_topic=topic,
        profiles_topic="bench.profiles",
        events_partitions=partitions,
        data_dir=folder,
    )
    await ensure_topics(
        settings, [TopicSpec(topic, partitions), TopicSpec("bench.profiles", partitions)]
    )
    return settings


def migrated_database(pg: EmbeddedPostgres, name: str) -> str:
    """A new database ``name`` on ``pg`` (dropped first if it exists), migrated
    to the newest schema; its URL."""
    admin = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"
    engine = runner.make_engine(Settings(database_url=url))
    runner.upgrade(engine)
    engine.dispose()
    return url
