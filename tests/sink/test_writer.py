"""The writer's rules across batches, on the real database (no broker needed)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from usertrail.producers.events import EventBase, decode
from usertrail.producers.profiles import ProfileMessage, SegmentAssignment, encode_profile
from usertrail.replay.crosscheck import cross_check
from usertrail.sink.plan import Record
from usertrail.sink.writer import Writer, vectors_upsert
from usertrail.stream.fold import fold_all

from tests.folding import CONFIG
from tests.sink.conftest import query
from tests.workers import profile_message
from usertrail.settings import Settings

T0 = datetime(2026, 5, 1, tzinfo=UTC)
P = "profiles"


def rec(offset: int, user: str, value: bytes | None) -> Record:
    return Record(P, 0, offset, user.encode(), value)


async def test_an_older_profile_in_a_later_batch_does_not_overwrite(database_url: str) -> None:
    writer = Writer(database_url, group="c", profiles_topic=P)
    await writer.connect()
    try:
        await writer.write([rec(0, "a", profile_message("a", T0 + timedelta(hours=2), "new", 2))])
        await writer.write([rec(1, "a", profile_message("a", T0, "old", 1))])
        assert query(database_url, 'SELECT "primarySegment" FROM user_vectors') == [("new",)]
        await writer.write([rec(2, "a", profile_message("a", T0 + timedelta(hours=3), "newer", 3))])
        assert query(database_url, 'SELECT "primarySegment" FROM user_vectors') == [("newer",)]
    finally:
        await writer.close()


async def test_a_failed_mark_leaves_the_write_loop_its_connection(database_url: str) -> None:
    """The sink's fetch loop marks batches in flight on a connection of its
    own while its write loop writes on the writer's. A database error in a
    mark once closed both, and the write loop, mid-batch, stopped the sink
    with ``connect() first``: only the broken connection is closed now."""
    writer = Writer(database_url, group="c", profiles_topic=P)
    await writer.connect()
    try:
        await writer.mark_in_flight({(P, 0): (0, 0)})
        marks, conn = writer._marks, writer.conn
        assert marks is not None
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (marks.info.backend_pid,))
        try:
            await writer.mark_in_flight({(P, 0): (1, 1)})
        except psycopg.OperationalError:
            pass
        else:
            raise AssertionError("a mark on a terminated connection succeeded")
        await writer.close_broken()
        assert marks.closed and writer.conn is conn and not conn.closed
        await writer.write([rec(0, "a", profile_message("a", T0, "kept", 1))])
        await writer.mark_in_flight({(P, 0): (1, 1)})  # on a new connection
        assert query(database_url, 'SELECT "primarySegment" FROM user_vectors') == [("kept",)]
    finally:
        await writer.close()


async def test_tombstone_then_a_newer_profile_in_one_batch(database_url: str) -> None:
    writer = Writer(database_url, group="c", profiles_topic=P)
    await writer.connect()
    try:
        late = T0 + timedelta(days=1)
        await writer.write([rec(0, "a", profile_message("a", late, "before-erasure", 1))])
        # erased, then new activity: the row must hold only what came after
        await writer.write(
            [rec(1, "a", None), rec(2, "a", profile_message("a", T0, "after-erasure", 2))]
        )
        assert query(database_url, 'SELECT "primarySegment" FROM user_vectors') == [
            ("after-erasure",)
        ]
        await writer.write([rec(3, "a", None)])
        assert query(database_url, "SELECT count(*) FROM user_vectors") == [(0,)]
    finally:
        await writer.close()


async def test_a_batch_of_a_sink_that_lost_its_partition_writes_nothing_its_new_owner_wrote(
    database_url: str,
) -> None:
    """Two sinks of one group: a rebalance moved the partition to the second
    while the first still had a batch of it on its way to the database (the
    revoke waits only for what is queued; a member slower than the
    rebalance timeout is replaced without being stopped). The new owner
    wrote offsets 0-2 (a profile, the user's erasure, their new profile);
    the old batch of 0-1 commits after it and writes nothing: the new
    profile stays, and the position does not go back."""
    lost = Writer(database_url, group="g", profiles_topic=P)
    owner = Writer(database_url, group="g", profiles_topic=P)
    await lost.connect()
    await owner.connect()
    try:
        log = [
            rec(0, "a", profile_message("a", T0, "first", 1)),
            rec(1, "a", None),  # erased
            rec(2, "a", profile_message("a", T0 + timedelta(hours=1), "after", 2)),
        ]
        on_its_way = await lost.prepare(log[:2])
        await owner.write(log)
        result = await lost.apply(on_its_way)
        assert query(database_url, 'SELECT "primarySegment" FROM user_vectors') == [("after",)]
        assert query(database_url, "SELECT next_offset FROM usertrail_positions") == [(3,)]
        assert (result.records, result.vectors) == (0, 0)
        # a batch partly written: only the rest goes in
        await lost.write([*log[1:], rec(3, "a", profile_message("a", T0, "old", 3))])
        assert query(database_url, 'SELECT "primarySegment" FROM user_vectors') == [("after",)]
        assert query(database_url, "SELECT next_offset FROM usertrail_positions") == [(4,)]
    finally:
        await lost.close()
        await owner.close()


async def test_created_at_is_utc_whatever_offset_the_producer_wrote(database_url: str) -> None:
    # Another language's producer may write occurredAt with its local offset;
    # "createdAt" (timestamp without time zone) holds the instant in UTC.
    writer = Writer(database_url, group="c", profiles_topic=P)
    await writer.connect()
    try:
        events = [
            ("01936b2a-0000-7000-8000-000000000001", "2026-03-01T09:00:00.250+09:00"),
            ("01936b2a-0000-7000-8000-000000000002", "2026-03-01T00:00:00Z"),
            ("01936b2a-0000-7000-8000-000000000003", "2026-02-28T19:30:00-05:00"),
        ]
        await writer.write(
            [
                Record(
                    "events",
                    0,
                    i,
                    b"u",
                    (
                        f'{{"eventId":"{event_id}","userId":"u","occurredAt":"{at}",'
                        '"source":"web","kind":"interaction","type":"reading","service":"tarot"}'
                    ).encode(),
                )
                for i, (event_id, at) in enumerate(events)
            ]
        )
        assert query(database_url, 'SELECT id, "createdAt" FROM "UserInteraction" ORDER BY id') == [
            (events[0][0], datetime(2026, 3, 1, 0, 0, 0, 250_000, tzinfo=UTC).replace(tzinfo=None)),
            (events[1][0], datetime(2026, 3, 1, 0, 0, tzinfo=UTC).replace(tzinfo=None)),
            (events[2][0], datetime(2026, 3, 1, 0, 30, tzinfo=UTC).replace(tzinfo=None)),
        ]
    finally:
        await writer.close()


def _event(n: int, kind: str, at: datetime, **fields: str) -> bytes:
    extra = "".join(f',"{k}":"{v}"' for k, v in fields.items())
    return (
        f'{{"eventId":"01936b2a-0000-7000-8000-{n:012d}","userId":"u","kind":"{kind}",'
        f'"occurredAt":"{at.isoformat()}","source":"web"{extra}}}'
    ).encode()


async def test_a_resend_however_late_changes_no_row(database_url: str) -> None:
    """Rule 2 for every kind: a resent erasure does not erase again, a
    resent preferences change does not come back over a newer one of the
    same instant, and an interaction an erasure deleted is not written
    back by its resend (#19)."""
    writer = Writer(database_url, group="c", profiles_topic=P)
    await writer.connect()
    reading = {"type": "reading", "service": "tarot"}
    try:
        events = [
            _event(1, "interaction", T0, **reading),
            _event(2, "interaction", T0 + timedelta(minutes=1), **reading),
            _event(3, "user.erased", T0 + timedelta(minutes=2)),
            _event(4, "interaction", T0 + timedelta(minutes=3), **reading),
            _event(5, "preferences.updated", T0 + timedelta(minutes=4), readingLength="long"),
            _event(6, "preferences.updated", T0 + timedelta(minutes=4), readingLength="short"),
        ]
        # the first two and the erasure in one batch, then the rest, one by one
        await writer.write([Record("events", 0, i, b"u", v) for i, v in enumerate(events[:3])])
        for i, v in enumerate(events[3:], start=3):
            await writer.write([Record("events", 0, i, b"u", v)])

        def rows() -> list[tuple[object, ...]]:
            return query(
                database_url,
                'SELECT i.id::text, p."readingLength" FROM "UserInteraction" i '
                'LEFT JOIN "UserPreferences" p USING ("userId") ORDER BY 1',
            )

        before = rows()
        assert before == [("01936b2a-0000-7000-8000-000000000004", "short")]
        # every event again, much later, in log order and in one batch
        resent = [Record("events", 0, 10 + i, b"u", v) for i, v in enumerate(events)]
        await writer.write(resent)
        assert rows() == before
        for i, v in enumerate(events):  # and one by one
            await writer.write([Record("events", 0, 20 + i, b"u", v)])
        assert rows() == before
        # within one batch: an interaction, an erasure, the interaction again
        # (its resend): the erasure forgets it, and the resend stays a resend
        again = [
            _event(7, "interaction", T0 + timedelta(minutes=7), **reading),
            _event(8, "user.erased", T0 + timedelta(minutes=8)),
            _event(7, "interaction", T0 + timedelta(minutes=7), **reading),
        ]
        await writer.write([Record("events", 0, 30 + i, b"u", v) for i, v in enumerate(again)])
        assert rows() == []
        # a row written before, then in one batch: an erasure and the row's resend
        await writer.write([Record("events", 0, 40, b"u", _event(9, "interaction", T0, **reading))])
        late = [
            _event(10, "user.erased", T0 + timedelta(minutes=9)),
            _event(9, "interaction", T0, **reading),
        ]
        await writer.write([Record("events", 0, 41 + i, b"u", v) for i, v in enumerate(late)])
        assert rows() == []
    finally:
        await writer.close()


@st.composite
def traffic(draw: st.DrawFn) -> list[bytes]:
    """Two users' events in log order: interactions, preference changes and
    erasures, with resends of any earlier one, however late."""
    pool: list[bytes] = []
    for i in range(draw(st.integers(1, 8))):
        user = draw(st.sampled_from(["a", "a", "b"]))
        at = T0 + timedelta(minutes=draw(st.integers(0, 600)))
        kind = draw(st.sampled_from(["interaction"] * 3 + ["preferences.updated", "user.erased"]))
        fields: dict[str, str] = {}
        if kind == "interaction":
            fields = {
                "type": draw(st.sampled_from(["reading", "chat"])),
                "service": draw(st.sampled_from(["saju", "tarot"])),
            }
        elif kind == "preferences.updated":
            fields = {"readingLength": draw(st.sampled_from(["short", "long"]))}
        value = _event(100 + i, kind, at, **fields).replace(
            b'"userId":"u"', f'"userId":"{user}"'.encode()
        )
        pool.append(value)
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=24))
    # every event at its first pick; later picks of it are resends
    return [pool[i] for i in picks]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(traffic(), st.lists(st.integers(1, 30), max_size=6))
def test_rows_equal_the_fold_however_the_batches_fall(
    database_url: str, log: list[bytes], cuts: list[int]
) -> None:
    """Whatever the mix of resends and erasures, and wherever the batches
    are cut, the rows are what the stream's fold says (verify's cross-check
    against SQL over the rows finds nothing)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            'TRUNCATE "UserInteraction", "UserPreferences", user_vectors, usertrail_seen_events, '
            "usertrail_positions"
        )
    records = [
        Record("events", 0, i, json.loads(v)["userId"].encode(), v) for i, v in enumerate(log)
    ]

    async def write() -> None:
        writer = Writer(database_url, group="c", profiles_topic=P)
        await writer.connect()
        try:
            start = 0
            for end in [*sorted(set(cuts)), len(records)]:
                if start < end <= len(records):
                    await writer.write(records[start:end])
                    start = end
            if start < len(records):
                await writer.write(records[start:])
        finally:
            await writer.close()

    asyncio.run(write())
    by_user: dict[str, list[tuple[EventBase, int | None]]] = {}
    for i, v in enumerate(log):
        event = decode(v)
        by_user.setdefault(event.user_id, []).append((event, i))
    profiles = {u: fold_all(u, ev, config=CONFIG) for u, ev in by_user.items()}
    assert cross_check(Settings(database_url=database_url), profiles) == []


_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_UNIT = st.floats(0, 1)


@st.composite
def profiles(draw: st.DrawFn) -> ProfileMessage:
    """Any profile the contract takes: any text where it allows text (tabs,
    newlines, backslashes, quotes), any finite number, any offset."""
    zone = timezone(timedelta(minutes=draw(st.integers(-14 * 60, 14 * 60))))
    naive = (datetime(1990, 1, 1), datetime(2090, 1, 1))  # noqa: DTZ001  # hypothesis's bounds
    at = st.datetimes(*naive, timezones=st.just(zone))
    return ProfileMessage(
        user_id="u",
        updated_at=draw(at),
        vector=draw(st.dictionaries(_TEXT, st.floats(allow_nan=False, allow_infinity=False))),
        segments=[
            SegmentAssignment(segment=s, score=score, reasons=reasons)
            for s, score, reasons in draw(
                st.lists(st.tuples(_TEXT, _UNIT, st.lists(_TEXT, min_size=1, max_size=3)))
            )
        ],
        primary_segment=draw(st.none() | _TEXT),
        segment_confidence=draw(st.none() | _UNIT),
        last_segment_update=draw(st.none() | at),
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(profiles(), min_size=1, max_size=4))
def test_profiles_copied_in_a_batch_equal_the_upsert_of_one_row(
    database_url: str, messages: list[ProfileMessage]
) -> None:
    """The sink copies a batch's profiles through a staging table: each row
    comes out as ``vectors_upsert`` (the upsert of one row, with its values
    as parameters) writes it, whatever the text and numbers in it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute('TRUNCATE user_vectors, usertrail_positions, "User" CASCADE')  # a new log
        conn.execute("""INSERT INTO "User" (id) VALUES ('by-hand')""")
    users = [f'u{i}\\"é' for i in range(len(messages))]  # a backslash, a quote, non-ASCII

    async def write() -> None:
        writer = Writer(database_url, group="c", profiles_topic=P)
        await writer.connect()
        try:
            await writer.write(
                [
                    rec(i, user, encode_profile(m.model_copy(update={"user_id": user})))
                    for i, (user, m) in enumerate(zip(users, messages, strict=True))
                ]
            )
        finally:
            await writer.close()

    asyncio.run(write())
    columns = '"userId", vector, "createdAt", "updatedAt", segments, "primarySegment", '
    columns += '"segmentConfidence", "lastSegmentUpdate"'

    def utc(at: datetime) -> datetime:
        return at.astimezone(UTC).replace(tzinfo=None)

    with psycopg.connect(database_url) as conn:
        copied = conn.execute(f'SELECT {columns} FROM user_vectors ORDER BY "userId"').fetchall()
        for m in messages:
            conn.execute("DELETE FROM user_vectors")
            last = None if m.last_segment_update is None else utc(m.last_segment_update)
            segments = [a.model_dump(by_alias=True) for a in m.segments]
            conn.execute(
                vectors_upsert(),
                (
                    "by-hand",
                    "by-hand",
                    Jsonb(m.vector),
                    utc(m.updated_at),
                    utc(m.updated_at),
                    Jsonb(segments),
                    m.primary_segment,
                    m.segment_confidence,
                    last,
                ),
            )
            (one,) = conn.execute(f"SELECT {columns} FROM user_vectors").fetchall()
            assert copied.pop(0)[1:] == one[1:]
        conn.rollback()
    assert copied == []
