"""Whatever the bytes of a record, it ends as a dead letter and its
partition goes on (#20): each hostile record below is followed, on the same
partition, by 100 valid events, which must all become rows and profiles."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from usertrail.producers import TrackingClient
from usertrail.producers.events import EventBase, accept, build, encode
from usertrail.producers.ids import uuid7
from usertrail.sink.consumer import Sink, SinkOptions
from usertrail.sink.plan import DeadLetter, Record, classify

from tests.conftest import Broker, create_topics, read_all, unique
from tests.sink.conftest import query
from tests.workers import (
    count_rows,
    expected_view,
    sink_process,
    stream_process,
    wait_for_profile,
    worker_view,
)
from usertrail.apache_kafka import KafkaCluster
from usertrail.embedded import free_port
from usertrail.settings import Settings
from usertrail.topics import TopicSpec, ensure_topics

GOOD = json.dumps(
    {
        "kind": "interaction",
        "schemaVersion": 1,
        "eventId": "0193a3c1-aaaa-7bbb-8ccc-0123456789ab",
        "userId": "USER",
        "type": "chat",
        "service": "saju",
        "occurredAt": "2026-03-01T10:00:00Z",
        "source": "web",
    }
).encode()


def _good(**extra: bytes) -> bytes:
    """GOOD with more members, their values as raw JSON text (even invalid)."""
    more = b"".join(b", " + json.dumps(k).encode() + b": " + v for k, v in extra.items())
    return GOOD[:-1] + more + b"}"


HOSTILE: dict[str, bytes | None] = {
    "nested 6,000 deep": b"[" * 6000 + b"]" * 6000,
    "metadata nested 3,000 deep": _good(metadata=b'{"a":' * 3000 + b"1" + b"}" * 3000),
    # (Kafka's default message limit is 1 MB: #20 has the dead letters beyond it)
    "a 900 KiB value": b'{"kind": "interaction", "x": "' + b"a" * (900 << 10) + b'"}',
    "invalid UTF-8": GOOD.replace(b'"saju"', b'"\xff\xfe"'),
    "a NUL in a field": GOOD.replace(b'"chat"', b'"ch\x00at"'),
    "a NUL outside JSON": GOOD + b"\x00",
    "a 5,000-digit number": _good(rating=b"9" * 5000),
    "a float beyond double": _good(rating=b"1e999999"),
    "duplicate keys": _good(userId=b'"someone-else"'),
    "every field of the wrong type": json.dumps({k: [1] for k in json.loads(GOOD)}).encode(),
    "empty bytes": b"",
    "a JSON array": b"[]",
    "a JSON string": b'"interaction"',
    "no value (null)": None,
}


def test_no_bytes_make_the_decoders_raise() -> None:
    for name, value in HOSTILE.items():
        record = Record("t", 0, 0, b"USER", value)
        assert isinstance(classify(record), DeadLetter), name
        assert accept(b"USER", value) is None, name


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzzed_bytes_are_dead_letters_or_events(value: bytes, key: bytes | None) -> None:
    verdict = classify(Record("t", 0, 0, key, value))
    assert (accept(key, value) is None) == isinstance(verdict, DeadLetter)


@hsettings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=30,
    )
)
def test_fuzzed_json_is_a_dead_letter_or_an_event(doc: object) -> None:
    value = json.dumps(doc).encode()
    verdict = classify(Record("t", 0, 0, b"USER", value))
    assert (accept(b"USER", value) is None) == isinstance(verdict, DeadLetter)


async def test_every_hostile_record_is_a_dead_letter_and_its_partition_goes_on(
    settings_factory: Callable[..., Settings], broker: Broker, database_url: str, tmp_path: Path
) -> None:
    settings = settings_factory(broker, database_url=database_url, stream_app_id=unique("hostile"))
    await create_topics(settings)
    raw = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, max_request_size=4 << 20)
    await raw.start()
    users = {name: f"hostile-{i}" for i, name in enumerate(HOSTILE)}
    try:
        async with TrackingClient(source="web", settings=settings) as client:
            for name, value in HOSTILE.items():
                user = users[name]
                await (await raw.send(settings.events_topic, value, key=user.encode()))
                for i in range(100):  # after it, on its partition
                    await client.track_interaction(
                        user_id=user, type=("chat", "reading")[i % 2], service="tarot"
                    )
                await client.flush()
    finally:
        await raw.stop()
    by_user: dict[str, list[tuple[EventBase, int]]] = defaultdict(list)
    consumer = AIOKafkaConsumer(
        settings.events_topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    try:
        while sum(map(len, by_user.values())) < 100 * len(HOSTILE):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    if (event := accept(r.key, r.value)) is not None:
                        by_user[event.user_id].append((event, r.offset))
    finally:
        await consumer.stop()

    web_port = free_port()
    stream = stream_process(settings, web_port, tmp_path / "stream.log")
    sink = Sink(settings, SinkOptions(group=unique("sink")))
    sinking = asyncio.create_task(sink.run())
    try:
        for user, events in by_user.items():  # every valid event folded, in order
            body = await wait_for_profile(web_port, user, max(o for _, o in events))
            assert worker_view(body) == expected_view(events), user
        for _ in range(300):
            if count_rows(database_url) >= 100 * len(HOSTILE):
                break
            await asyncio.sleep(0.2)
        assert count_rows(database_url) == 100 * len(HOSTILE), "every valid event is a row"
        assert not sinking.done() and stream.poll() is None, "both workers are up"
    finally:
        sink.stop()
        await asyncio.wait_for(sinking, 60)
        stream.send_signal(signal.SIGTERM)
        stream.wait(timeout=60)
    dead = dict(query(database_url, "SELECT user_id, reason FROM usertrail_dead_letters"))
    parked = query(database_url, "SELECT count(*) FROM usertrail_dead_letters")[0][0]
    assert parked == len(HOSTILE), dead
    assert "Traceback" not in (tmp_path / "stream.log").read_text()


async def test_a_dead_letter_too_big_for_its_topic_lands_truncated(
    settings_factory: Callable[..., Settings], broker: Broker, database_url: str
) -> None:
    """A 1.5 MiB record (its topic allows 4 MiB) is a dead letter: every byte
    in the table, the first 512 KiB on the dead-letter topic, which takes
    1 MB by default, with the size it had."""
    settings = settings_factory(broker, database_url=database_url)
    await ensure_topics(
        settings,
        [
            TopicSpec(settings.events_topic, 1, {"max.message.bytes": str(4 << 20)}),
            TopicSpec(settings.profiles_topic, 1, {}),
            TopicSpec(settings.dead_letter_topic, 1, {}),
        ],
    )
    big = b'{"kind": "interaction", "x": "' + b"a" * (3 << 19) + b'"}'
    raw = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, max_request_size=4 << 20)
    await raw.start()
    try:
        await (await raw.send(settings.events_topic, big, key=b"u1"))
    finally:
        await raw.stop()
    sink = Sink(settings, SinkOptions(group=unique("sink")))
    sinking = asyncio.create_task(sink.run())
    try:
        for _ in range(300):
            if query(database_url, "SELECT count(*) FROM usertrail_dead_letters")[0][0]:
                break
            await asyncio.sleep(0.2)
        dead = await read_all(settings, settings.dead_letter_topic, expected=1, timeout=20)
    finally:
        sink.stop()
        await asyncio.wait_for(sinking, 60)
    assert query(database_url, "SELECT length(value) FROM usertrail_dead_letters") == [(len(big),)]
    # at least once on the topic: a produce retried after a timeout (no
    # idempotent producer on tansu) can land twice, as the same bytes
    assert dead and len({value for _, _, value in dead}) == 1, [len(v or b"") for *_, v in dead]
    assert len(dead[0][2] or b"") == 512 * 1024


async def test_a_dead_letter_its_topic_refuses_waits_and_the_others_go_on(
    kafka1: KafkaCluster, settings_factory: Callable[..., Settings], database_url: str
) -> None:
    """On a dead-letter topic that takes 64 KiB a record (Apache Kafka
    enforces it), the dead letter of a 300 KiB record is refused: it stays
    unpublished in the table, and the one found after it still goes out and
    is marked (one refused send once held back every one sent with it)."""
    settings = settings_factory(kafka1, database_url=database_url)
    await ensure_topics(
        settings,
        [
            TopicSpec(settings.events_topic, 1, {"max.message.bytes": str(4 << 20)}),
            TopicSpec(settings.profiles_topic, 1, {}),
            TopicSpec(settings.dead_letter_topic, 1, {"max.message.bytes": str(64 << 10)}),
        ],
    )
    big = b'{"kind": "interaction", "x": "' + b"a" * (300 << 10) + b'"}'
    raw = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, max_request_size=4 << 20)
    await raw.start()
    try:
        await (await raw.send(settings.events_topic, big, key=b"u1"))
        await (await raw.send(settings.events_topic, b"small, and not JSON", key=b"u2"))
    finally:
        await raw.stop()
    sink = Sink(settings, SinkOptions(group=unique("sink")))
    sinking = asyncio.create_task(sink.run())
    try:
        for _ in range(300):
            (counts,) = query(
                database_url,
                "SELECT count(*), count(*) FILTER (WHERE unpublished) FROM usertrail_dead_letters",
            )
            if counts == (2, 1):
                break
            await asyncio.sleep(0.2)
        dead = await read_all(settings, settings.dead_letter_topic, expected=2, timeout=5)
    finally:
        sink.stop()
        await asyncio.wait_for(sinking, 60)
    assert query(
        database_url, "SELECT length(value), unpublished FROM usertrail_dead_letters ORDER BY id"
    ) == [(len(big), True), (19, False)]
    assert [value for _, _, value in dead] == [b"small, and not JSON"]


# The real sink, in a process that exits at once (as a crash in a parser or
# the OOM killer would end it) when it decodes a record holding POISON.
POISONED_SINK = """
import os
from usertrail.sink import writer
classify = writer.classify
def dying(record):
    if record.value is not None and b"POISON" in record.value:
        os._exit(137)
    return classify(record)
writer.classify = dying
"""


async def test_a_record_that_kills_every_sink_becomes_a_dead_letter(
    settings_factory: Callable[..., Settings],
    broker: Broker,
    database_url: str,
    tmp_path: Path,
) -> None:
    """300 events of one user with a record in the middle that kills the
    sink that decodes it, the sink restarted at once each time (as `up`
    does): after a few deaths the record is a dead letter (reason crashed),
    never decoded again, and all 300 events are rows."""
    settings = settings_factory(broker, database_url=database_url)
    await create_topics(settings)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    events = [
        encode(
            build(
                "interaction",
                event_id=uuid7(),
                user_id="poisoned",
                occurred_at=t0 + timedelta(seconds=i),
                source="t",
                type="chat",
                service="saju",
            )
        )
        for i in range(300)
    ]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        for value in events[:150]:
            await producer.send(settings.events_topic, value, key=b"poisoned")
        poisoned = await (
            await producer.send(settings.events_topic, b'{"POISON": 1}', key=b"poisoned")
        )
        for value in events[150:]:
            await producer.send(settings.events_topic, value, key=b"poisoned")
        await producer.flush()
    finally:
        await producer.stop()
    group, log = unique("sink"), tmp_path / "sink.log"
    deaths = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 180
    proc = sink_process(settings, database_url, log, group, prelude=POISONED_SINK)
    try:
        while count_rows(database_url) < 300:
            assert loop.time() < deadline, f"{count_rows(database_url)} rows after {deaths} deaths"
            if proc.poll() is not None:
                assert proc.returncode == 137, log.read_text()[-3000:]
                deaths += 1
                proc = sink_process(settings, database_url, log, group, prelude=POISONED_SINK)
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    dead = query(
        database_url, 'SELECT reason, partition, "offset", value FROM usertrail_dead_letters'
    )
    assert dead == [("crashed", poisoned.partition, poisoned.offset, b'{"POISON": 1}')]
    print(f"\nthe poisoned record: a dead letter after {deaths} deaths of the sink")
    assert 2 <= deaths <= 8
    assert "Traceback" not in log.read_text()


@hsettings(max_examples=300, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),  # noqa: DTZ001  # hypothesis adds the zone
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    st.integers(-1, 4_102_444_800_000),  # no timestamp, or up to 2100
    st.booleans(),
)
# half a millisecond past a day after the timestamp: the fraction counts
@example(datetime(2026, 1, 2, 0, 0, 0, 500, tzinfo=UTC), 1_767_225_600_000, True)
def test_an_event_time_out_of_bounds_is_a_dead_letter_on_every_path(
    at: datetime, timestamp: int, canonical: bool
) -> None:
    """The sink's fast path, its contract path and the stream's ``accept``
    agree on the time bound, decided from the record's timestamp alone."""
    event = build(
        "interaction",
        event_id=uuid7(),
        user_id="USER",
        occurred_at=at,
        source="web",
        type="chat",
        service="saju",
    )
    value = encode(event) if canonical else encode(event).replace(b"{", b"{ ", 1)  # slow path
    verdict = classify(Record("t", 0, 0, b"USER", value, timestamp))
    stamp = timestamp if timestamp >= 0 else None
    within = stamp is None or (
        stamp - 3653 * 86_400_000 <= at.timestamp() * 1000 <= stamp + 86_400_000
    )
    assert isinstance(verdict, DeadLetter) == (not within)
    assert (accept(b"USER", value, timestamp) is not None) == within
    if not within:
        assert isinstance(verdict, DeadLetter) and "record's timestamp" in verdict.error
        assert verdict.user_id == "USER"
