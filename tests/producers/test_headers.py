"""Every event carries its content type and contract version as Kafka
headers, and the W3C trace context of the OpenTelemetry span it was sent
in; read back from the real broker, through the spool too."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span
from usertrail.producers import SyncTrackingClient, TrackingClient, decode
from usertrail.producers.spool import Spool

from tests.conftest import create_topics
from usertrail.kafka import stop_within
from usertrail.settings import Settings

TRACER = TracerProvider().get_tracer("usertrail-tests")


async def _headers_by_event(settings: Settings, expected: int) -> dict[str, dict[str, bytes]]:
    consumer = AIOKafkaConsumer(
        settings.events_topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: dict[str, dict[str, bytes]] = {}
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(out) < expected and loop.time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    out[decode(r.value or b"").event_id] = dict(r.headers)
    finally:
        await stop_within(consumer, 10)
    return out


async def test_every_event_says_what_it_is_and_the_span_it_was_sent_in(
    settings: Settings,
) -> None:
    await create_topics(settings)
    async with TrackingClient(source="web", settings=settings) as client:
        plain = await client.track_interaction(user_id="u1", type="chat", service="tarot")
        with TRACER.start_as_current_span("checkout") as span:
            traced = await client.track_interaction(user_id="u2", type="chat", service="saju")
            erased = await client.erase_user(user_id="u3")
        context = span.get_span_context()
    with SyncTrackingClient(source="backend", settings=settings) as sync:
        from_sync = sync.track_onboarding(user_id="u4", interests=["love"])
    got = await _headers_by_event(settings, 4)
    assert set(got) == {plain, traced, erased, from_sync}
    for headers in got.values():
        assert headers["content-type"] == b"application/json"
        assert headers["usertrail-schema-version"] == b"1"
    parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode()
    assert got[traced]["traceparent"] == got[erased]["traceparent"] == parent
    assert "traceparent" not in got[plain] and "traceparent" not in got[from_sync]


def _traceparent(span: Span) -> bytes:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode()


async def test_a_sync_call_carries_the_span_of_its_caller(settings: Settings) -> None:
    """SyncTrackingClient sends from a thread of its own, but the event is
    built in the caller's thread: the span on it is the caller's."""
    await create_topics(settings)

    def app() -> tuple[str, str, str, bytes]:
        with SyncTrackingClient(source="backend", settings=settings) as sync:
            with TRACER.start_as_current_span("celery-task") as span:
                traced = sync.track_interaction(user_id="u5", type="chat", service="saju")
                erased = sync.erase_user(user_id="u6")
            plain = sync.track_interaction(user_id="u7", type="chat", service="tarot")
        return traced, erased, plain, _traceparent(span)

    traced, erased, plain, parent = await asyncio.to_thread(app)
    got = await _headers_by_event(settings, 3)
    assert set(got) == {traced, erased, plain}
    assert got[traced]["traceparent"] == got[erased]["traceparent"] == parent
    assert "traceparent" not in got[plain]
    for headers in got.values():
        assert headers["content-type"] == b"application/json"


def test_the_spool_keeps_the_headers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from usertrail.producers.spool import SpooledRecord

    spool = Spool(tmp_path / "web.jsonl")
    record = SpooledRecord("t", b"k", b"{}", (("traceparent", b"00-ab-cd-01"),))
    older = SpooledRecord("t", b"k2", b"{}")
    spool.append([record, older])
    assert spool.take() == [record, older]
    # a line spooled before headers existed
    (tmp_path / "web.jsonl").write_text('{"topic": "t", "key": "k", "value": "{}"}\n')
    assert spool.take() == [SpooledRecord("t", b"k", b"{}")]
