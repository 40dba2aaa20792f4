"""``replay db`` and ``verify --only database`` on the real broker and
database: the rebuilt tables equal the live ones, the swap keeps the
product's schema exactly, and a hand-made difference is named."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from usertrail.producers import TrackingClient, demo
from usertrail.replay import stream as replay
from usertrail.replay.db import COMPARED, _ends
from usertrail.sink.consumer import GROUP
from usertrail.stream.segments import load_rules

from tests.conftest import create_topics, read_all
from tests.sink.conftest import make_database, query, run_sink_until
from usertrail import liveness
from usertrail.cli import main
from usertrail.embedded import EmbeddedBroker, EmbeddedPostgres
from usertrail.settings import Settings


def tables(url: str) -> dict[str, set[tuple[Any, ...]]]:
    out = {}
    for table, (key, columns) in COMPARED.items():
        cols = ", ".join(f'"{c}"::text' for c in (key, *columns))
        out[table] = set(query(url, f'SELECT {cols} FROM "{table}"'))
    return out


def positions(url: str) -> dict[tuple[str, int], int]:
    rows = query(
        url,
        "SELECT topic, partition, next_offset FROM usertrail_positions WHERE consumer = %s",
        (GROUP,),
    )
    return {(t, p): o for t, p, o in rows}


async def cli(settings: Settings, *args: str) -> int:
    return await asyncio.to_thread(
        main, [*args, "--database-url", settings.database_dsn(), "--log-level", "WARNING"]
    )


async def test_replay_db_swaps_in_tables_equal_to_the_live_ones(
    settings_factory: Callable[..., Settings],
    broker: EmbeddedBroker,
    postgres: EmbeddedPostgres,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = make_database(postgres)
    settings = settings_factory(broker, database_url=SecretStr(url), data_dir=tmp_path)
    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "USERTRAIL_EVENTS_TOPIC": settings.events_topic,
        "USERTRAIL_PROFILES_TOPIC": settings.profiles_topic,
        "USERTRAIL_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "USERTRAIL_EVENTS_PARTITIONS": str(settings.events_partitions),
        "USERTRAIL_STREAM_APP_ID": settings.stream_app_id,
        "USERTRAIL_DATA_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    await create_topics(settings)
    async with TrackingClient(source="demo", settings=settings) as client:
        await demo.run(client, demo.plan(users=40, events=2000, seed=3))
        await client.erase_user(user_id="demo-00007")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:  # a poison message: a dead letter, once
        await producer.send_and_wait(settings.events_topic, b"not json", key=b"demo-00001")
    finally:
        await producer.stop()
    rules = load_rules()
    await replay.publish(settings, rules, await replay.rebuild(settings, rules))  # profiles
    ends = await _ends(settings)
    await run_sink_until(
        settings, lambda: all(positions(url).get(k, 0) >= e for k, e in ends.items())
    )
    assert positions(url) == {k: e for k, e in ends.items() if e}
    live = tables(url)
    assert len(live["UserInteraction"]) > 1500 and len(live["user_vectors"]) == 39

    assert await cli(settings, "verify", "--only", "database") == 0
    assert "UserInteraction: " in capsys.readouterr().out

    victim = sorted(live["UserInteraction"])[0][0]
    query(url, 'DELETE FROM "UserInteraction" WHERE id = %s RETURNING id', (victim,))
    query(
        url,
        "UPDATE user_vectors SET \"primarySegment\" = 'x' WHERE \"userId\" = 'demo-00001' "
        "RETURNING 1",
    )
    assert await cli(settings, "verify", "--only", "database") == 1
    out = capsys.readouterr().out
    assert f"{victim}: missing from the live table" in out
    assert "demo-00001: differs" in out
    # the rollups followed the hand-made changes: they still equal the rows
    assert await cli(settings, "verify", "--only", "analytics") == 0
    assert "0 differ" in capsys.readouterr().out

    # a sink of the group is running: refused, nothing touched
    lock = liveness.hold_worker_lock(settings, GROUP)
    assert await cli(settings, "replay", "db") == 2
    assert "stop them" in capsys.readouterr().err
    lock.close()

    assert await cli(settings, "replay", "db") == 0
    assert tables(url) == live
    # the dead letter found again is not a second one, in the table or on the topic
    assert query(url, "SELECT count(*) FROM usertrail_dead_letters") == [(1,)]
    assert len(await read_all(settings, settings.dead_letter_topic, 2, timeout=3)) == 1
    assert positions(url) == {k: e for k, e in ends.items() if e}
    assert await cli(settings, "db", "check") == 0
    assert await cli(settings, "verify", "--only", "database") == 0
    schemas = query(url, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'usertrail_%'")
    assert schemas == []
    # the swapped-in tables came with their rollups, and their triggers keep them
    assert await cli(settings, "verify", "--only", "analytics") == 0
    count = "SELECT sum(interactions) FROM usertrail_rollup_services WHERE service = %s"
    service = query(url, "SELECT service FROM usertrail_rollup_services LIMIT 1")[0][0]
    n = query(url, count, (service,))[0][0]
    query(
        url,
        'INSERT INTO "UserInteraction" (id, "userId", type, service) '
        "VALUES ('extra', 'demo-00001', 'chat', %s) RETURNING id",
        (service,),
    )
    assert query(url, count, (service,)) == [(n + 1,)]
    assert await cli(settings, "verify", "--only", "analytics") == 0
    query(url, "DELETE FROM \"UserInteraction\" WHERE id = 'extra' RETURNING id")
    assert query(url, count, (service,)) == [(n,)]
    capsys.readouterr()

    # rows the log does not hold (a reset log would lose them all): verify
    # counts them all, replay db refuses to drop them, --allow-shrink drops them
    extra = [f"not-in-the-log-{i}" for i in range(3)]
    for row in extra:
        query(
            url,
            'INSERT INTO "UserInteraction" (id, "userId", type, service) '
            "VALUES (%s, 'demo-00001', 'chat', 'saju') RETURNING 1",
            (row,),
        )
    assert await cli(settings, "verify", "--only", "database", "--limit", "1") == 1
    out = capsys.readouterr().out
    assert f"{len(live['UserInteraction']) + 3:,} live" in out and "3 differ" in out
    assert f"{extra[0]}: live only" in out and "... and 2 more live only" in out
    assert await cli(settings, "replay", "db") == 2
    refused = capsys.readouterr().err
    assert "refusing to swap in" in refused and extra[0] in refused, refused
    assert len(tables(url)["UserInteraction"]) == len(live["UserInteraction"]) + 3
    assert await cli(settings, "replay", "db", "--allow-shrink") == 0
    assert tables(url) == live

    # --in-place: only into empty tables
    assert await cli(settings, "replay", "db", "--in-place") == 2
    assert "needs empty tables" in capsys.readouterr().err
    empty = make_database(postgres)
    fresh = settings.model_copy(update={"database_url": SecretStr(empty)})
    assert await cli(fresh, "replay", "db", "--in-place") == 0
    assert tables(empty) == live
    assert positions(empty) == positions(url)
