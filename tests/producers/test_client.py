"""The SDK against the real embedded broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from usertrail.producers import SyncTrackingClient, TrackingClient, decode, encode
from usertrail.producers import client as client_module
from usertrail.producers.events import build
from usertrail.producers.spool import Spool

from tests.conftest import create_topics, read_all
from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.errors import (
    BufferFullError,
    ClientClosedError,
    EventValidationError,
)
from usertrail.settings import Settings


def distinct(
    records: list[tuple[int, bytes | None, bytes | None]],
) -> list[tuple[int, bytes | None, bytes | None]]:
    """Records by event id, first copy kept. Delivery to the topic is at least
    once: without an idempotent producer (tansu has none) a retried produce
    request can write a batch twice. Consumers deduplicate by event id; what
    must hold here is that a second copy is the same bytes."""
    first: dict[str, tuple[int, bytes | None, bytes | None]] = {}
    for record in records:
        event_id = decode(record[2] or b"").event_id
        if event_id in first:
            assert first[event_id] == record, "a duplicate is an exact copy"
        first.setdefault(event_id, record)
    return list(first.values())


async def _spool_sent_again(client: TrackingClient, spool: Any) -> None:
    """Wait (up to 60 s) for a running client to send its spool again. The
    spool is taken when its re-send starts; a re-send that fails (a broker
    still without its topic) spools it again once the delivery timeout
    passes: done when a flush leaves no spool."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        if not spool.exists() and (await client.flush()).spooled == 0 and not spool.exists():
            break
        await asyncio.sleep(0.2)
    assert not spool.exists()


async def test_async_client_events_read_back_byte_for_byte(settings: Settings) -> None:
    await create_topics(settings)
    sent = {}
    async with TrackingClient(source="web", settings=settings) as client:
        for i in range(200):
            event_id = await client.track_interaction(
                user_id=f"user-{i % 7}",
                type="reading",
                service="tarot",
                theme="love",
                rating=1 + i % 5,
                metadata={"duration": i, "nested": {"ok": [1, None]}},
            )
            sent[event_id] = None
        await client.track_preferences(user_id="user-1", tone_preference="formal")
        await client.track_onboarding(user_id="user-2", interests=["love"], experience="new")
        await client.erase_user(user_id="user-3")
        report = await client.close()
    assert report.delivered == 203 and report.spooled == 0

    records = distinct(await read_all(settings, settings.events_topic, expected=203))
    assert len(records) == 203
    by_user: dict[bytes, list[str]] = {}
    for _, key, value in records:
        assert key is not None and value is not None
        event = decode(value)
        assert encode(event) == value, "the bytes are exactly the contract's JSON"
        assert key == event.user_id.encode()
        by_user.setdefault(key, []).append(event.event_id)
    assert set(sent) <= {e for ids in by_user.values() for e in ids}
    for ids in by_user.values():  # one user's events stay in send order
        assert ids == sorted(ids)


async def test_one_user_lives_in_one_partition(settings: Settings) -> None:
    await create_topics(settings)
    async with TrackingClient(source="web", settings=settings) as client:
        for i in range(100):
            await client.track_interaction(user_id=f"u{i % 10}", type="chat", service="saju")
    records = await read_all(settings, settings.events_topic, expected=100)
    partitions: dict[bytes | None, set[int]] = {}
    for partition, key, _ in records:
        partitions.setdefault(key, set()).add(partition)
    assert len(partitions) == 10
    assert all(len(p) == 1 for p in partitions.values())
    assert len({next(iter(p)) for p in partitions.values()}) > 1, "users spread over partitions"


async def test_sync_client_delivers_everything_on_close(settings: Settings) -> None:
    await create_topics(settings)

    def app() -> list[str]:
        with SyncTrackingClient(source="flask", settings=settings) as client:
            return [
                client.track_interaction(
                    user_id="s1", type="feedback", service="astrology", rating=2
                )
                for _ in range(50)
            ]

    ids = await asyncio.to_thread(app)
    records = await read_all(settings, settings.events_topic, expected=50)
    assert [decode(v).event_id for _, _, v in distinct(records) if v] == ids
    assert all(decode(v).source == "flask" for _, _, v in records if v)


async def test_invalid_input_raises_at_the_call_and_sends_nothing(settings: Settings) -> None:
    await create_topics(settings)
    async with TrackingClient(source="web", settings=settings) as client:
        with pytest.raises(EventValidationError) as info:
            await client.track_interaction(user_id="u", type="reading", service="saju", rating=9)
        assert info.value.fields == ["rating"]
        with pytest.raises(EventValidationError, match="metadata"):
            await client.track_interaction(
                user_id="u", type="reading", service="saju", metadata={"at": datetime.now(UTC)}
            )
        with pytest.raises(EventValidationError, match="occurred_at"):
            await client.track_interaction(
                user_id="u",
                type="reading",
                service="saju",
                occurred_at=datetime(2026, 1, 1),  # noqa: DTZ001 naive on purpose
            )
        for far in (datetime(9999, 1, 1, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC)):
            with pytest.raises(EventValidationError, match="occurredAt: .* the record's timestamp"):
                await client.track_preferences(user_id="u", reading_length="long", occurred_at=far)
        await client.track_interaction(user_id="u", type="reading", service="saju", rating=4)
    records = await read_all(settings, settings.events_topic, expected=1)
    assert len(records) == 1 and json.loads(records[0][2] or b"")["rating"] == 4


async def test_sending_before_start_is_a_clear_error(settings: Settings) -> None:
    client = TrackingClient(source="web", settings=settings)
    with pytest.raises(ClientClosedError, match="start"):
        await client.track_interaction(user_id="u", type="chat", service="saju")


async def test_a_client_started_before_its_broker_accepts_and_delivers_when_it_appears(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """No broker at start: nothing raises, every event is accepted (past the
    buffer they go to the spool, one write per spill), and once a broker
    answers at that address everything is sent, spool first, without a
    restart of the client."""
    port = free_port()
    nowhere = settings_factory(broker_factory(), kafka_bootstrap_servers=f"127.0.0.1:{port}")
    settings = nowhere.model_copy(update={"broker": "tansu"})  # asked of nobody yet
    spool = tmp_path / "s.jsonl"
    client = TrackingClient(source="web", settings=settings, buffer_size=10, spool_path=spool)
    await client.start()
    ids = [
        await client.track_interaction(user_id=f"u{i % 3}", type="chat", service="saju")
        for i in range(25)
    ]
    assert client.spool.count() == 20  # two full buffers spilled; five held
    broker_factory(port=port)
    await create_topics(settings)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while client._producer is None and loop.time() < deadline:  # it tries again by itself
        await asyncio.sleep(0.1)
    report = await client.close()
    # the 20 spilled were spooled, then sent with the 5 held
    assert (report.delivered, report.spooled) == (25, 20) and not spool.exists()
    records = await read_all(settings, settings.events_topic, expected=25)
    assert {decode(v or b"").event_id for _, _, v in records} == set(ids)


async def test_a_broker_back_after_an_outage_gets_the_spool_without_a_restart(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "RESEND_SECONDS", 0.3)
    port = free_port()
    first = broker_factory(port=port)
    settings = settings_factory(first)
    await create_topics(settings)
    spool = tmp_path / "s.jsonl"
    async with TrackingClient(
        source="web", settings=settings, delivery_timeout=1.5, spool_path=spool
    ) as client:
        await client.track_interaction(user_id="u", type="chat", service="saju")
        assert (await client.flush()).delivered == 1
        first.stop()  # tansu keeps nothing: the next one at this address is empty
        during = [
            await client.track_interaction(user_id=f"u{i}", type="chat", service="saju")
            for i in range(10)
        ]
        assert (await client.flush()).spooled == 10 and Spool(spool).count() == 10
        broker_factory(port=port)
        await create_topics(settings)
        await _spool_sent_again(client, spool)  # by itself
    records = await read_all(settings, settings.events_topic, expected=10)
    assert {decode(v or b"").event_id for _, _, v in records} == set(during)


async def test_a_broker_back_empty_is_sent_nothing_before_its_topics_exist(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tansu acknowledges batches for a topic it does not have and keeps
    nothing (docs/brokers.md 13). Restarted empty at the same address under
    an idle client (no send failed: it still knows the old partitions),
    it must not be sent the next events before it has the topic: they are
    spooled, and delivered once the topic is made."""
    monkeypatch.setattr(client_module, "RESEND_SECONDS", 0.3)
    port = free_port()
    first = broker_factory(port=port)
    settings = settings_factory(first)
    await create_topics(settings)
    spool = tmp_path / "s.jsonl"
    async with TrackingClient(
        source="web", settings=settings, delivery_timeout=1.5, spool_path=spool
    ) as client:
        for i in range(16):  # a connection to every partition's leader, confirmed
            await client.track_interaction(user_id=f"w{i}", type="chat", service="saju")
        assert (await client.flush()).delivered == 16
        first.stop()
        broker_factory(port=port)  # empty, as a restarted tansu is
        during = [
            await client.track_interaction(user_id=f"u{i}", type="chat", service="saju")
            for i in range(10)
        ]
        report = await client.flush()
        assert (report.delivered, report.spooled) == (0, 10), (
            "acknowledged by a broker without the topic"
        )
        await create_topics(settings)
        await _spool_sent_again(client, spool)
    records = await read_all(settings, settings.events_topic, expected=10)
    assert {decode(v or b"").event_id for _, _, v in records} == set(during)


async def test_events_for_a_topic_not_made_yet_are_spooled_then_sent(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No topic yet: the first event waits a moment for it (TOPIC_WAIT),
    the rest are spooled without waiting and without an error, and the
    re-send delivers them all once the topic is made."""
    monkeypatch.setattr(client_module, "RESEND_SECONDS", 0.3)
    monkeypatch.setattr(client_module, "TOPIC_WAIT", 1.0)
    writes = []
    append = Spool.append
    monkeypatch.setattr(Spool, "append", lambda self, r: (writes.append(len(r)), append(self, r)))
    spool = tmp_path / "s.jsonl"
    async with TrackingClient(source="web", settings=settings, spool_path=spool) as client:
        started = time.monotonic()
        sent = [
            await client.track_interaction(user_id=f"u{i}", type="chat", service="saju")
            for i in range(50)
        ]
        assert time.monotonic() - started < 20, "one wait for the topic, not one per event"
        assert (await client.flush()).spooled == 50 and Spool(spool).count() == 50
        assert len([n for n in writes if n]) < 25, f"a spool write per event: {writes}"
        await create_topics(settings)
        await _spool_sent_again(client, spool)
    records = distinct(await read_all(settings, settings.events_topic, expected=50))
    assert sorted(decode(v or b"").event_id for _, _, v in records) == sorted(sent)


_SDK_BESIDE_AN_APPS_PRODUCER = """
import asyncio, sys
from aiokafka import AIOKafkaProducer
from usertrail.producers import TrackingClient
from usertrail.settings import Settings

async def main(bootstrap, events, own, spool):
    settings = Settings(kafka_bootstrap_servers=bootstrap, events_topic=events)
    async with TrackingClient(
        source="app", settings=settings, delivery_timeout=2, spool_path=spool
    ) as client:
        await client.track_interaction(user_id="u", type="chat", service="saju")
        print("spooled", (await client.flush()).spooled)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(own, b"the app's own")
    finally:
        await producer.stop()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_the_sdk_never_makes_its_topic_and_leaves_the_apps_clients_alone(
    settings: Settings, tmp_path: Path
) -> None:
    """In an app's process (no ``never_create_topics``), the SDK's producer
    does not make a missing events topic by asking for it, as aiokafka
    would (with the broker's partition count, on tansu after every
    restart): the event is spooled. The app's own aiokafka producer in the
    same process still makes its topic, as the broker allows."""
    import subprocess
    import sys

    from aiokafka.admin import AIOKafkaAdminClient

    own = f"{settings.events_topic}.own"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            _SDK_BESIDE_AN_APPS_PRODUCER,
            settings.bootstrap_servers,
            settings.events_topic,
            own,
            str(tmp_path / "s.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "spooled 1" in done.stdout, done.stdout + done.stderr[-3000:]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        topics = set(await admin.list_topics())
    finally:
        await admin.close()
    assert own in topics, "the app's own producer made its topic"
    assert settings.events_topic not in topics, "the SDK made the events topic"


async def test_a_client_closed_before_any_broker_answered_spools_everything(
    settings_factory: Callable[..., Settings], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = settings_factory(broker, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    settings = settings.model_copy(update={"broker": "tansu"})
    spool = tmp_path / "s.jsonl"

    def app() -> tuple[list[str], int]:
        with SyncTrackingClient(source="flask", settings=settings, spool_path=spool) as client:
            ids = [client.track_interaction(user_id="u", type="chat", service="saju")]
            ids += [client.erase_user(user_id="v")]
            return ids, client.flush().spooled

    ids, spooled = await asyncio.to_thread(app)
    assert spooled == 2 and Spool(spool).count() == 2
    assert {decode(r.value).event_id for r in Spool(spool).take()} == set(ids)


async def test_full_buffer_waits_then_raises(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    broker = broker_factory()
    settings = settings_factory(broker)
    await create_topics(settings)
    client = TrackingClient(
        source="web",
        settings=settings,
        buffer_size=3,
        buffer_timeout=0.3,
        delivery_timeout=2,
        linger_ms=0,
        spool_path=tmp_path / "s.jsonl",
    )
    await client.start()
    broker.stop()  # nothing will be acknowledged now
    for _ in range(3):
        await client.track_interaction(user_id="u", type="chat", service="saju")
    with pytest.raises(BufferFullError) as info:
        await client.track_interaction(user_id="u", type="chat", service="saju")
    assert info.value.retriable
    report = await client.close()
    assert report.spooled == 3 and client.spool.count() == 3


async def test_broker_outage_spools_and_next_start_resends_each_event_once(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    broker = broker_factory()
    settings = settings_factory(broker)
    await create_topics(settings)
    spool = tmp_path / "spool.jsonl"
    failures: list[str] = []

    client = TrackingClient(
        source="web",
        settings=settings,
        delivery_timeout=2,
        spool_path=spool,
        on_delivery=lambda eid, err: failures.append(eid) if err else None,
    )
    await client.start()
    before = [
        await client.track_interaction(user_id=f"u{i}", type="chat", service="saju")
        for i in range(10)
    ]
    assert (await client.flush()).delivered == 10
    broker.stop()
    during = [
        await client.track_interaction(user_id=f"u{i}", type="reading", service="tarot", rating=5)
        for i in range(30)
    ]
    report = await client.close()
    assert report.delivered == 0 and report.spooled == 30
    assert sorted(failures) == sorted(during), "every failure reached the callback"
    assert client.spool.count() == 30

    # The broker comes back (memory storage: empty) on the same address.
    broker_factory(port=broker.port)
    await create_topics(settings)
    async with TrackingClient(source="web", settings=settings, spool_path=spool) as again:
        assert again.resent_from_spool == 30
        after = await again.track_interaction(user_id="u0", type="share", service="saju")
    assert not spool.exists()

    records = await read_all(settings, settings.events_topic, expected=31)
    ids = [decode(v).event_id for _, _, v in records if v]
    assert sorted(ids) == sorted([*during, after]), "none lost, none duplicated"
    assert not set(before) & set(ids)  # the restarted broker kept nothing from before


async def test_send_returns_a_delivery_future(settings: Settings) -> None:
    await create_topics(settings)
    async with TrackingClient(source="web", settings=settings) as client:
        event = build(
            "user.erased",
            event_id="01a2a000-0000-7000-8000-000000000001",
            user_id="gone",
            occurred_at=datetime.now(UTC),
            source="web",
        )
        future = await client.send(event)
        metadata = await future
        assert metadata.topic == settings.events_topic and metadata.offset >= 0


async def test_a_start_cut_short_while_resending_keeps_the_rest_spooled(
    settings: Settings, tmp_path: Path
) -> None:
    """start() takes the spool off disk to send it again; cancelled there
    (an app's ``wait_for`` around it), what it had not buffered yet goes
    back to the spool, and the next start sends it: nothing is lost."""
    await create_topics(settings)
    spool = tmp_path / "s.jsonl"
    maker = TrackingClient(source="app", settings=settings, spool_path=spool)
    made = [
        maker._record("interaction", {"user_id": f"u{i}", "type": "chat", "service": "saju"})
        for i in range(30)
    ]
    Spool(spool).append([record for record, _ in made])

    class CutShort(TrackingClient):
        enqueued = 0

        async def _enqueue(self, record: Any, event_id: str | None = None) -> Any:
            CutShort.enqueued += 1
            if CutShort.enqueued == 11:
                raise asyncio.CancelledError  # as a cancelled start() meets it
            return await super()._enqueue(record, event_id)

    client = CutShort(source="app", settings=settings, spool_path=spool)
    with pytest.raises(asyncio.CancelledError):
        await client.start()
    assert Spool(spool).count() == 20
    assert (await client.close()).delivered == 10
    async with TrackingClient(source="app", settings=settings, spool_path=spool) as again:
        assert again.resent_from_spool == 20
    records = await read_all(settings, settings.events_topic, expected=30)
    assert {decode(v or b"").event_id for _, _, v in records} == {i for _, i in made}


async def test_a_broker_that_does_not_answer_is_no_wait_at_start(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """A broker that takes connections and answers nothing (frozen with
    SIGSTOP) at start: start() returns after ``connect_timeout`` as if it
    were unreachable, events are accepted, and once it answers they arrive."""
    broker = broker_factory()
    settings = settings_factory(broker)
    await create_topics(settings)
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)
    client = TrackingClient(
        source="app", settings=settings, connect_timeout=2, spool_path=tmp_path / "s.jsonl"
    )
    try:
        began = time.monotonic()
        await client.start()
        took = time.monotonic() - began
        ids = [
            await client.track_interaction(user_id=f"u{i}", type="chat", service="saju")
            for i in range(10)
        ]
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert took < 8, f"start() took {took:.1f} s"
    try:
        records = await read_all(settings, settings.events_topic, expected=10, timeout=60)
    finally:
        await client.close()
    assert {decode(v or b"").event_id for _, _, v in records} == set(ids)


async def test_events_wait_longer_for_company_only_on_the_embedded_broker(
    broker: Any, settings: Settings
) -> None:
    """tansu pays on every fetch for every batch a partition holds
    (docs/brokers.md, 12): there the SDK's default linger is longer, so a
    busy app sends fewer, fuller batches. An app's own choice stands on
    either broker."""
    embedded = isinstance(broker, EmbeddedBroker)
    await create_topics(settings)
    async with TrackingClient(source="web", settings=settings) as client:
        assert client.linger_ms == (client_module.TANSU_LINGER_MS if embedded else 5)
        await client.track_interaction(user_id="u", type="chat", service="saju")
        assert (await client.flush()).delivered == 1
    async with TrackingClient(source="web", settings=settings, linger_ms=20) as client:
        assert client.linger_ms == 20
