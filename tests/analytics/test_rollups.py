"""The rollups equal the seeds' SQL over the rows, whatever writes the rows:
the sink's writer (batches cut anywhere, resends, erasures, profiles and
their tombstones), two writers at once, and rows already there when the
migration runs. On the real database."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from usertrail.analytics import reports
from usertrail.migrations import runner
from usertrail.sink.plan import Record
from usertrail.sink.writer import Writer

from tests.analytics.rows import fill
from tests.seeds import engine_for
from tests.sink.conftest import query
from tests.workers import profile_message

T0 = datetime(2026, 5, 1, 20, 0, tzinfo=UTC)
P = "profiles"
ZONES = ["UTC", "Asia/Seoul", "America/St_Johns", "Asia/Kathmandu", "Pacific/Kiritimati"]
WINDOW_START = date(2026, 4, 29)
SERVICES = (
    "SELECT service, sum(interactions)::int, sum(users)::int FROM usertrail_rollup_services "
    "GROUP BY 1 HAVING sum(interactions) > 0 ORDER BY 1"
)


def event(n: int, user: str, kind: str, at: datetime, **fields: Any) -> bytes:
    body = {
        "eventId": f"01936b2a-0000-7000-8000-{n:012d}",
        "userId": user,
        "kind": kind,
        "occurredAt": at.isoformat(),
        "source": "web",
        **fields,
    }
    return json.dumps(body).encode()


@st.composite
def traffic(draw: st.DrawFn) -> list[Record]:
    """Three users' events and profiles in log order, with resends of any
    earlier event, erasures and profile tombstones."""
    pool: list[tuple[str, bytes]] = []
    for i in range(draw(st.integers(1, 12))):
        user = draw(st.sampled_from(["a", "a", "b", "c"]))
        at = T0 + timedelta(minutes=draw(st.integers(-3000, 3000)))
        kind = draw(st.sampled_from(["interaction"] * 4 + ["user.erased"]))
        fields: dict[str, Any] = {}
        if kind == "interaction":
            fields = {
                "type": draw(st.sampled_from(["reading", "chat", "feedback"])),
                "service": draw(st.sampled_from(["saju", "tarot"])),
            }
            if theme := draw(st.sampled_from([None, "love", "career"])):
                fields["theme"] = theme
            if rating := draw(st.sampled_from([None, 1, 4, 5])):
                fields["rating"] = rating
        pool.append((user, event(100 + i, user, kind, at, **fields)))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=30))
    records: list[Record] = []
    profiles = 0
    for i in picks:
        user, value = pool[i]
        records.append(Record("events", 0, len(records), user.encode(), value))
        if draw(st.booleans()):  # the stream's profile of the user, or its tombstone
            tombstone = draw(st.integers(0, 5)) == 0
            at = T0 + timedelta(minutes=draw(st.integers(0, 50)))
            primary = draw(st.sampled_from(["seeker", "explorer"]))
            value_ = (
                None
                if tombstone
                else profile_message(user, at, primary, draw(st.sampled_from([0.25, 0.5, 0.7])))
            )
            records.append(Record(P, 0, profiles, user.encode(), value_))
            profiles += 1
    return records


def reset(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            'TRUNCATE "UserInteraction", "UserPreferences", user_vectors, usertrail_seen_events, '
            "usertrail_positions"
        )


async def differences(database_url: str, tz: str, search_path: str | None = None) -> list[str]:
    """What ``reports.compare`` finds, over the tables ``search_path`` (by
    default the server's) finds first."""
    window = reports.Window.of(tz, days=6, since=WINDOW_START)
    options = "" if search_path is None else f"-c search_path={search_path}"
    async with await psycopg.AsyncConnection.connect(
        database_url, autocommit=True, options=options
    ) as conn:
        return await reports.compare(conn, window)


async def write_all(database_url: str, batches: list[list[Record]], group: str = "c") -> None:
    writer = Writer(database_url, group=group, profiles_topic=P)
    await writer.connect()
    try:
        for batch in batches:
            if batch:
                await writer.write(batch)
    finally:
        await writer.close()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    traffic(),
    st.lists(st.integers(1, 40), max_size=6),
    st.lists(st.integers(0, 6), max_size=3),
    st.sampled_from(ZONES),
)
def test_every_report_equals_the_seeds_sql_over_the_rows(
    database_url: str, log: list[Record], cuts: list[int], again: list[int], tz: str
) -> None:
    """Wherever the batches are cut, and with batches written again (a
    redelivery after a crash), every report from the rollups is what the
    seeds' SQL says over the rows, in any time zone."""
    reset(database_url)
    bounds = [0, *sorted({c for c in cuts if c < len(log)}), len(log)]
    batches = [log[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    for i in again:  # a batch delivered twice
        if i < len(batches):
            batches.insert(i + 1, batches[i])
    asyncio.run(write_all(database_url, batches))
    assert asyncio.run(differences(database_url, tz)) == []
    rows = query(database_url, 'SELECT count(*) FROM "UserInteraction"')[0][0]
    rolled = query(
        database_url, "SELECT coalesce(sum(interactions), 0) FROM usertrail_rollup_services"
    )
    assert rolled == [(rows,)]


async def test_two_writers_at_once_neither_wait_forever_nor_miscount(database_url: str) -> None:
    """Two sinks on different partitions change the same rollups in the same
    moments (erasures and inserts in one transaction, and event ids that
    both logs hold, as a foreign producer's copies can): nobody waits for
    long, and the rollups add up, before and after a compaction."""
    reset(database_url)

    def log(prefix: str, base: int) -> list[list[Record]]:
        batches = []
        for b in range(30):
            batch = []
            for i in range(20):
                n = base + b * 20 + i
                user = f"{prefix}{i % 5}"
                if i == 7 and b % 4 == 3:
                    value = event(n, user, "user.erased", T0 + timedelta(minutes=n))
                else:
                    value = event(
                        n,
                        user,
                        "interaction",
                        T0 + timedelta(minutes=n % 500),
                        type=["reading", "chat"][n % 2],
                        service=["saju", "tarot", "astrology"][n % 3],
                        theme=["love", "career"][n % 2],
                        rating=1 + n % 5,
                    )
                batch.append(Record("events", base, len(batches) * 20 + i, user.encode(), value))
            batches.append(batch)
        return batches

    await asyncio.wait_for(
        asyncio.gather(
            write_all(database_url, log("x", 1), group="one"),
            write_all(database_url, log("y", 2), group="two"),
        ),
        60,
    )
    assert await differences(database_url, "UTC") == []
    assert query(database_url, "SELECT sum(users) FROM usertrail_rollup_services")[0][0] > 0
    query(database_url, "SELECT usertrail_rollups_compact()")
    assert await differences(database_url, "UTC") == []
    one_each = "SELECT count(*) = count(DISTINCT service) FROM usertrail_rollup_services"
    assert query(database_url, one_each) == [(True,)]


def test_rows_already_there_are_counted_by_the_migration(database_factory: Any) -> None:
    """A database with rows before the rollups existed: the migration adds
    them up, and the reports equal the seeds' SQL at once."""
    url = database_factory()
    engine = engine_for(url)
    try:
        runner.upgrade(engine, "0008_api_keys")
        fill(url)
        runner.upgrade(engine)
        assert asyncio.run(differences(url, "Asia/Seoul")) == []
        assert query(url, SERVICES) == [("saju", 1, 1), ("tarot", 2, 1)]
        with psycopg.connect(url, autocommit=True) as conn:  # the product deletes a user
            conn.execute("""DELETE FROM "User" WHERE id = 'a'""")
        assert asyncio.run(differences(url, "UTC")) == []
        assert query(url, SERVICES) == [("saju", 1, 1)]
    finally:
        engine.dispose()


async def test_a_database_migrated_before_the_rollups_still_gets_its_rows(
    database_factory: Any,
) -> None:
    """A sink newer than its database's schema (0008, no rollups) writes its
    rows and says once what to run; it does not stop."""
    url = database_factory()
    engine = engine_for(url)
    runner.upgrade(engine, "0008_api_keys")
    engine.dispose()
    reading = {"type": "reading", "service": "tarot"}
    await write_all(
        url,
        [
            [Record("events", 0, 0, b"a", event(1, "a", "interaction", T0, **reading))],
            [Record("events", 0, 1, b"a", event(2, "a", "interaction", T0, **reading))],
        ],
    )
    assert query(url, 'SELECT count(*) FROM "UserInteraction"') == [(2,)]


async def test_a_delete_and_a_writer_adding_rows_of_the_same_user_meet(
    database_factory: Any,
) -> None:
    """The last rows of a (service, user) pair deleted while another
    transaction adds one of that pair: whichever commits first, the other
    waits for it, and distinct users per service follow the rows."""
    url = database_factory()
    engine = engine_for(url)
    runner.upgrade(engine)
    engine.dispose()
    fill(url)  # a: two tarot rows, b: one saju row
    add = (
        'INSERT INTO "UserInteraction" (id, "userId", "createdAt", type, service) '
        "VALUES (%s, 'a', now(), 'chat', 'tarot')"
    )
    drop = """DELETE FROM "UserInteraction" WHERE "userId" = 'a' AND service = 'tarot'"""
    connect = psycopg.AsyncConnection.connect

    # the writer's row first: the delete waits for it, then sees it
    async with await connect(url) as writer, await connect(url, autocommit=True) as deleter:
        await writer.execute(add, ("4",))
        delete = asyncio.create_task(deleter.execute(drop + " AND id IN ('1', '2')"))
        await asyncio.sleep(0.5)
        assert not delete.done()
        await writer.commit()
        await asyncio.wait_for(delete, 10)
    assert await differences(url, "UTC") == []
    assert query(url, SERVICES) == [("saju", 1, 1), ("tarot", 1, 1)]

    # the delete first: the writer waits for it, then adds the pair again
    async with await connect(url) as deleter, await connect(url, autocommit=True) as writer:
        await deleter.execute(drop)
        insert = asyncio.create_task(writer.execute(add, ("5",)))
        await asyncio.sleep(0.5)
        assert not insert.done()
        await deleter.commit()
        await asyncio.wait_for(insert, 10)
    assert await differences(url, "UTC") == []
    assert query(url, SERVICES) == [("saju", 1, 1), ("tarot", 1, 1)]


def test_rows_written_into_another_schema_fold_into_its_own_rollups(
    database_factory: Any,
) -> None:
    """Shadow tables (replay db's) written from a session whose search path
    names another schema first: their rollups move (interactions and
    segments), the live ones do not."""
    url = database_factory()
    engine = engine_for(url)
    try:
        runner.upgrade(engine)
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql('CREATE SCHEMA "elsewhere"')
            runner.upgrade_into(conn, "elsewhere")
    finally:
        engine.dispose()
    fill(url)  # the live tables: a (two tarot rows) and b (one saju row)
    live = query(url, SERVICES)
    with psycopg.connect(url, autocommit=True) as conn:  # search path: public first
        conn.execute(
            'INSERT INTO elsewhere."UserInteraction" (id, "userId", "createdAt", type, service) '
            "VALUES ('9', 'a', now(), 'chat', 'astrology'), ('10', 'b', now(), 'chat', 'saju'), "
            "('11', 'b', now(), 'chat', 'saju')"
        )
        conn.execute("""DELETE FROM elsewhere."UserInteraction" WHERE id = '10'""")
        conn.execute(
            'INSERT INTO elsewhere.user_vectors (id, "userId", "updatedAt", segments, '
            "\"primarySegment\", \"segmentConfidence\") VALUES ('b', 'b', now(), '[]', 'seeker', 0.5)"
        )
        conn.execute("SET search_path TO elsewhere, public")
        assert conn.execute(SERVICES).fetchall() == [("astrology", 1, 1), ("saju", 1, 1)]
    assert asyncio.run(differences(url, "UTC", search_path="elsewhere,public")) == []
    assert query(url, SERVICES) == live
    assert asyncio.run(differences(url, "UTC")) == []
