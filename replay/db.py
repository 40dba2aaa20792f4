"""``replay db`` and the database half of ``verify``: the sink's projections
rebuilt from the topics into shadow tables.

The shadow tables are made by the migrations themselves in the schema
``usertrail_shadow`` (their references to the product's ``"User"`` resolve to
the live table), so their columns, defaults, indexes and constraints are the
live ones, names included. The very ``Sink`` writes them, through a
connection whose search_path puts the shadow schema first, from the start of
``usertrail.events`` and ``usertrail.profiles`` up to the high-water marks
found at the start. ``swap`` then moves the live tables out and the shadow
tables in within one transaction, so readers see the old tables or the new
ones, never a half-built one; ``compare`` lists what differs instead.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from aiokafka import AIOKafkaConsumer
from psycopg.conninfo import make_conninfo
from usertrail.migrations import runner
from usertrail.migrations.models import ROLLUP_TABLES
from usertrail.sink.consumer import GROUP, Sink, SinkOptions

from usertrail import deadletters, liveness
from usertrail.errors import UsertrailError
from usertrail.kafka import high_waters, partitions_of, stop_within
from usertrail.settings import Settings

log = logging.getLogger("usertrail.rebuild")

SHADOW = "usertrail_shadow"
REPLACED = "usertrail_replaced"
REBUILT = (
    "UserInteraction",
    "UserPreferences",
    "user_vectors",
    "usertrail_seen_events",
    "usertrail_positions",
    *ROLLUP_TABLES,
)
"""Swapped in: the projections, their rollups (kept by triggers as the
shadow tables were written) and the positions they were written up to."""

# What identifies a row, and the columns compared (what the log decides:
# ids and createdAt the database gives by default are left out)
COMPARED: dict[str, tuple[str, tuple[str, ...]]] = {
    "UserInteraction": (
        "id",
        ("userId", "createdAt", "type", "service", "theme", "rating", "metadata"),
    ),
    "UserPreferences": (
        "userId",
        (
            "updatedAt",
            "preferredLanguage",
            "preferredThemes",
            "preferredServices",
            "notificationSettings",
            "readingLength",
            "tonePreference",
        ),
    ),
    "user_vectors": (
        "userId",
        ("vector", "segments", "primarySegment", "segmentConfidence", "lastSegmentUpdate"),
    ),
}


@dataclass
class TableDiff:
    table: str
    live: int
    rebuilt: int
    only_live: list[str] = field(default_factory=list)  # the first keys of each kind
    only_rebuilt: list[str] = field(default_factory=list)
    differ: list[str] = field(default_factory=list)
    # how many keys of each kind there are in all
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def same(self) -> bool:
        return not (self.only_live or self.only_rebuilt or self.differ)

    @property
    def differing(self) -> int:
        return sum(self.totals.values())


def _shadow_dsn(dsn: str, schema: str) -> str:
    return make_conninfo(dsn, options=f"-c search_path={schema},public")


def make_shadow(settings: Settings, schema: str = SHADOW) -> None:
    engine = runner.make_engine(settings)
    try:
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
            runner.upgrade_into(conn, schema)
            # the rebuild archives into the live archive (public, next on the
            # search path): the records it reads are the log's own
            conn.exec_driver_sql(f'DROP TABLE "{schema}".usertrail_archive')
    finally:
        engine.dispose()


async def _ends(settings: Settings) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(**settings.kafka_options(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        ends: dict[tuple[str, int], int] = {}
        for topic in (settings.events_topic, settings.profiles_topic):
            tps = await partitions_of(consumer, topic)
            if not tps:
                raise UsertrailError(f"topic {topic!r} does not exist")
            consumer.assign(tps)
            for p, end in (await high_waters(consumer, tps)).items():
                ends[(topic, p)] = end
        return ends
    finally:
        await stop_within(consumer, 10, "consumer")


async def build(
    settings: Settings,
    *,
    schema: str = SHADOW,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write the projections of the topics, up to their current ends, into
    ``schema`` with the sink; returns the consumer name its positions carry."""
    ends = await _ends(settings)
    group = f"usertrail-replay-db-{uuid.uuid4().hex[:12]}"
    dsn = _shadow_dsn(settings.database_dsn(), schema)
    sink = Sink(settings, SinkOptions(group=group, publish_dead_letters=False), dsn=dsn)
    task = asyncio.create_task(sink.run())
    total = sum(ends.values())
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while True:
                if task.done():
                    task.result()
                    raise UsertrailError("the sink stopped before the rebuild was complete")
                rows = await (
                    await conn.execute(
                        "SELECT topic, partition, next_offset FROM usertrail_positions "
                        "WHERE consumer = %s",
                        (group,),
                    )
                ).fetchall()
                at = {(t, p): o for t, p, o in rows}
                done = sum(min(at.get(k, 0), end) for k, end in ends.items())
                if progress is not None:
                    progress(done, total)
                if done >= total:
                    break
                await asyncio.sleep(0.2)
    finally:
        sink.stop()
        await asyncio.wait_for(task, 60)
    return group


def swap(settings: Settings, group: str, live_group: str = GROUP, schema: str = SHADOW) -> None:
    """The rebuilt tables in, the live ones out, in one transaction. Dead
    letters found again are merged into the live table; the positions are
    handed to the live sink's group, so it carries on after the rebuilt point."""
    with psycopg.connect(settings.database_dsn()) as conn:
        for table in REBUILT:
            conn.execute(f'LOCK TABLE public."{table}" IN ACCESS EXCLUSIVE MODE')
        copied = deadletters.columns(deadletters.COPIED)
        conn.execute(
            f"INSERT INTO public.usertrail_dead_letters ({copied}) "
            f'SELECT {copied} FROM "{schema}".usertrail_dead_letters '
            'ON CONFLICT (topic, partition, "offset") DO NOTHING'
        )
        conn.execute(f'DELETE FROM "{schema}".usertrail_positions WHERE consumer <> %s', (group,))
        conn.execute(f'UPDATE "{schema}".usertrail_positions SET consumer = %s', (live_group,))
        conn.execute(f'DROP SCHEMA IF EXISTS "{REPLACED}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{REPLACED}"')
        for table in REBUILT:
            conn.execute(f'ALTER TABLE public."{table}" SET SCHEMA "{REPLACED}"')
            conn.execute(f'ALTER TABLE "{schema}"."{table}" SET SCHEMA public')
        conn.commit()
        conn.execute(f'DROP SCHEMA "{REPLACED}" CASCADE')
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.commit()


def drop_shadow(settings: Settings, schema: str = SHADOW) -> None:
    with psycopg.connect(settings.database_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def live_rows(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.database_dsn()) as conn:
        return {
            t: int(conn.execute(f'SELECT count(*) FROM public."{t}"').fetchone()[0])  # type: ignore[index]
            for t in COMPARED
        }


def compare(settings: Settings, schema: str = SHADOW, limit: int = 1000) -> list[TableDiff]:
    """Live against rebuilt, per table: true totals of the keys only live,
    only rebuilt and on both sides with other values; the first ``limit``
    keys of each."""
    out = []
    with psycopg.connect(settings.database_dsn()) as conn:

        def one(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])  # type: ignore[index]

        for table, (key, columns) in COMPARED.items():
            cols = ", ".join(f'"{c}"' for c in (key, *columns))
            live = f'SELECT {cols} FROM public."{table}"'
            rebuilt = f'SELECT {cols} FROM "{schema}"."{table}"'
            diff = TableDiff(
                table,
                one(f'SELECT count(*) FROM public."{table}"'),
                one(f'SELECT count(*) FROM "{schema}"."{table}"'),
            )
            left = f"({live} EXCEPT {rebuilt})"
            right = f"({rebuilt} EXCEPT {live})"
            both = f'SELECT "{key}" FROM {left} l INTERSECT SELECT "{key}" FROM {right} r'
            in_both = one(f"SELECT count(*) FROM ({both}) b")
            diff.totals = {
                "differ": in_both,
                "only_live": one(f"SELECT count(*) FROM {left} l") - in_both,
                "only_rebuilt": one(f"SELECT count(*) FROM {right} r") - in_both,
            }
            diff.differ = [str(r[0]) for r in conn.execute(f"{both} ORDER BY 1 LIMIT {limit}")]
            for name, side in (("only_live", left), ("only_rebuilt", right)):
                keys = conn.execute(
                    f'SELECT "{key}" FROM {side} s EXCEPT ({both}) ORDER BY 1 LIMIT {limit}'
                )
                setattr(diff, name, [str(r[0]) for r in keys])
            out.append(diff)
    return out


def refuse_to_shrink(settings: Settings, schema: str = SHADOW) -> None:
    """Refuse a rebuild that holds fewer rows than a live table (a log that
    was reset or emptied would wipe the tables): print the counts and the
    first keys that would go."""
    shrunk = []
    with psycopg.connect(settings.database_dsn()) as conn:
        for table, (key, _) in COMPARED.items():
            live = int(conn.execute(f'SELECT count(*) FROM public."{table}"').fetchone()[0])  # type: ignore[index]
            built = int(conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone()[0])  # type: ignore[index]
            if built < live:
                keys = [
                    str(r[0])
                    for r in conn.execute(
                        f'SELECT "{key}" FROM public."{table}" EXCEPT '
                        f'SELECT "{key}" FROM "{schema}"."{table}" ORDER BY 1 LIMIT 5'
                    )
                ]
                shrunk.append(f"{table} {live:,} -> {built:,} (gone: {', '.join(keys)}, ...)")
    if shrunk:
        raise UsertrailError(
            "refusing to swap in tables rebuilt from a log that holds less than the live ones: "
            + "; ".join(shrunk)
            + ". Was the log reset or emptied? Restore it (`usertrail up` restores the embedded "
            "broker's; `usertrail log restore`), or pass --allow-shrink if those rows should go"
        )


def refuse_unless_empty(settings: Settings) -> None:
    counts = live_rows(settings)
    if any(counts.values()):
        raise UsertrailError(
            f"--in-place needs empty tables; these have rows: "
            f"{', '.join(f'{t} ({n:,})' for t, n in counts.items() if n)}. "
            "Without --in-place the rebuild goes to shadow tables and is swapped in."
        )


def hand_over(settings: Settings, group: str, live_group: str) -> None:
    """The positions the rebuild wrote, as the live sink group's."""
    with psycopg.connect(settings.database_dsn()) as conn:
        conn.execute("DELETE FROM usertrail_positions WHERE consumer = %s", (live_group,))
        conn.execute(
            "UPDATE usertrail_positions SET consumer = %s WHERE consumer = %s", (live_group, group)
        )
        conn.commit()


def replay_db(
    settings: Settings,
    *,
    group: str = GROUP,
    in_place: bool = False,
    allow_shrink: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """``usertrail replay db``: the projections rebuilt from the topics and
    swapped in (``in_place``: written straight into empty live tables); the
    live tables' row counts after it. Refuses while sinks of ``group`` run,
    and, unless ``allow_shrink``, to swap in fewer rows than the live
    tables hold."""

    async def refuse() -> None:
        await liveness.refuse_if_live(settings, group, "sink", "usertrail sink")

    asyncio.run(refuse())
    if in_place:
        refuse_unless_empty(settings)
        built = asyncio.run(build(settings, schema="public", progress=progress))
        hand_over(settings, built, group)
        return live_rows(settings)
    make_shadow(settings)
    try:
        built = asyncio.run(build(settings, progress=progress))
        if not allow_shrink:
            refuse_to_shrink(settings)
        asyncio.run(refuse())  # none started meanwhile
        swap(settings, built, group)
    except BaseException:
        drop_shadow(settings)
        raise
    return live_rows(settings)


def verify_db(settings: Settings, limit: int = 1000) -> list[TableDiff]:
    """The database half of ``usertrail verify``: the projections rebuilt
    into scratch shadow tables and compared with the live ones (nothing
    live is written)."""
    make_shadow(settings)
    try:
        asyncio.run(build(settings))
        return compare(settings, limit=limit)
    finally:
        drop_shadow(settings)
