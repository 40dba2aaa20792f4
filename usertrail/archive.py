"""The log archive: its encoding, and restoring a broker from it (docs/log.md).

The sink keeps every record it reads of ``usertrail.events`` and
``usertrail.profiles`` in ``usertrail_archive``, in the transaction that
stores its positions: one row per partition and batch, the records in
``data`` (:func:`encode`). A broker that lost its log (the embedded tansu keeps
nothing across a restart) gets those records back at their partitions and
offsets, with their keys, values, timestamps and headers; the dead-letter
topic is published again from ``usertrail_dead_letters``, its record of
truth. The stored positions are then marked as belonging to the restored
log (its topic ids), so the consumers go on from where they were.

A topic is restored only when the broker's copy is empty; one that holds
its log already is left alone, and one that holds records of another log
is refused (restoring after them would put every record at another offset).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from cramjam import DecompressionError, lz4

from usertrail import deadletters
from usertrail.errors import LogResetError
from usertrail.kafka import (
    decode_headers,
    encode_headers,
    log_identity,
    partitions_of,
    stop_within,
)
from usertrail.settings import Settings
from usertrail.topics import ensure_topics

log = logging.getLogger("usertrail.archive")

_CHUNK = 50  # rows (each a batch's records of one partition) read at a time
_BATCH_BYTES = 1024 * 1024

# --- the encoding of ``usertrail_archive.data`` -----------------------------------------
# Per record: offset (int64), timestamp (int64, ms, -1 unknown), then the
# lengths of key, value and headers (int32 each, -1: null) and their bytes.
# The records of a row are stored compressed: the byte 0xff, their length
# (uint32), then an LZ4 block of them. Rows written before that hold the
# records as they are, and still decode: their first byte is that of an
# offset, 0x00-0x7f.
_RECORD = struct.Struct(">qqiii")
_LZ4 = b"\xff"
_SIZE = struct.Struct(">I")


def encode(records: Sequence[Any]) -> bytes:
    """Records of one partition (``offset``, ``key``, ``value``, ``timestamp``,
    ``headers`` attributes, as usertrail.sink.plan.Record) as one value."""
    parts: list[bytes] = []
    pack, append = _RECORD.pack, parts.append
    for r in records:
        headers = encode_headers(r.headers) if r.headers else None
        key, value = r.key, r.value
        append(
            pack(
                r.offset,
                r.timestamp,
                -1 if key is None else len(key),
                -1 if value is None else len(value),
                -1 if headers is None else len(headers),
            )
        )
        append(key or b"")
        append(value or b"")
        if headers:
            append(headers)
    raw = b"".join(parts)
    # LZ4 in this process, not PostgreSQL's pglz as it stores the row (pglz
    # took about a tenth of the sink's statement time; the column is stored
    # as it comes: migration 0012)
    return _LZ4 + _SIZE.pack(len(raw)) + bytes(lz4.compress_block(raw, store_size=False))


ArchivedRecord = tuple[int, bytes | None, bytes | None, int, list[tuple[str, bytes | None]]]


def decode(data: bytes) -> Iterator[ArchivedRecord]:
    """(offset, key, value, timestamp, headers) of each record in ``data``;
    ValueError where ``data`` is no such encoding (damaged)."""
    try:
        if data[:1] == _LZ4:
            (size,) = _SIZE.unpack_from(data, 1)
            data = bytes(lz4.decompress_block(data[1 + _SIZE.size :], output_len=size))
        at, view = 0, memoryview(data)
        while at < len(data):
            offset, timestamp, *lengths = _RECORD.unpack_from(data, at)
            at += _RECORD.size
            fields: list[bytes | None] = []
            for n in lengths:
                fields.append(None if n < 0 else bytes(view[at : at + n]))
                at += max(n, 0)
            if at > len(data):
                raise ValueError("a record runs past the end of the data")
            key, value, headers = fields
            yield offset, key, value, timestamp, decode_headers(headers)
    except (struct.error, DecompressionError, UnicodeDecodeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def _row_records(
    topic: str, partition: int, first: int, last: int, count: int, data: bytes
) -> list[ArchivedRecord]:
    """The records of one archived row, checked against what the row says it
    holds (a damaged row fails here, before any of it is restored)."""
    where = f"{topic}[{partition}], archived offsets {first}-{last}"
    try:
        records = list(decode(data))
    except ValueError as exc:
        raise LogResetError(f"the archive's row of {where} is damaged ({exc})") from None
    held = f"{records[0][0]}-{records[-1][0]}" if records else "-"
    if len(records) != count or (records and held != f"{first}-{last}"):
        raise LogResetError(
            f"the archive's row of {where} is damaged: it holds {len(records)} records "
            f"({held}), not {count}"
        )
    return records


@dataclass
class Restored:
    records: dict[str, int] = field(default_factory=dict)  # topic -> records put back
    intact: list[str] = field(default_factory=list)  # topics the broker still had

    def summary(self) -> str:
        done = [f"{n:,} records of {t}" for t, n in self.records.items() if n]
        return ", ".join(done) if done else "nothing (the broker has its log)"


async def restore(settings: Settings) -> Restored:
    """Put the archived log back into the broker (see the module's doc).
    Topics it lacks are made first, as setup makes them (their partition
    counts are what the archive's partitions need): a broker that lost its
    log lost its topics too, and the pipeline never makes a topic by asking
    for it (usertrail/kafka.py)."""
    await ensure_topics(settings)
    result = Restored()
    topics = [settings.events_topic, settings.profiles_topic]
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **settings.kafka_options())
    producer = AIOKafkaProducer(
        acks="all", max_batch_size=_BATCH_BYTES, linger_ms=0, **settings.kafka_options()
    )
    await consumer.start()
    await producer.start()
    try:
        async with await psycopg.AsyncConnection.connect(settings.database_dsn()) as conn:
            for topic in topics:
                result.records[topic] = await _restore_topic(conn, consumer, producer, topic)
                if result.records[topic] == 0:
                    result.intact.append(topic)
            result.records[settings.dead_letter_topic] = await _restore_dead_letters(
                conn, consumer, producer, settings.dead_letter_topic
            )
    finally:
        await stop_within(producer, 10, "restore producer")
        await stop_within(consumer, 10, "restore consumer")
    return result


async def _restore_topic(
    conn: psycopg.AsyncConnection[Any],
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    topic: str,
) -> int:
    spans = await (
        await conn.execute(
            "SELECT partition, min(first_offset), max(last_offset), sum(records)::bigint "
            "FROM usertrail_archive WHERE topic = %s GROUP BY partition ORDER BY partition",
            (topic,),
        )
    ).fetchall()
    if not spans:
        return 0
    identity = (await log_identity(consumer._client, [topic])).topic_ids.get(topic)
    stored = {
        row[0]
        for row in await (
            await conn.execute(
                "SELECT DISTINCT topic_id FROM usertrail_positions "
                "WHERE topic = %s AND topic_id IS NOT NULL",
                (topic,),
            )
        ).fetchall()
    }
    tps = await partitions_of(consumer, topic)
    ends = await consumer.end_offsets(tps) if tps else {}
    # Empty is exact on both brokers (tansu's end offset is wrong only after
    # multi-record batches, and then at least 1): docs/brokers.md.
    holding = {tp.partition: n for tp, n in ends.items() if n > 0}
    if holding:
        if not stored or identity in stored:
            return 0  # the log the positions were read from (the consumers check that too)
        raise LogResetError(
            f"cannot restore {topic}: the broker's topic (id {identity}) already holds records "
            f"of another log in partitions {sorted(holding)} (a client sent before the "
            "restore?), and restoring after them would move every record to another offset. "
            "Stop what sends, restart the embedded broker (`usertrail up` again) and restore "
            "before anything sends"
        )
    for partition, first, last, count in spans:
        if partition >= len(tps):
            raise LogResetError(
                f"cannot restore {topic}[{partition}]: the broker's topic has only "
                f"{len(tps)} partitions"
            )
        if first != 0 or count != last + 1:
            raise LogResetError(
                f"cannot restore {topic}[{partition}] at the same offsets: the archive holds "
                f"{count} records of offsets {first}..{last} (it began after the log did)"
            )
    total = 0
    for partition, _, last, _ in spans:
        total += await _restore_partition(conn, producer, topic, partition, last + 1)
    new_id = (await log_identity(consumer._client, [topic])).topic_ids.get(topic)
    if new_id is not None:
        async with conn.transaction():
            await conn.execute(
                "UPDATE usertrail_positions SET topic_id = %s WHERE topic = %s", (new_id, topic)
            )
    log.info("restored %d records of %s from the archive", total, topic)
    return total


async def _restore_partition(
    conn: psycopg.AsyncConnection[Any],
    producer: AIOKafkaProducer,
    topic: str,
    partition: int,
    end: int,
) -> int:
    expected = 0

    async def flush(batch: Any, first: int, n: int) -> None:
        nonlocal expected
        future = await producer.send_batch(batch, topic, partition=partition)
        placed = (await future).offset
        if placed != first:
            raise LogResetError(
                f"restoring {topic}[{partition}]: the broker put offset {first} at {placed} "
                "(something else wrote to it meanwhile); stop what sends and restore again"
            )
        expected = first + n

    async with conn.cursor(name=f"restore_{partition}") as cur:
        await cur.execute(
            "SELECT first_offset, last_offset, records, data FROM usertrail_archive "
            "WHERE topic = %s AND partition = %s ORDER BY first_offset",
            (topic, partition),
        )
        batch, first, n = producer.create_batch(), 0, 0
        while rows := await cur.fetchmany(_CHUNK):
            for row in rows:
                for offset, key, value, timestamp, headers in _row_records(topic, partition, *row):
                    if offset != first + n:
                        raise LogResetError(
                            f"cannot restore {topic}[{partition}] at the same offsets: the "
                            f"archive goes from offset {first + n - 1} to {offset}"
                        )
                    args = {
                        "key": key,
                        "value": value,
                        "timestamp": timestamp if timestamp >= 0 else None,
                        "headers": headers,
                    }
                    if batch.append(**args) is None:
                        batch.close()
                        await flush(batch, first, n)
                        batch, first, n = producer.create_batch(), expected, 0
                        batch.append(**args)
                    n += 1
        if n:
            batch.close()
            await flush(batch, first, n)
    if expected != end:
        raise LogResetError(f"restoring {topic}[{partition}]: put back {expected} of {end} records")
    return expected


async def _restore_dead_letters(
    conn: psycopg.AsyncConnection[Any],
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    topic: str,
) -> int:
    """The dead-letter topic again from its table (in the order they were
    found), if the broker's is empty: the same records and headers the sink
    published; their offsets are the table's order."""
    tps = await partitions_of(consumer, topic)
    if not tps or any(n > 0 for n in (await consumer.end_offsets(tps)).values()):
        return 0
    n = 0
    published: list[Any] = []
    async with conn.cursor(name="restore_dead_letters") as cur:
        await cur.execute(
            'SELECT id, reason, error, topic, partition, "offset", key, value '
            "FROM usertrail_dead_letters ORDER BY id"
        )
        while rows := await cur.fetchmany(_CHUNK):
            acknowledged, failed = await deadletters.send(producer, topic, rows)
            if failed:  # left unpublished: the sink sends them again
                log.warning("%d dead letters not restored to %s: %r", len(failed), topic, failed[0])
            published += acknowledged
            n += len(rows)
    # on the topic now: the sink need not publish these again
    await conn.execute(
        "UPDATE usertrail_dead_letters SET unpublished = false WHERE id = ANY(%s)", (published,)
    )
    return n
