"""``replay stream`` and ``verify``: every profile rebuilt from the log with
plain aiokafka and the worker's own ``advance``, at the speed of a raw
consumer (docs/architecture.md).

``rebuild`` reads ``usertrail.events`` up to the high-water marks it finds at
the start, in large batches, and folds them. ``publish`` then writes each
user's final state once to the table's changelog (on the user's partition,
as the worker does), tombstones users the rebuild no longer has, writes each
partition's applied offset after its users, publishes the final profiles to
``usertrail.profiles`` and commits the worker group's offsets at the rebuilt
point, so live workers carry on exactly after it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError
from aiokafka.structs import OffsetAndMetadata
from usertrail.producers.events import accept, decode
from usertrail.producers.profiles import encode_profile
from usertrail.stream.fold import chunks_needed, decode_chunk, encode_chunk
from usertrail.stream.segments import Rules, segment
from usertrail.stream.state import (
    APPLIED,
    LOG,
    SEEN,
    UserState,
    advance,
    applied_key,
    dump_state,
    load_state,
    log_key,
    message_for,
    seen_key,
)

from usertrail import liveness
from usertrail.errors import EventValidationError, UsertrailError
from usertrail.kafka import high_waters, log_identity, partitions_of, stop_within
from usertrail.settings import Settings
from usertrail.topics import (
    FORWARDED,
    TopicSpec,
    copy_headers,
    ensure_topics,
    home_partition,
    homes_in,
    is_home,
)

log = logging.getLogger("usertrail.replay")

FOLD_EVERY = 50_000
"""Records read before they are folded (each user's share in one advance)."""


@dataclass
class Rebuilt:
    states: dict[bytes, UserState] = field(default_factory=dict)
    partition_of: dict[bytes, int] = field(default_factory=dict)
    # each user's sealed chunks of event ids (stream/fold.py)
    chunks: dict[bytes, dict[int, bytes]] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)  # next offset per partition
    starts: dict[int, int] = field(default_factory=dict)
    records: int = 0
    homes: int | None = None  # the partition count homes are taken over
    # records away from their home that no copy in the log names (the
    # stream was stopped before it copied them): ``publish`` copies them
    unforwarded: list[Any] = field(default_factory=list)


async def refuse_if_live(settings: Settings) -> None:
    await liveness.refuse_if_live(settings, settings.stream_app_id, "stream", "usertrail stream")


def _consumer(settings: Settings, **extra: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **settings.kafka_options(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        **extra,
    )


async def _occurred_at(
    consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, end: int
) -> datetime | None:
    """``occurredAt`` of the first valid event at or after ``offset``; None
    when there is none before ``end``."""
    consumer.seek(tp, offset)
    while offset < end:
        batch = await consumer.getmany(tp, timeout_ms=1000, max_records=1)
        for r in batch.get(tp, []):
            offset = r.offset + 1
            try:
                return decode(r.value or b"").occurred_at
            except EventValidationError:
                continue  # the sink dead-letters it; the next one tells
    return None


async def first_offset_at(
    consumer: AIOKafkaConsumer, tp: TopicPartition, end: int, since: datetime
) -> int:
    """The first offset whose event happened at or after ``since``, by binary
    search over ``occurredAt`` (tansu's offsets_for_times goes by arrival time
    and answers 0 past the end, docs/brokers.md). Assumes a partition's events
    are in event-time order, as the SDK sends them."""
    low, high = 0, end
    while low < high:
        middle = (low + high) // 2
        at = await _occurred_at(consumer, tp, middle, end)
        if at is not None and at < since:
            low = middle + 1
        else:
            high = middle
    return low


async def rebuild(
    settings: Settings,
    rules: Rules,
    *,
    since: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Rebuilt:
    """Fold the events log (from ``since``, or the start) up to the
    high-water marks found now. ``progress(done, total)`` after each batch."""
    consumer = _consumer(settings)
    await consumer.start()
    out = Rebuilt()
    try:
        tps = await partitions_of(consumer, settings.events_topic)
        if not tps:
            raise UsertrailError(f"topic {settings.events_topic!r} does not exist")
        cluster = await consumer._client.fetch_all_metadata()
        out.homes = homes_in(settings, cluster)
        consumer.assign(tps)
        out.ends = await high_waters(consumer, tps)
        for tp in tps:
            end = out.ends[tp.partition]
            start = 0 if since is None else await first_offset_at(consumer, tp, end, since)
            out.starts[tp.partition] = start
            consumer.seek(tp, start)
        total = sum(out.ends[p] - out.starts[p] for p in out.ends)
        active = [tp for tp in tps if out.starts[tp.partition] < out.ends[tp.partition]]
        pending: dict[bytes, tuple[int, list[Any]]] = {}
        count = 0
        forwarded: set[bytes] = set()  # "partition/offset" of originals copied home
        away: list[Any] = []
        while active:
            batch = await consumer.getmany(*active, timeout_ms=1000, max_records=20_000)
            for tp, records in batch.items():
                end = out.ends[tp.partition]
                for r in records:
                    if r.offset >= end:
                        break
                    count += 1
                    for name, value in r.headers or ():
                        if name == FORWARDED:
                            forwarded.add(value)
                    if not is_home(r.key, r.partition, out.homes):
                        away.append(r)  # folded as its copy, at its home
                        continue
                    event = accept(r.key, r.value, r.timestamp)
                    if event is None:
                        continue  # the worker skips it too; the sink dead-letters it
                    mine = pending.get(r.key)  # accepted: the key is the user id
                    if mine is None:
                        mine = pending[r.key] = (r.partition, [])
                    mine[1].append((event, r.offset))
                if records and records[-1].offset + 1 >= end:
                    active.remove(tp)
                    consumer.pause(tp)
            if len(pending) and (count - out.records >= FOLD_EVERY or not active):
                _fold(out, pending, rules)
                pending = {}
                out.records = count
            if progress is not None:
                progress(count, total)
        _fold(out, pending, rules)
        out.records = count
        out.unforwarded = [r for r in away if f"{r.partition}/{r.offset}".encode() not in forwarded]
    finally:
        await stop_within(consumer, 10, "consumer")
    return out


def _fold(out: Rebuilt, pending: dict[bytes, tuple[int, list[Any]]], rules: Rules) -> None:
    for key, (partition, items) in pending.items():
        state, stored = out.states.get(key), out.chunks.get(key, {})
        chunks = {}
        if state is not None and state.profile.sealed:  # late resends: the chunks they need
            need = chunks_needed(state.profile.sealed, (e.event_id for e, _ in items), ())
            chunks = {i: decode_chunk(stored[i]) for i in need}
        result = advance(state, items[0][0].user_id, items, rules, chunks)
        if result is not None:
            out.states[key] = result.state
            out.partition_of[key] = partition
            for index, ids in result.chunks.items():
                out.chunks.setdefault(key, {})[index] = encode_chunk(ids)


@dataclass
class Live:
    """The last value of every key in the table's changelog: what a worker
    starting now recovers."""

    states: dict[bytes, UserState] = field(default_factory=dict)
    partition_of: dict[bytes, int] = field(default_factory=dict)
    applied: dict[int, int] = field(default_factory=dict)
    chunk_keys: dict[bytes, int] = field(default_factory=dict)  # sealed chunks' keys -> partition


async def live_states(settings: Settings) -> Live:
    consumer = _consumer(settings)
    await consumer.start()
    live = Live()
    try:
        topic = settings.changelog_topic
        tps = await partitions_of(consumer, topic)
        if not tps:
            return live
        consumer.assign(tps)
        ends = await high_waters(consumer, tps)
        active = [tp for tp in tps if ends[tp.partition] > 0]
        for tp in tps:
            consumer.seek(tp, 0)
        raw: dict[bytes, bytes | None] = {}
        while active:
            batch = await consumer.getmany(*active, timeout_ms=1000, max_records=20_000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset >= ends[tp.partition]:
                        break
                    assert r.key is not None
                    if r.key.startswith(APPLIED):
                        live.applied[int(r.key[len(APPLIED) :])] = int(r.value or b"-1")
                    elif r.key.startswith(LOG):
                        continue
                    elif r.key.startswith(SEEN):
                        if r.value is None:
                            live.chunk_keys.pop(r.key, None)
                        else:
                            live.chunk_keys[r.key] = r.partition
                    else:
                        raw[r.key] = r.value
                        live.partition_of[r.key] = r.partition
                if records and records[-1].offset + 1 >= ends[tp.partition]:
                    active.remove(tp)
                    consumer.pause(tp)
        for key, value in raw.items():
            state = load_state(value)
            if state is not None:
                live.states[key] = state
    finally:
        await stop_within(consumer, 10, "consumer")
    return live


async def replay_stream(
    settings: Settings,
    rules: Rules,
    *,
    since: datetime | None = None,
    allow_shrink: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """``usertrail replay stream``: refuse while workers of the group run,
    fold the log (``rebuild``), refuse again (none started meanwhile), then
    ``publish``. A replay ``since`` a time leaves out, by design, users with
    nothing since then, so it may shrink the profiles."""
    await refuse_if_live(settings)
    rebuilt = await rebuild(settings, rules, since=since, progress=progress)
    await refuse_if_live(settings)
    shrink = allow_shrink or since is not None
    return await publish(settings, rules, rebuilt, allow_shrink=shrink)


async def publish(
    settings: Settings, rules: Rules, rebuilt: Rebuilt, *, allow_shrink: bool = False
) -> dict[str, int]:
    """Write the rebuilt states where the live worker would have: changelog,
    applied offsets, profiles, group offsets. Returns what was written.
    Refuses to remove profiles the live state holds and the log does not
    (an emptied or reset log) unless ``allow_shrink``."""
    # the changelog faust would create, if no worker ever ran: one partition
    # per events partition (the worker writes a user where their events are)
    await ensure_topics(
        settings,
        [TopicSpec(settings.changelog_topic, len(rebuilt.ends), {"cleanup.policy": "compact"})],
    )
    live = await live_states(settings)
    gone = [key for key in live.states if key not in rebuilt.states]
    if gone and not allow_shrink:
        shown = ", ".join(k.decode(errors="replace") for k in sorted(gone)[:10])
        more = f" and {len(gone) - 10:,} more" if len(gone) > 10 else ""
        raise UsertrailError(
            f"refusing to replace {len(live.states):,} live profiles with "
            f"{len(rebuilt.states):,} folded from {settings.events_topic}: {len(gone):,} "
            f"would be removed ({shown}{more}). Was the log reset or emptied? Restore it "
            "(`usertrail up` restores the embedded broker's; `usertrail log restore`), or "
            "pass --allow-shrink if those profiles should go"
        )
    producer = AIOKafkaProducer(
        **settings.kafka_options(),
        acks="all",
        # tansu's end offsets are only right with one record per batch, and
        # faust's table recovery reads them (docs/brokers.md)
        max_batch_size=1 if settings.is_tansu else 1024 * 1024,
        linger_ms=0 if settings.is_tansu else 20,
    )
    await producer.start()
    changelog = settings.changelog_topic
    try:
        sends = []
        for r in rebuilt.unforwarded:  # where the worker would have copied them
            assert rebuilt.homes is not None
            sends.append(
                await producer.send(
                    settings.events_topic,
                    r.value,
                    key=r.key,
                    partition=home_partition(r.key, rebuilt.homes),
                    timestamp_ms=r.timestamp,
                    headers=copy_headers(r.headers or (), r.partition, r.offset),
                )
            )
        chunk_keys = set()
        for key, chunks in rebuilt.chunks.items():  # before the states that name them
            for index, chunk in chunks.items():
                chunk_keys.add(seen_key(key, index))
                sends.append(
                    await producer.send(
                        changelog,
                        chunk,
                        key=seen_key(key, index),
                        partition=rebuilt.partition_of[key],
                    )
                )
        for key, partition in live.chunk_keys.items():
            if key not in chunk_keys:
                sends.append(await producer.send(changelog, None, key=key, partition=partition))
        for key, state in rebuilt.states.items():
            sends.append(
                await producer.send(
                    changelog, dump_state(state), key=key, partition=rebuilt.partition_of[key]
                )
            )
        for key in gone:  # a tombstone where the worker would find it
            sends.append(
                await producer.send(changelog, None, key=key, partition=live.partition_of[key])
            )
        await asyncio.gather(*sends)
        sends = []
        # each partition's applied offset after its users (same partition: in
        # order), and the id of the events topic it was read from
        found = (await log_identity(producer.client, [settings.events_topic])).topic_ids
        topic_id = found.get(settings.events_topic)
        for partition, end in rebuilt.ends.items():
            if end > 0:
                sends.append(
                    await producer.send(
                        changelog,
                        str(end - 1).encode(),
                        key=applied_key(partition),
                        partition=partition,
                    )
                )
            if end == 0 or topic_id is not None:
                sends.append(
                    await producer.send(
                        changelog,
                        None if end == 0 else str(topic_id).encode(),
                        key=log_key(partition),
                        partition=partition,
                    )
                )
        for key, state in rebuilt.states.items():
            if state.profile.erased_at is not None:
                value = None
            else:
                value = encode_profile(message_for(state, segment(state.profile, rules)))
            sends.append(await producer.send(settings.profiles_topic, value, key=key))
        for key in gone:
            sends.append(await producer.send(settings.profiles_topic, None, key=key))
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    committed = await commit_positions(settings, rebuilt.ends)
    return {
        "users": len(rebuilt.states),
        "removed": len(gone),
        "copied_home": len(rebuilt.unforwarded),
        "records": rebuilt.records,
        "committed": int(committed),
    }


async def commit_positions(settings: Settings, ends: dict[int, int]) -> bool:
    """The worker group's committed offsets at the rebuilt point. The
    consumer never joins the group: it commits as a standalone member, which
    a group without live members accepts."""
    consumer = AIOKafkaConsumer(
        **settings.kafka_options(), group_id=settings.stream_app_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = {TopicPartition(settings.events_topic, p): end for p, end in ends.items()}
        consumer.assign(list(tps))
        await consumer.commit({tp: OffsetAndMetadata(end, "") for tp, end in tps.items()})
        return True
    except CommitFailedError:
        # tansu keeps stopped members in the group forever and refuses a
        # commit from outside it. The applied offsets written with the
        # states are what decides: a worker reading below them jumps ahead.
        log.warning(
            "the broker refused the group offsets (it still lists stopped members); "
            "workers will jump to the replayed point from the applied offsets instead"
        )
        return False
    finally:
        await stop_within(consumer, 10, "consumer")


@dataclass
class Difference:
    key: str
    what: str


async def verify_profiles(settings: Settings, rules: Rules) -> tuple[Live, int, list[Difference]]:
    """The live table (its changelog) against a fresh fold of the log: (the
    live table as read, folded users, differences)."""
    rebuilt = await rebuild(settings, rules)
    current = await live_states(settings)
    live = current.states
    out = []
    for key in sorted(set(live) | set(rebuilt.states)):
        a, b = live.get(key), rebuilt.states.get(key)
        name = key.decode(errors="replace")
        if a is None:
            out.append(Difference(name, "in the log, missing from the live table"))
        elif b is None:
            out.append(Difference(name, "in the live table, not in the log"))
        elif a != b:
            fields = [
                f
                for f in a.profile.__dataclass_fields__
                if getattr(a.profile, f) != getattr(b.profile, f)
            ]
            if a.segments_changed_at != b.segments_changed_at:
                fields.append("segments_changed_at")
            if a.segment_key != b.segment_key:
                fields.append("segments")
            out.append(Difference(name, "differs: " + ", ".join(fields)))
    return current, len(rebuilt.states), out
