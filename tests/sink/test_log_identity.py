"""The sink knows its log by the topic's id (docs/log.md): a recreated topic
(Apache Kafka) or a restarted, empty broker (tansu) stops it before it
writes anything of the other log, even one holding more records than its
positions; `on_log_reset="start-over"` reads the new log from its start,
with the old log's archive kept aside."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from usertrail.sink.consumer import Sink, SinkOptions

from tests.conftest import Broker, create_topics, read_all, unique
from tests.workers import cli, count_rows, make_events, produce, resolve_resends
from usertrail.apache_kafka import KafkaCluster
from usertrail.embedded import EmbeddedBroker
from usertrail.errors import LogResetError
from usertrail.settings import Settings


async def _wipe(broker: Broker, settings: Settings, own: EmbeddedBroker | None) -> None:
    """The log goes: Kafka's topics deleted and created again, or tansu
    restarted (memory only) with its topics created again."""
    if isinstance(broker, KafkaCluster):
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        await admin.start()
        try:
            gone = {settings.events_topic, settings.profiles_topic}
            await admin.delete_topics(sorted(gone))
            for _ in range(150):  # deletion is asynchronous on Kafka
                if not gone & set(await admin.list_topics()):
                    break
                await asyncio.sleep(0.2)
        finally:
            await admin.close()
        await create_topics(settings)
    else:
        assert own is not None
        own.stop()
        own.start()
        await create_topics(settings)


async def _sink_until(settings: Settings, url: str, rows: int, **options: object) -> None:
    sink = Sink(settings, SinkOptions(group=options.pop("group"), **options))  # type: ignore[arg-type]
    task = asyncio.create_task(sink.run())
    try:
        for _ in range(300):
            if count_rows(url) >= rows or task.done():
                break
            await asyncio.sleep(0.2)
    finally:
        sink.stop()
        await asyncio.wait_for(task, 60)


async def test_a_recreated_log_stops_the_sink_and_start_over_reads_it(
    broker: Broker,
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    database_url: str,
) -> None:
    own = broker_factory() if isinstance(broker, EmbeddedBroker) else None
    settings = settings_factory(own or broker, database_url=database_url)
    group = unique("sink")
    await create_topics(settings)
    calls = resolve_resends(make_events(2000, resend_every=10**9, seed=5))
    old = await produce(settings, calls[:500], rate=1e9)
    await _sink_until(settings, database_url, len(old), group=group)
    assert count_rows(database_url) == len(old)

    await _wipe(broker, settings, own)
    new = await produce(settings, calls[500:], rate=1e9)  # more than the positions
    sink = Sink(settings, SinkOptions(group=group))
    with pytest.raises(LogResetError, match=settings.events_topic):
        await asyncio.wait_for(sink.run(), 60)
    assert count_rows(database_url) == len(old), "nothing of the other log was written"

    await _sink_until(
        settings, database_url, len(old) + len(new), group=group, on_log_reset="start-over"
    )
    assert count_rows(database_url) == len(old) + len(new)
    if settings.archiving:  # tansu: the new log archived, the old one kept aside
        with psycopg.connect(database_url) as conn:
            archived = dict(
                conn.execute(
                    "SELECT topic LIKE %s, sum(records) FROM usertrail_archive "
                    "WHERE topic LIKE %s GROUP BY 1",
                    (f"{settings.events_topic}@superseded-%", f"{settings.events_topic}%"),
                ).fetchall()
            )
        assert archived == {False: len(new), True: len(old)}


async def test_a_position_beyond_the_end_is_asked_again_before_it_stops_the_sink(
    settings_factory: Callable[..., Settings], broker: Broker, database_url: str
) -> None:
    """The same log (same topic id) with an end below a stored position: on
    Apache Kafka, what a partition's new leader answers until its followers
    catch up. For the grace the sink asks again and writes nothing; past it,
    the log counts as another one (exit code 3). tansu (one node, no
    failover) gets no grace."""
    settings = settings_factory(broker, database_url=database_url)
    await create_topics(settings)
    sent = await produce(settings, resolve_resends(make_events(40, seed=6)), rate=10_000)
    group = unique("sink")
    await _sink_until(settings, database_url, len(sent), group=group)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE usertrail_positions SET next_offset = next_offset + 50 "
            "WHERE consumer = %s AND topic = %s AND next_offset > 0",
            (group, settings.events_topic),
        )
    sink = Sink(settings, SinkOptions(group=group, beyond_grace=6))
    task = asyncio.create_task(sink.run())
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(LogResetError, match="lies beyond its end"):
            await asyncio.wait_for(task, 60)
        if broker.kind == "kafka":
            assert loop.time() - started >= 6, "asked again for the grace first"
        else:  # one node, no failover: nothing to wait for
            assert loop.time() - started < 6
    finally:
        if not task.done():
            sink.stop()
            await asyncio.wait_for(task, 60)
    assert count_rows(database_url) == len(sent)


async def test_log_restore_makes_the_topics_a_broker_lost_and_puts_the_log_back(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    database_url: str,
    tmp_path: Path,
) -> None:
    """tansu restarted empty (no topics at all) under an archive the sink
    wrote: `usertrail log restore` makes the topics with the configured
    partitions, as setup would, and every archived event is back at its
    offset."""
    own = broker_factory()
    settings = settings_factory(own, database_url=database_url)
    assert settings.archiving
    await create_topics(settings)
    calls = resolve_resends(make_events(300, resend_every=10**9, seed=7))
    sent = await produce(settings, calls, rate=1e9)
    await _sink_until(settings, database_url, len(sent), group=unique("sink"))
    before = await read_all(settings, settings.events_topic, expected=len(sent))
    own.stop()
    own.start()  # memory only: no topics
    done = cli(settings, tmp_path, "log", "restore", "--database-url", database_url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restored" in done.stdout
    after = await read_all(settings, settings.events_topic, expected=len(sent))
    assert sorted(after) == sorted(before)
    assert {p for p, _, _ in after} <= set(range(settings.events_partitions))
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics([settings.events_topic])
    finally:
        await admin.close()
    assert len(described[0]["partitions"]) == settings.events_partitions
