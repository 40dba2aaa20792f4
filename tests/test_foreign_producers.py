"""Events from another client: librdkafka (confluent-kafka) with its default
partitioner (CRC32, not murmur2) and the codecs our SDK does not use (zstd,
snappy, gzip), each event written as JSON by hand from the
exported JSON Schema, not by our SDK. Rows, profiles and ``verify`` (with its
cross-check of every profile against SQL over the rows) agree (#19)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from usertrail.producers.client import TrackingClient
from usertrail.producers.events import decode
from usertrail.producers.ids import uuid7
from usertrail.sink.consumer import Sink, SinkOptions

from tests.conftest import Broker, create_topics, unique
from tests.sink.conftest import query
from tests.workers import (
    changelog_states,
    cli,
    count_rows,
    sink_at_the_end,
    sink_process,
    stream_process,
    wait_for_profile,
)
from usertrail.embedded import free_port
from usertrail.settings import Settings
from usertrail.topics import TopicSpec, ensure_topics

BASE = datetime(2026, 3, 1, tzinfo=UTC)
# the offsets apps write their local times with
ZONES = [timezone(timedelta(hours=h, minutes=m)) for h, m in ((9, 0), (-5, 0), (5, 45), (0, 0))]


def _at(minutes: int, zone: int) -> str:
    """BASE + minutes, written in ZONES[zone] (RFC 3339, with its offset)."""
    return (BASE + timedelta(minutes=minutes)).astimezone(ZONES[zone % len(ZONES)]).isoformat()


def _event(kind: str, user: str, at: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "schemaVersion": 1,
        "eventId": uuid7(),
        "userId": user,
        "occurredAt": at,
        "source": "rdkafka-app",
        **fields,
    }


def plan(users: list[str], seed: int = 19) -> list[dict[str, Any]]:
    """Per user, 30 interactions in shuffled order (log order is not event
    time order), written in four time zones; and three preference changes
    whose wall times, read without their offsets, order them wrongly."""
    rng = random.Random(seed)
    docs = []
    for user in users:
        mine = [
            _event(
                "interaction",
                user,
                _at(i * 7, rng.randrange(4)),
                type=("reading", "chat", "feedback", "share", "reading")[i % 5],
                service=("saju", "tarot", "astrology")[i % 3],
                theme=("love", "career", "health", None)[i % 4],
                rating=(5, 4, None, 3, 4, 1)[i % 6],
            )
            for i in range(30)
        ]
        rng.shuffle(mine)
        docs += [{k: v for k, v in d.items() if v is not None} for d in mine]
        docs += [
            # 01:40 UTC, written 10:40+09:00
            _event("preferences.updated", user, _at(100, 0), readingLength="long"),
            # 01:50 UTC, written as such: newer, although its wall time is earlier
            _event(
                "preferences.updated",
                user,
                _at(110, 3),
                readingLength="short",
                tonePreference="formal",
            ),
            # 00:50 UTC, written 19:50-05:00 the day before: older, sent last
            _event("preferences.updated", user, _at(50, 1), preferredLanguage="ko"),
        ]
    return docs


def edge_cases(user: str) -> tuple[list[dict[str, Any]], int]:
    """Events other producers wrote that the old contract let through or
    refused wrongly; (events, how many of them are dead letters)."""
    ok = {"type": "reading", "service": "tarot", "theme": "love"}
    dead = [
        _event("interaction", user, "9999-12-31T00:00:00Z", **ok),  # far past the record
        _event("interaction", user, "1970-01-01T00:00:00Z", **ok),
        _event("interaction", user, _at(1, 0), metadata={"x": float("nan")}, **ok),
        _event("interaction", user, _at(2, 0), metadata={"x": "a\u0000b"}, **ok),
        _event("interaction", user, _at(3, 0), metadata={"x": float("inf")}, **ok),
        _event("interaction", user, "2026-03-01T10:00:00+09", **ok),  # not RFC 3339
    ]
    accepted = [
        _event("interaction", user, _at(4, 0), rating=4.0, **ok),  # JSON Schema's integer
        _event("interaction", user, _at(5, 2), rating=5, **ok),
    ]
    return dead + accepted, len(dead)


def produce(
    bootstrap: str,
    topic: str,
    docs: list[dict[str, Any]],
    partitioner: str = "consistent_random",
    compression: str = "none",
) -> dict[str, int]:
    """Send with librdkafka's defaults (its partitioner: CRC32 of the key,
    unless another is named; no compression unless a codec is named: our SDK
    sends lz4, other clients gzip, snappy or zstd); the last offset of each
    user."""
    last: dict[str, int] = {}
    failed: list[str] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failed.append(str(err))
            return
        user = (msg.key() or b"").decode()
        last[user] = max(last.get(user, -1), msg.offset() or 0)

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "partitioner": partitioner,
            "compression.type": compression,
        }
    )
    for doc in docs:
        producer.produce(topic, json.dumps(doc), key=doc["userId"], on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not failed, failed
    return last


async def test_events_written_by_librdkafka_in_any_time_zone_agree_everywhere(
    settings_factory: Callable[..., Settings], broker: Broker, database_url: str, tmp_path: Path
) -> None:
    settings = settings_factory(broker, database_url=database_url, stream_app_id=unique("rdk"))
    await create_topics(settings)
    # ids a URL must percent-encode are profiles too (GET /profiles/{id})
    users = [f"rdk-{i}" for i in range(6)] + ["rdk-{6}/100%", "rdk 7?#é"]
    docs = plan(users)
    odd, refused = edge_cases("rdk-edges")
    docs += odd
    await asyncio.to_thread(
        produce, settings.bootstrap_servers, settings.events_topic, docs, compression="zstd"
    )
    interactions = sum(1 for d in docs if d["kind"] == "interaction") - refused

    web_port = free_port()
    stream = stream_process(settings, web_port, tmp_path / "stream.log")
    sink = Sink(settings, SinkOptions(group=unique("sink")))
    sinking = asyncio.create_task(sink.run())
    try:
        for user in [*users, "rdk-edges"]:
            # CRC32 put most users away from their murmur2 home: their events
            # are folded (and written) as the stream's copies there
            want = 2 if user == "rdk-edges" else 30
            profile = await wait_for_profile(web_port, user, interactions=want)
            assert profile["userId"] == user
        vectors = "SELECT count(*) FROM user_vectors WHERE segments IS NOT NULL"
        for _ in range(300):
            if count_rows(database_url) >= interactions:
                if query(database_url, vectors)[0][0] == len(users) + 1:
                    break
            await asyncio.sleep(0.2)
        assert count_rows(database_url) == interactions
        assert query(database_url, vectors)[0][0] == len(users) + 1
    finally:
        sink.stop()
        await asyncio.wait_for(sinking, 60)
        stream.send_signal(signal.SIGTERM)
        stream.wait(timeout=60)

    # each refused event is a dead letter that names its user; the rest count
    letters = query(database_url, "SELECT user_id, reason FROM usertrail_dead_letters")
    assert letters == [("rdk-edges", "invalid")] * refused, letters
    assert query(
        database_url,
        'SELECT rating FROM "UserInteraction" WHERE "userId" = %s ORDER BY 1',
        ("rdk-edges",),
    ) == [(4,), (5,)]
    # every time column holds the UTC instant, whatever offset it was written with
    rows = query(
        database_url,
        'SELECT "readingLength", "tonePreference", "preferredLanguage", "updatedAt" '
        'FROM "UserPreferences" ORDER BY "userId"',
    )  # (rdk-edges has no preferences)
    updated = datetime(2026, 3, 1, 1, 50, tzinfo=UTC).replace(tzinfo=None)
    assert rows == [("short", "formal", "en", updated)] * len(users)
    first = next(d for d in docs if d["kind"] == "interaction")
    (created,) = query(
        database_url, 'SELECT "createdAt" FROM "UserInteraction" WHERE id = %s', (first["eventId"],)
    )
    instant = datetime.fromisoformat(first["occurredAt"]).astimezone(UTC)
    assert created[0] == instant.replace(tzinfo=None)

    checked = cli(settings, tmp_path, "verify", "--database-url", database_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"rows: {len(users) + 1} profiles against SQL over the rows, 0 users differ" in (
        checked.stdout
    )


async def test_one_users_events_on_several_partitions_are_folded_once_in_one_order(
    settings_factory: Callable[..., Settings], broker: Broker, database_url: str, tmp_path: Path
) -> None:
    """Three producers for the same users: our SDK (murmur2), librdkafka's
    default (CRC32) and librdkafka at random, each resending some events of
    the others. Every event is folded once, at its user's home partition
    (the stream copies the others there), live and replayed alike; a
    stopped stream's uncopied records are copied by ``replay stream``
    (#19, item 2)."""
    settings = settings_factory(broker, database_url=database_url, stream_app_id=unique("mix"))
    await create_topics(settings)
    users = [f"mix-{i}" for i in range(8)]
    rng = random.Random(2)
    docs = plan(users, seed=3)
    docs.append(_event("user.erased", users[0], _at(60, 2)))  # mid-way, by event time
    docs.append(_event("onboarding.completed", users[1], _at(5, 1), interests=["love"]))
    rng.shuffle(docs)
    # each producer sends a third, and resends a few of another third
    thirds: list[list[dict[str, Any]]] = [docs[0::3], docs[1::3], docs[2::3]]
    for i, third in enumerate(thirds):
        third += rng.sample(thirds[(i + 1) % 3], 5)
    ids = {d["eventId"] for d in docs}

    async def send_all(extra: list[dict[str, Any]] | None = None) -> None:
        sdk, crc, scatter = (extra, extra, extra) if extra is not None else thirds
        async with TrackingClient(source="mix", settings=settings) as client:
            for d in sdk if extra is None else []:
                await client.send(decode(json.dumps(d).encode()))
        bootstrap, topic = settings.bootstrap_servers, settings.events_topic
        if extra is None:
            await asyncio.to_thread(produce, bootstrap, topic, crc, compression="snappy")
        await asyncio.to_thread(produce, bootstrap, topic, scatter, "random", "gzip")

    await send_all()
    rows = sum(1 for d in docs if d["kind"] == "interaction" and d["userId"] != users[0])

    def erased_rows() -> int:
        return int(
            query(
                database_url,
                'SELECT count(*) FROM "UserInteraction" WHERE "userId" = %s',
                (users[0],),
            )[0][0]
        )

    async def run_until_agreed(expected_rows: int) -> None:
        web_port = free_port()
        stream = stream_process(settings, web_port, tmp_path / "stream.log")
        sink = Sink(settings, SinkOptions(group="mix-sink"))
        sinking = asyncio.create_task(sink.run())
        try:
            for user in users[1:]:
                await wait_for_profile(web_port, user, interactions=expected_rows // 7)
            # and the erased user's too: every record folded, copies included
            for _ in range(60):
                if await asyncio.to_thread(stream_caught_up, web_port):
                    break
            else:
                raise AssertionError("the stream never caught up")
            for _ in range(300):
                if count_rows(database_url) - erased_rows() == expected_rows:
                    break
                await asyncio.sleep(0.2)
            assert count_rows(database_url) - erased_rows() == expected_rows
            # every profile published, then written: the sink at both topics' ends
            stream.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(stream.wait, 60) == 0
            for _ in range(300):
                if await sink_at_the_end(settings, database_url, "mix-sink"):
                    break
                await asyncio.sleep(0.2)
            assert await sink_at_the_end(settings, database_url, "mix-sink")
        finally:
            sink.stop()
            await asyncio.wait_for(sinking, 60)
            if stream.poll() is None:
                stream.kill()
                stream.wait()

    # one row and one count per event, whichever producers sent it, and how often
    await run_until_agreed(rows)
    assert {r[0] for r in query(database_url, 'SELECT id FROM "UserInteraction"')} <= ids
    checked = cli(settings, tmp_path, "verify", "--database-url", database_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "0 users differ" in checked.stdout and "0 differ" in checked.stdout
    live = await changelog_states(settings)

    # replayed from the log: the same profiles, byte for byte
    replayed = cli(settings, tmp_path, "replay", "stream")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert await changelog_states(settings) == live

    # records sent while no stream runs: `replay stream` copies them home
    more = [
        _event("interaction", u, _at(200 + i, i), type="chat", service="saju")
        for i, u in enumerate(users[1:] * 2)
    ]
    await send_all(more)
    replayed = cli(settings, tmp_path, "replay", "stream")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "were copied there" in replayed.stdout, replayed.stdout
    await run_until_agreed(rows + len(more))
    checked = cli(settings, tmp_path, "verify", "--database-url", database_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def stream_caught_up(web_port: int) -> bool:
    """Whether the worker's /metrics shows no lag on any partition, twice a
    second apart (a copy it just made is then folded too)."""
    for attempt in range(2):
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5) as r:
            lags = [
                float(line.rsplit(" ", 1)[1])
                for line in r.read().decode().splitlines()
                if line.startswith("usertrail_stream_lag{")
            ]
        if not lags or any(lags):
            return False
        if attempt == 0:
            time.sleep(1)
    return True


async def test_a_grown_events_topic_is_refused_by_every_part(
    settings_factory: Callable[..., Settings], broker: Broker, database_url: str, tmp_path: Path
) -> None:
    """More partitions would move every user's home: the sink, the stream
    and the replay each refuse, in one line, with exit code 2."""
    settings = settings_factory(broker, database_url=database_url, stream_app_id=unique("grown"))
    # as a grown topic is (tansu cannot add partitions): the events topic
    # with one more partition than the changelog made for it
    grown = settings.events_partitions + 1
    await ensure_topics(settings, [TopicSpec(settings.events_topic, grown)])
    await create_topics(settings)
    await asyncio.to_thread(
        produce,
        settings.bootstrap_servers,
        settings.events_topic,
        [_event("interaction", "g", _at(1, 0), type="chat", service="saju")],
    )
    said = "does not support changing the events topic's partition count"
    replayed = cli(settings, tmp_path, "replay", "stream")
    assert replayed.returncode == 2 and said in replayed.stderr, replayed.stderr
    assert "Traceback" not in replayed.stderr
    log = tmp_path / "workers.log"
    for proc in (
        sink_process(settings, database_url, log, unique("grown-sink")),
        stream_process(settings, free_port(), log),
    ):
        try:
            assert proc.wait(timeout=90) == 2
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert text.count(said) >= 2 and "Traceback" not in text, text[-3000:]
