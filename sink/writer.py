"""Writes a batch of records to PostgreSQL in one transaction.

A batch is first *prepared* (decoded, planned, its COPY data built: CPU work
that yields to the event loop as it goes, so the sink prepares the next batch
while PostgreSQL writes this one), then *applied* in one transaction.

Written together, in this order, so that a crash anywhere leaves either all
of it or none of it (docs/architecture.md, rule 2):

1. the users the events need ("create" mode) or the parking of events of
   unknown users ("park" mode);
2. erasures (the user's interactions and preferences; the vector is the
   profiles topic's to delete, by the tombstone the stream publishes, so
   that ``user_vectors`` follows that one topic's order alone);
3. interactions, by COPY straight into "UserInteraction" inside a savepoint;
   a redelivered batch hits the primary key, and then the rows go through
   a staging table and ``INSERT ... ON CONFLICT (id) DO NOTHING``;
4. preferences, one conditional upsert per event in log order (newer over
   older, only the fields the event carries);
5. dead letters (idempotent by topic, partition and offset);
6. the next offset of every partition in the batch.

A database error that retrying cannot fix (bad data the contract let
through, such as a NUL character inside metadata) is isolated by splitting
the batch until the one record is found; it becomes a dead letter with
reason ``unapplicable`` and everything else is written.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Literal
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from usertrail.producers.events import Interaction, PreferencesUpdated, UserErased
from usertrail.producers.profiles import ProfileMessage, decode_profile
from usertrail.sink.plan import (
    INVALID,
    UNKNOWN_USER,
    WRONG_KEY,
    DeadLetter,
    Decoded,
    Record,
    WritePlan,
    classify,
    plan,
)
from usertrail.sink.rows import (
    BINARY_HEADER,
    BINARY_TRAILER,
    FastRow,
    binary_row,
    profile_copy_line,
)

from usertrail import deadletters
from usertrail.archive import encode
from usertrail.errors import EventValidationError
from usertrail.topics import is_home

log = logging.getLogger("usertrail.sink")

UNAPPLICABLE = "unapplicable"
UnknownUsers = Literal["create", "park"]

_COPY_COLUMNS = '(id, "userId", "createdAt", type, service, theme, rating, metadata)'
_BINARY = "FROM STDIN (FORMAT binary)"  # the rows of sink/rows.py
_PREFERENCE_COLUMNS = {
    "preferredLanguage": False,  # column: is it JSONB
    "preferredThemes": True,
    "preferredServices": True,
    "notificationSettings": True,
    "readingLength": False,
    "tonePreference": False,
}


def classify_profile(record: Record) -> tuple[str, ProfileMessage | None] | DeadLetter:
    """A ``usertrail.profiles`` record: (user, message), (user, None) for a
    tombstone, or a dead letter."""
    if record.key is None:
        return DeadLetter(record, INVALID, "profile record without a key (user id)")
    user = record.key.decode(errors="replace")
    if record.value is None:
        return user, None
    try:
        message = decode_profile(record.value)
    except EventValidationError as exc:
        return DeadLetter(record, INVALID, str(exc), None, user)
    if message.user_id != user:
        return DeadLetter(
            record, WRONG_KEY, f"profile of {message.user_id!r} keyed {user!r}", None, user
        )
    return user, message


# Event ids (UUIDs, the contract's pattern: never a comma) as one parameter:
# psycopg would turn a list of 5,000 into an array one element at a time, in
# Python, a tenth of the sink's CPU per row.
_IDS = "string_to_array(%s, ',')"


@dataclass
class _ProfileWrite:
    """What a batch does to one user's ``user_vectors`` row."""

    record: Record
    message: ProfileMessage | None  # the newest message (event time) after `erased`
    erased: bool  # a tombstone came first: delete, then write `message` if any


def _merge_profile(
    profiles: dict[str, _ProfileWrite], record: Record, user: str, message: ProfileMessage | None
) -> None:
    current = profiles.get(user)
    if message is None:
        profiles[user] = _ProfileWrite(record, None, True)
    elif current is None:
        profiles[user] = _ProfileWrite(record, message, False)
    elif current.message is None or current.message.updated_at <= message.updated_at:
        profiles[user] = _ProfileWrite(record, message, current.erased)
    # else: an older message than one already in the batch: the newer stands


COMPACT_SECONDS = 5.0
"""How often a writer folds the analytics rollups back to a row per key
(migration 0009: triggers append a row per key and statement)."""
DEADLOCK_RETRIES = 5

_SLICE = 16
"""Records prepared between two yields to the event loop. Every round trip of
the batch being written waits for the next yield (its COPY data, the
statements after it, the commit), and PostgreSQL idles meanwhile: slices of
128 records (about a millisecond) cost about a tenth of the sink's rate
against slices of 16 (bench/sink_rate.py, paired rounds)."""


@dataclass
class Prepared:
    """A batch made ready for its transaction (no I/O went into it)."""

    records: Sequence[Record]
    positions: dict[tuple[str, int], int]  # the next offset of each partition
    dead_letters: list[DeadLetter]  # found while decoding
    decoded: list[Decoded]
    profiles: dict[str, _ProfileWrite]
    plan: WritePlan
    copy: bytes  # COPY data (binary) of plan.interactions, each event id once
    copied: int  # rows in `copy`
    archive: list[ArchiveRow] = field(default_factory=list)  # where the log is archived
    # what was decided of each record before decoding (sink/careful.py), kept
    # for a batch the database refuses and that is written again in parts
    classified: Sequence[Decoded | DeadLetter | None] | None = None


@dataclass
class WriteResult:
    records: int = 0
    interactions: int = 0  # rows inserted (duplicates excluded)
    preferences: int = 0
    vectors: int = 0
    erased: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, other: WriteResult) -> None:
        """Account ``other`` (a later or sibling batch) into this one."""
        self.records += other.records
        self.interactions += other.interactions
        self.preferences += other.preferences
        self.vectors += other.vectors
        self.erased += other.erased
        self.dead_letters += other.dead_letters
        for key, offset in other.positions.items():
            self.positions[key] = max(self.positions.get(key, 0), offset)


ArchiveRow = tuple[str, int, int, int, int, bytes]
"""topic, partition, first offset, last offset, records, data"""


_offset_of = operator.attrgetter("offset")


async def _archive_rows(
    records: Sequence[Record], archived_to: dict[tuple[str, int], int]
) -> list[ArchiveRow]:
    """A batch's records as usertrail_archive rows: one per partition, the
    records in usertrail.archive's encoding; records below ``archived_to``
    (archived already) left out."""
    by_partition: dict[tuple[str, int], list[Record]] = {}
    for r in records:
        if r.offset >= archived_to.get((r.topic, r.partition), 0):
            by_partition.setdefault((r.topic, r.partition), []).append(r)
    rows = []
    for (topic, partition), part in by_partition.items():
        part.sort(key=_offset_of)
        rows.append((topic, partition, part[0].offset, part[-1].offset, len(part), encode(part)))
        await asyncio.sleep(0)
    return rows


VECTOR_COLUMNS = (
    "id",
    "userId",
    "vector",
    "createdAt",
    "updatedAt",
    "segments",
    "primarySegment",
    "segmentConfidence",
    "lastSegmentUpdate",
)
"""A ``user_vectors`` row as ``vectors_upsert`` takes it (the id is the user's)."""
_SEGMENT_COLUMNS = VECTOR_COLUMNS[5:]


def _vectors_upsert_tail(*, segments_only: bool) -> str:
    updated = _SEGMENT_COLUMNS if segments_only else ("vector", "updatedAt", *_SEGMENT_COLUMNS)
    sql = 'ON CONFLICT ("userId") DO UPDATE SET ' + ", ".join(
        f'"{c}" = EXCLUDED."{c}"' for c in updated
    )
    if not segments_only:
        sql += ' WHERE user_vectors."updatedAt" <= EXCLUDED."updatedAt"'
    return sql


_VECTOR_NAMES = ", ".join(f'"{c}"' for c in VECTOR_COLUMNS)
_VECTOR_COPY = f"({_VECTOR_NAMES})"
_VECTORS_FROM_STAGING = (
    f"INSERT INTO user_vectors {_VECTOR_COPY} SELECT {_VECTOR_NAMES} "
    # one order for every writer: two sinks meeting on the same users lock
    # them in the same order
    f'FROM usertrail_vector_staging ORDER BY "userId" ' + _vectors_upsert_tail(segments_only=False)
)
"""The batch's profiles, copied into the staging table, upserted as
``vectors_upsert`` does one row."""


def vectors_upsert(*, segments_only: bool = False) -> str:
    """The one upsert of ``user_vectors``, a row of ``VECTOR_COLUMNS`` per
    user. The sink's (default): the profile's whole row, a newer profile
    (by event time, ``updatedAt``) over an older one. ``segments_only``:
    seed 002's data migration ("update UserVector with segment data",
    ``segments backfill``): a row that exists keeps its vector and times,
    whatever they are, and gets the segment columns."""
    values = ", ".join(["%s"] * len(VECTOR_COLUMNS))
    return f"INSERT INTO user_vectors {_VECTOR_COPY} VALUES ({values}) " + _vectors_upsert_tail(
        segments_only=segments_only
    )


class Writer:
    """Owns one connection; ``write`` is one batch, one transaction."""

    def __init__(
        self,
        conninfo: str,
        *,
        group: str,
        unknown_users: UnknownUsers = "create",
        profiles_topic: str | None = None,
        archive: bool = False,
        outbox: bool = False,
    ) -> None:
        self._conninfo = conninfo
        # Keep every record read in usertrail_archive, in the batch's
        # transaction (docs/log.md); and the id of each topic read from,
        # stored with the positions (set by the consumer once it has asked).
        self.archive = archive
        self._archived_to: dict[tuple[str, int], int] = {}
        # dead letters written "unpublished", for the sink to put on the
        # dead-letter topic (sink/consumer.py, _publish_dead_letters)
        self.outbox = outbox
        self.topic_ids: dict[str, UUID] = {}
        # Per events topic, the partition count homes are taken over
        # (usertrail/topics.py, set by the consumer): a record away from its
        # key's home is passed over here, since the stream copies it there
        # and this writes the copy in the home's order. Unknown: written
        # where it is (its copy is then a resend, and changes nothing).
        self.homes: dict[str, int] = {}
        self.profiles_topic = profiles_topic
        # whose positions and in-flight marks these are: the sink's group
        # (usertrail_positions.consumer)
        self.group = group
        self.unknown_users = unknown_users
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._compacted_at = 0.0
        # Users known to exist in "User" (created or seen by this writer): not
        # inserted again. If the product deletes one, the foreign key says so,
        # and the cache is dropped and the batch written again.
        self._known_users: set[str] = set()
        self._marks: psycopg.AsyncConnection[Any] | None = None  # mark_in_flight's
        self._connecting = asyncio.Lock()  # the fetch and write loops both connect

    async def connect(self) -> None:
        """The writer's connection, opened (again) if it is not open: one at
        a time, and in use only once its staging table is made."""
        async with self._connecting:
            if self._conn is not None and not self._conn.closed:
                return
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=False)
            try:
                await conn.execute(
                    'CREATE TEMP TABLE usertrail_staging (LIKE "UserInteraction" '
                    "INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                await conn.execute(
                    "CREATE TEMP TABLE usertrail_vector_staging (LIKE user_vectors) "
                    "ON COMMIT DELETE ROWS"
                )
                if self.archive:  # where the archive ends (`replay db` reads from the start)
                    rows = await (
                        await conn.execute(
                            "SELECT topic, partition, max(last_offset) + 1 FROM usertrail_archive "
                            "GROUP BY topic, partition"
                        )
                    ).fetchall()
                    self._archived_to = {(t, p): int(end) for t, p, end in rows}
                await conn.commit()
            except BaseException:
                await conn.close()
                raise
            self._conn = conn

    async def close_broken(self) -> None:
        """After a database error: close the connections it broke (the next
        ``connect`` or mark opens new ones). A connection is never taken
        away from under the other loop: the fetch loop's failed mark once
        closed the writer's connection mid-batch, and the write loop failed
        on ``connect() first`` instead of retrying."""
        for conn in (self._conn, self._marks):
            if conn is not None and conn.broken:
                await conn.close()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        if self._marks is not None:
            await self._marks.close()
            self._marks = None

    @property
    def conninfo(self) -> str:
        return self._conninfo

    @property
    def conn(self) -> psycopg.AsyncConnection[Any]:
        assert self._conn is not None, "connect() first"
        return self._conn

    async def positions(
        self, topic: str, partitions: Sequence[int] | None
    ) -> dict[int, tuple[int, UUID | None]]:
        """Stored next offsets (of ``partitions``; None: all) and the id of
        the topic they were read from. On a connection of its own: the
        consumer's assignment listener asks while the write loop may be
        inside a batch's transaction on the writer's (after a database
        restart that broke the listener: #20)."""
        rows = await self._aside(
            "SELECT partition, next_offset, topic_id FROM usertrail_positions "
            "WHERE consumer = %s AND topic = %s "
            "AND (%s::int[] IS NULL OR partition = ANY(%s::int[]))",
            (self.group, topic, *[partitions and list(partitions)] * 2),
        )
        return {int(p): (int(o), t) for p, o, t in rows}

    async def _aside(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """A query on a connection of its own (not inside a batch's transaction)."""
        async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
            return await (await conn.execute(query, params)).fetchall()

    async def in_flight(
        self, topic: str, partitions: Sequence[int]
    ) -> dict[int, tuple[int, int, int]]:
        """What this consumer last had in flight on each partition: (first
        offset, last offset, attempts). Read beside the positions."""
        rows = await self._aside(
            "SELECT partition, first_offset, last_offset, attempts FROM usertrail_in_flight "
            "WHERE consumer = %s AND topic = %s AND partition = ANY(%s::int[])",
            (self.group, topic, list(partitions)),
        )
        return {int(p): (int(f), int(last), int(a)) for p, f, last, a in rows}

    async def mark_in_flight(self, ranges: dict[tuple[str, int], tuple[int, int]]) -> None:
        """Before a batch is decoded: per partition, the first and last
        offset it holds. The same range marked again counts one more
        attempt. Committed at once, on a connection of its own (the write
        loop may be inside a batch's transaction on the writer's)."""
        if not ranges:
            return
        if self._marks is None or self._marks.closed:
            self._marks = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        async with self._marks.transaction(), self._marks.cursor() as cur:
            await cur.executemany(
                "INSERT INTO usertrail_in_flight AS f "
                "(consumer, topic, partition, first_offset, last_offset) "
                "VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (consumer, topic, partition) DO UPDATE SET "
                "attempts = CASE WHEN f.first_offset = EXCLUDED.first_offset "
                "AND f.last_offset = EXCLUDED.last_offset THEN f.attempts + 1 ELSE 1 END, "
                "first_offset = EXCLUDED.first_offset, last_offset = EXCLUDED.last_offset",
                [(self.group, t, p, first, last) for (t, p), (first, last) in ranges.items()],
            )

    async def forget_positions(self, topic: str) -> int:
        """Start over on ``topic``: its positions belong to a log that is
        gone. That log's archived records are kept, under the name
        ``<topic>@superseded-<time>``, not restored again."""
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.execute(
                "DELETE FROM usertrail_positions WHERE consumer = %s AND topic = %s",
                (self.group, topic),
            )
            forgotten = cur.rowcount
            await cur.execute(  # what was in flight belongs to the old log too
                "DELETE FROM usertrail_in_flight WHERE consumer = %s AND topic = %s",
                (self.group, topic),
            )
            if self.archive:
                self.forget_archived(topic)
                await cur.execute(
                    "UPDATE usertrail_archive SET topic = topic || '@superseded-' || "
                    "to_char(now(), 'YYYYMMDD\"T\"HH24MISS') WHERE topic = %s",
                    (topic,),
                )
        return forgotten

    def forget_archived(self, topic: str) -> None:
        """Where ``topic``'s archive ended: forgotten with its positions (its
        rows are renamed; the new log's are archived from its start)."""
        self._archived_to = {k: v for k, v in self._archived_to.items() if k[0] != topic}

    # --- one batch ------------------------------------------------------------------
    async def write(
        self,
        records: Sequence[Record],
        *,
        positions: bool = True,
        classified: Sequence[Decoded | DeadLetter | None] | None = None,
    ) -> WriteResult:
        """Write a batch (records in log order per partition) in one transaction.
        Connection errors propagate (the caller retries the same batch).
        ``positions=False`` (re-driving dead letters) leaves positions alone;
        ``classified`` is ``classify`` of each record, if already done."""
        return await self.apply(await self.prepare(records, classified=classified), positions)

    async def apply(self, prepared: Prepared, positions: bool = True) -> WriteResult:
        """Write a prepared batch in one transaction (see ``write``); the same
        ``prepared`` may be applied again after a connection error."""
        try:
            try:
                result = await self._apply_retrying(prepared, positions)
            except psycopg.errors.ForeignKeyViolation:
                if not self._known_users:
                    raise
                self._known_users.clear()  # a user was deleted meanwhile
                result = await self._apply_retrying(prepared, positions)
            await self._compact()
            return result
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # Bad data, not a bad database: find the record and dead-letter it.
            # (A ProgrammingError is a missing schema or our bug: it stops us.)
            return await self._isolate(prepared.records, exc, positions, prepared.classified)

    async def _apply_retrying(self, prepared: Prepared, positions: bool) -> WriteResult:
        """A transaction PostgreSQL chose as a deadlock's victim is written
        again (two writers' rows of one user, or one event id in two
        partitions, met in opposite orders)."""
        for attempt in range(1, DEADLOCK_RETRIES):
            try:
                return await self._apply(prepared, positions)
            except psycopg.errors.DeadlockDetected:
                log.info("a deadlock with another writer; writing the batch again")
                await asyncio.sleep(0.05 * attempt)
        return await self._apply(prepared, positions)  # the last try raises what it meets

    async def _compact(self) -> None:
        """The rollups' rows back to one per key, every few seconds, in a
        transaction of its own (it waits for nobody: triggers only append)."""
        now = asyncio.get_running_loop().time()
        if now - self._compacted_at < COMPACT_SECONDS:
            return
        self._compacted_at = now
        try:
            async with self.conn.transaction():
                await self.conn.execute("SELECT usertrail_rollups_compact()")
        except psycopg.errors.UndefinedFunction:
            # a database migrated before the rollups: the rows are written
            # all the same; the analytics wait for `usertrail db migrate`
            log.warning(
                "the database has no analytics rollups (migration 0009_rollups): "
                "run `usertrail db migrate`"
            )
            self._compacted_at = float("inf")

    async def prepare(
        self,
        records: Sequence[Record],
        *,
        classified: Sequence[Decoded | DeadLetter | None] | None = None,
        unapplicable: str | None = None,
    ) -> Prepared:
        """Decode (unless ``classified``), plan and build the COPY data of a
        batch, yielding to the event loop every few hundred records."""
        found: dict[tuple[str, int], int] = {}
        dead: list[DeadLetter] = []
        decoded: list[Decoded] = []
        profiles: dict[str, _ProfileWrite] = {}
        for i, record in enumerate(records):
            if i % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)
            key = (record.topic, record.partition)
            if record.offset >= found.get(key, 0):
                found[key] = record.offset + 1
            if unapplicable is not None:
                dead.append(DeadLetter(record, UNAPPLICABLE, unapplicable))
                continue
            if not is_home(record.key, record.partition, self.homes.get(record.topic)):
                continue  # written as its copy, at its home
            item = classified[i] if classified is not None else None
            if isinstance(item, DeadLetter):  # never decoded (sink/careful.py)
                dead.append(item)
                continue
            if record.topic == self.profiles_topic:
                profile = classify_profile(record)
                if isinstance(profile, DeadLetter):
                    dead.append(profile)
                else:
                    _merge_profile(profiles, record, *profile)
                continue
            if item is None:
                item = classify(record)
            if isinstance(item, DeadLetter):
                dead.append(item)
            else:
                decoded.append(item)
        write_plan, copy, copied = await self._plan(decoded)
        archive = await _archive_rows(records, self._archived_to) if self.archive else []
        return Prepared(
            records, found, dead, decoded, profiles, write_plan, copy, copied, archive, classified
        )

    @staticmethod
    async def _plan(decoded: list[Decoded]) -> tuple[WritePlan, bytes, int]:
        write_plan = plan([d.event for d in decoded])
        seen: set[str] = set()
        lines = []
        for e in write_plan.interactions:  # an app that sent an event twice: one row
            if e.event_id not in seen:
                seen.add(e.event_id)
                lines.append(e.row if isinstance(e, FastRow) else binary_row(e))
                if len(lines) % _SLICE == 0:
                    await asyncio.sleep(0)
        if not lines:
            return write_plan, b"", 0
        return write_plan, b"".join((BINARY_HEADER, *lines, BINARY_TRAILER)), len(lines)

    async def _apply(self, prepared: Prepared, positions: bool) -> WriteResult:
        conn = self.conn
        async with conn.transaction():
            async with conn.cursor() as cur:
                if positions:
                    prepared = await self._fenced(cur, prepared)
                result = WriteResult(
                    records=len(prepared.records),
                    dead_letters=list(prepared.dead_letters),
                    positions=dict(prepared.positions),
                )
                decoded, profiles = prepared.decoded, prepared.profiles
                write_plan, copy, copied = prepared.plan, prepared.copy, prepared.copied
                if self.unknown_users == "park":
                    known = await self._existing_users(
                        cur,
                        {d.event.user_id for d in decoded}
                        | {u for u, w in profiles.items() if w.message is not None},
                    )
                    kept = self._park_unknown(known, decoded, result)
                    profiles = self._park_profiles(known, profiles, result)
                else:
                    kept = decoded
                kept = await self._not_resent(cur, kept)
                if len(kept) != len(decoded):
                    write_plan, copy, copied = await self._plan(kept)
                users = write_plan.users | {u for u, w in profiles.items() if w.message is not None}
                new_users = users - self._known_users
                if self.unknown_users == "create" and new_users:
                    await cur.execute(
                        'INSERT INTO "User" (id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING',
                        (sorted(new_users),),
                    )
                await self._erase(cur, write_plan, result)
                await self._interactions(cur, copy, copied, result)
                await self._preferences(cur, write_plan.preferences, result)
                await self._profiles(cur, profiles, result)
                await self._dead_letters(cur, result.dead_letters)
                if positions:
                    if prepared.archive:
                        await self._archive(cur, prepared.archive)
                    await cur.executemany(
                        "INSERT INTO usertrail_positions AS p (consumer, topic, partition, "
                        "next_offset, topic_id) VALUES (%s, %s, %s, %s, %s) "
                        "ON CONFLICT (consumer, topic, partition) DO UPDATE "
                        "SET next_offset = GREATEST(p.next_offset, EXCLUDED.next_offset), "
                        "topic_id = EXCLUDED.topic_id, updated_at = now()",
                        [
                            (self.group, t, p, o, self.topic_ids.get(t))
                            for (t, p), o in result.positions.items()
                        ],
                    )
        for topic, partition, _, last, _, _ in prepared.archive:
            key = (topic, partition)
            self._archived_to[key] = max(self._archived_to.get(key, 0), last + 1)
        # committed: these users exist now
        if len(self._known_users) > 1_000_000:
            self._known_users.clear()
        self._known_users |= users
        return result

    async def _fenced(self, cur: psycopg.AsyncCursor[Any], prepared: Prepared) -> Prepared:
        """The batch without what another transaction applied already: each
        partition's stored position, locked until this transaction ends,
        and the batch's records below it left out (prepared again without
        them). Two sinks of a group can hold one partition's records at
        once: the one that lost the partition in a rebalance may still have
        a batch on its way to the database (the revoke waits only for what
        is queued, and a member that takes longer than the rebalance timeout
        is replaced without being stopped). Whichever commits second then
        writes only what the first did not, so each record takes effect
        once (an erasure is not undone by an older batch's row, a profile
        tombstone does not delete a newer profile), the positions never go
        back, and the archive stays one row per stretch of offsets. A
        redelivered batch of this sink's own comes to the same."""
        firsts: dict[tuple[str, int], int] = {}
        for r in prepared.records:
            key = (r.topic, r.partition)
            if r.offset < firsts.get(key, r.offset + 1):
                firsts[key] = r.offset
        if not firsts:
            return prepared
        order = sorted(firsts)  # one order of locks for every writer: no deadlock between them
        await cur.execute(
            # a partition without a stored position gets one (its first
            # offset here), so that it too is locked: undone if this rolls back
            "INSERT INTO usertrail_positions AS p (consumer, topic, partition, next_offset) "
            "SELECT %s, t, n, o FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS x(t, n, o) "
            "ON CONFLICT (consumer, topic, partition) DO UPDATE SET next_offset = p.next_offset "
            "RETURNING topic, partition, next_offset",
            (
                self.group,
                [t for t, _ in order],
                [p for _, p in order],
                [firsts[k] for k in order],
            ),
        )
        stored = {(t, int(p)): int(o) for t, p, o in await cur.fetchall()}
        if all(firsts[k] >= stored.get(k, firsts[k]) for k in firsts):
            return prepared
        kept = [
            i
            for i, r in enumerate(prepared.records)
            if r.offset >= stored.get((r.topic, r.partition), r.offset)
        ]
        log.warning(
            "%d of a batch's %d records were written by another transaction already "
            "(a sink that lost their partitions, or a redelivery): writing the rest",
            len(prepared.records) - len(kept),
            len(prepared.records),
        )
        # what was decided of each record stays decided: not decoded again
        decided: dict[int, Decoded | DeadLetter] = {id(d.record): d for d in prepared.decoded}
        decided.update((id(d.record), d) for d in prepared.dead_letters)
        records = [prepared.records[i] for i in kept]
        return await self.prepare(records, classified=[decided.get(id(r)) for r in records])

    async def _archive(self, cur: psycopg.AsyncCursor[Any], rows: list[ArchiveRow]) -> None:
        await cur.executemany(
            "INSERT INTO usertrail_archive (topic, partition, first_offset, last_offset, "
            "records, data) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            rows,
        )

    async def _isolate(
        self,
        records: Sequence[Record],
        exc: Exception,
        positions: bool = True,
        classified: Sequence[Decoded | DeadLetter | None] | None = None,
    ) -> WriteResult:
        """Find the record(s) the database refuses by halving the batch (a
        record decided before decoding stays decided: never decoded again)."""
        if len(records) == 1 and classified is not None and classified[0] is not None:
            return await self._apply(await self.prepare(records, classified=classified), positions)
        if len(records) == 1:
            log.error(
                "record %s:%d@%d cannot be applied: %s",
                records[0].topic,
                records[0].partition,
                records[0].offset,
                exc,
            )
            prepared = await self.prepare(records, unapplicable=f"{type(exc).__name__}: {exc}")
            return await self._apply(prepared, positions)
        log.warning("batch of %d refused (%s); isolating the record", len(records), exc)
        mid = len(records) // 2
        merged = WriteResult()
        for part in (slice(None, mid), slice(mid, None)):
            merged.add(
                await self.write(
                    records[part],
                    positions=positions,
                    classified=None if classified is None else classified[part],
                )
            )
        return merged

    @staticmethod
    async def _existing_users(cur: psycopg.AsyncCursor[Any], users: set[str]) -> set[str]:
        if not users:
            return set()
        await cur.execute('SELECT id FROM "User" WHERE id = ANY(%s)', (sorted(users),))
        return {row[0] for row in await cur.fetchall()}

    @staticmethod
    async def _not_resent(cur: psycopg.AsyncCursor[Any], decoded: list[Decoded]) -> list[Decoded]:
        """``decoded`` without the events applied before, however long ago
        (rule 2): an interaction whose id an erasure kept, any other kind
        whose id is kept already (recorded here, the first time, in this
        transaction), and any repeat of an id earlier in the batch."""
        others: list[str] = []
        interactions: list[str] = []
        for d in decoded:
            is_row = isinstance(d.event, (FastRow, Interaction))
            (interactions if is_row else others).append(d.event.event_id)
        fresh: set[str] = set()
        if others:
            await cur.execute(
                "INSERT INTO usertrail_seen_events (id) SELECT DISTINCT unnest("
                f"{_IDS}) ON CONFLICT DO NOTHING RETURNING id",
                (",".join(others),),
            )
            fresh = {row[0] for row in await cur.fetchall()}
        erased: set[str] = set()
        if interactions:
            await cur.execute(
                f"SELECT id FROM usertrail_seen_events WHERE id = ANY({_IDS})",
                (",".join(interactions),),
            )
            erased = {row[0] for row in await cur.fetchall()}
            # a user erased in this batch: the erasure deletes their rows before
            # the batch's rows are copied, so a resend of a row they had would
            # come back; it is one already
            gone = {d.event.user_id for d in decoded if isinstance(d.event, UserErased)}
            theirs = [
                d.event.event_id
                for d in decoded
                if d.event.user_id in gone and isinstance(d.event, (FastRow, Interaction))
            ]
            if theirs:
                await cur.execute(
                    f'SELECT id FROM "UserInteraction" WHERE id = ANY({_IDS})', (",".join(theirs),)
                )
                erased |= {row[0] for row in await cur.fetchall()}
        if (
            len(fresh) == len(others)
            and not erased
            and len(set(others)) + len(set(interactions)) == len(decoded)
        ):
            return decoded
        kept = []
        in_batch: set[str] = set()
        for d in decoded:
            event_id = d.event.event_id
            if event_id in in_batch:
                # a repeat within the batch: only the first counts, as in the
                # stream (an erasure between the two must not let the second in)
                continue
            in_batch.add(event_id)
            if isinstance(d.event, (FastRow, Interaction)):
                if event_id not in erased:
                    kept.append(d)
            elif event_id in fresh:
                kept.append(d)
        return kept

    @staticmethod
    def _park_unknown(
        known: set[str], decoded: list[Decoded], result: WriteResult
    ) -> list[Decoded]:
        kept = []
        for d in decoded:
            if d.event.user_id in known or isinstance(d.event, UserErased):
                kept.append(d)
            else:
                result.dead_letters.append(
                    DeadLetter(
                        d.record,
                        UNKNOWN_USER,
                        f'user {d.event.user_id!r} is not in "User"',
                        d.event.event_id,
                        d.event.user_id,
                    )
                )
        return kept

    async def _erase(
        self, cur: psycopg.AsyncCursor[Any], write_plan: WritePlan, result: WriteResult
    ) -> None:
        if not write_plan.erase:
            return
        # the erased interactions' ids stay: a resend of one changes nothing
        await cur.execute(
            'INSERT INTO usertrail_seen_events (id) SELECT id FROM "UserInteraction" '
            'WHERE "userId" = ANY(%s) UNION SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING',
            (write_plan.erase, write_plan.forgotten),
        )
        for table in ("UserInteraction", "UserPreferences"):
            await cur.execute(
                sql.SQL('DELETE FROM {} WHERE "userId" = ANY(%s)').format(sql.Identifier(table)),
                (write_plan.erase,),
            )
        result.erased += len(write_plan.erase)

    async def _interactions(
        self, cur: psycopg.AsyncCursor[Any], data: bytes, rows: int, result: WriteResult
    ) -> None:
        if not rows:
            return
        try:
            async with self.conn.transaction():  # a savepoint
                async with cur.copy(f'COPY "UserInteraction" {_COPY_COLUMNS} {_BINARY}') as copy:
                    await copy.write(data)
            result.interactions += rows
            return
        except psycopg.errors.UniqueViolation:
            pass  # a redelivery: some rows are there already
        async with cur.copy(f"COPY usertrail_staging {_COPY_COLUMNS} {_BINARY}") as copy:
            await copy.write(data)
        await cur.execute(
            f'INSERT INTO "UserInteraction" {_COPY_COLUMNS} '
            f"SELECT {_COPY_COLUMNS[1:-1]} FROM usertrail_staging ON CONFLICT (id) DO NOTHING"
        )
        result.interactions += max(cur.rowcount, 0)  # staging empties at commit

    async def _preferences(
        self, cur: psycopg.AsyncCursor[Any], events: list[PreferencesUpdated], result: WriteResult
    ) -> None:
        for event in events:
            carried = event.carried()
            columns = list(carried)
            values = [Jsonb(v) if _PREFERENCE_COLUMNS[c] else v for c, v in carried.items()]
            at = event.occurred_at.astimezone(UTC).replace(tzinfo=None)  # the instant, in UTC
            names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
            query = sql.SQL(
                'INSERT INTO "UserPreferences" (id, "userId", "createdAt", "updatedAt", {names}) '
                "VALUES (%s, %s, %s, %s, {placeholders}) "
                'ON CONFLICT ("userId") DO UPDATE SET "updatedAt" = EXCLUDED."updatedAt", {sets} '
                'WHERE "UserPreferences"."updatedAt" IS NULL '
                'OR "UserPreferences"."updatedAt" <= EXCLUDED."updatedAt"'
            ).format(
                names=names,
                placeholders=sql.SQL(", ").join(sql.Placeholder() * len(columns)),
                sets=sql.SQL(", ").join(
                    sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in columns
                ),
            )
            await cur.execute(query, (event.event_id, event.user_id, at, at, *values))
            result.preferences += max(cur.rowcount, 0)

    @staticmethod
    def _park_profiles(
        known: set[str], profiles: dict[str, _ProfileWrite], result: WriteResult
    ) -> dict[str, _ProfileWrite]:
        kept = {}
        for user, w in profiles.items():
            if w.message is None or user in known:
                kept[user] = w
            else:
                record = w.record
                result.dead_letters.append(
                    DeadLetter(record, UNKNOWN_USER, f'user {user!r} is not in "User"', None, user)
                )
        return kept

    async def _profiles(
        self,
        cur: psycopg.AsyncCursor[Any],
        profiles: dict[str, _ProfileWrite],
        result: WriteResult,
    ) -> None:
        """``user_vectors``: newer over older (by event time); a tombstone deletes."""
        gone = [u for u, w in profiles.items() if w.erased]
        if gone:
            await cur.execute('DELETE FROM user_vectors WHERE "userId" = ANY(%s)', (gone,))
        lines = [
            profile_copy_line(user, w.message)
            for user, w in sorted(profiles.items())
            if w.message is not None
        ]
        if not lines:
            return
        # One COPY and one upsert for the batch's profiles: an upsert per row
        # (executemany) was 28% of the sink's py-spy samples at 1,000
        # events/s, where nearly every event brings a profile.
        async with cur.copy(f"COPY usertrail_vector_staging {_VECTOR_COPY} FROM STDIN") as copy:
            await copy.write(b"".join(lines))
        await cur.execute(_VECTORS_FROM_STAGING)
        result.vectors += len(lines)

    async def _dead_letters(self, cur: psycopg.AsyncCursor[Any], dead: list[DeadLetter]) -> None:
        if not dead:
            return
        await cur.executemany(
            f"INSERT INTO usertrail_dead_letters ({deadletters.columns(deadletters.WRITTEN)}) "
            f"VALUES ({', '.join(['%s'] * len(deadletters.WRITTEN))}) "
            'ON CONFLICT (topic, partition, "offset") DO NOTHING',
            [
                (
                    d.reason,
                    d.error[: deadletters.ERROR_MAX],
                    d.record.topic,
                    d.record.partition,
                    d.record.offset,
                    d.record.key,
                    d.record.value,
                    d.event_id,
                    d.user_id,
                    self.outbox,
                )
                for d in dead
            ],
        )
