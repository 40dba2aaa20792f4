"""The worker's batch folder: what the faust agent does with each batch.

For every record of a batch it asks ``Positions`` whether the record is the
next one of its partition after the applied offset kept in the table; it
folds each user's new records (``fold``: in the helper process or here),
writes each changed state once to the table and its changelog partition,
publishes the user's profile, and sends each partition's new applied offset
only once every write of the batch and of every earlier batch is
acknowledged (``then_send``). A hole in a partition is re-read, never
skipped; a partition whose records were fetched but never delivered is
re-read too (``reread_undelivered``).

It talks to faust through two things only: the table's ``data`` (the
store, read and written on a named partition: stream/store.py), and the
consumer's ``seek_wait``, ``earliest_offsets``, ``highwater`` and
``assignment``; the app wires it (``app.py``). The table's changelog it
writes itself, with a producer of its own (``Changelog``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from faust.types import TP
from usertrail.stream.batch import Folded, Result, UserBatch, Wanted
from usertrail.stream.metrics import StreamMetrics
from usertrail.stream.policy import RESEEK_SECONDS, Positions, Verdict, then_send
from usertrail.stream.state import applied_key, log_key, seen_key
from usertrail.stream.store import acknowledged, on_partition, persistable

from usertrail.errors import ConfigurationError, LogResetError, UsertrailError
from usertrail.kafka import log_identity, stop_within
from usertrail.settings import Settings
from usertrail.topics import copy_headers, home_partition, homes_count, is_home

log = logging.getLogger("usertrail.stream")

REVOKE_WAIT_SECONDS = 30
"""How long giving up partitions waits for a stopped batch's writes (each
send is answered or fails within the producer's request timeout)."""

Fold = Callable[[list[UserBatch]], Awaitable[list[Result]]]

Changelog = Callable[[int, bytes, bytes], Awaitable["asyncio.Future[Any]"]]
"""Sends one write to the table's changelog partition: ``(partition, key,
value)``, answering the future of its acknowledgement (the record's
metadata: ``topic_partition.partition``, ``offset``)."""


class Record(Protocol):
    """What the folder reads of a record of the events topic (aiokafka's
    ``ConsumerRecord``, as stream/consumer.py delivers them)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None  # ms since the epoch; None, or -1: unknown
    headers: Sequence[tuple[str, bytes]]


class Revoked(Exception):
    """Partitions are being given up while a batch is folded (the drain
    before the rebalance stopped waiting for it): the batch writes nothing
    more, and the partitions' next owner folds it again from the applied
    offsets."""


class BatchFolder:
    def __init__(
        self,
        settings: Settings,
        table: Any,
        consumer: Any,
        fold: Fold,
        *,
        on_batch: Callable[[int], None] | None = None,
        on_applied: Callable[[Sequence[Record]], None] | None = None,
        changelog: Changelog | None = None,
        marks: Changelog | None = None,
    ) -> None:
        """``table``: faust's table (its ``data``); ``consumer``: faust's
        consumer; ``on_batch(n)``: called once a batch of ``n`` records is
        folded and its writes (and every earlier batch's) are acknowledged;
        ``on_applied(records)``: then, with the batch's records (what the
        group may commit); ``changelog``: how a write reaches the table's
        changelog (default: this folder's own producer, ``send_changelog``);
        ``marks``: how a partition's applied offset (and its log's id) does
        (default: as every other write)."""
        self.settings = settings
        self.table = table
        self.consumer = consumer
        self.fold = fold
        self.on_batch = on_batch
        self.on_applied = on_applied
        self.positions = Positions()
        self.metrics = StreamMetrics()  # served on /metrics (stream/web.py)
        # what the worker stopped itself for, if anything: a log that is not
        # its own (LogResetError), a changed partition count (ConfigurationError)
        self.stopped_for: UsertrailError | None = None
        # The writes of the last batch folded (with every earlier batch's):
        # the broker acknowledges them while the next batch is delivered and
        # folded.
        self.in_flight: list[asyncio.Future[Any]] = []
        # when each partition last delivered a record (reread_undelivered)
        self.delivered_at: dict[int, float] = {}
        self.folded_at = time.monotonic()  # the last batch folded (the stall watchdog)
        # Profiles go out through a producer of the folder's own, in batches
        # (its readers go by the high-water mark of their fetches, so even
        # on the embedded broker they need not be one record per batch).
        # Measured: a profile cost about 100 us of the worker's time through
        # faust's producer.
        self._producer: AIOKafkaProducer | None = None
        # The changelog too, rather than through faust's table: faust puts
        # each write in a buffer that one
        # task drains a record at a time (with faust's per-message work),
        # and its conductor stops delivering events while that buffer holds
        # more than 100 ("producer buffer full" in the log at 1,000 events/s
        # of 500 users). `./dev bench stream_rate` (2 rounds each, one after
        # the other): worker/ceiling 0.81-0.86 through faust's table,
        # 1.05-1.31 through this producer.
        self.send_changelog: Changelog = changelog or self._send_changelog
        # On tansu app.py sends the applied offsets through faust's table,
        # one record per batch: tansu's end offset of a partition is the
        # first offset of its last batch + 1 (docs/brokers.md), and faust's
        # recovery reads up to that end. A mark is sent only once every
        # earlier write is acknowledged, so whatever batches follow it, the
        # end lies past the newest mark, and with it past every state the
        # mark vouches for; states past it, of a batch not yet marked, are
        # folded again from the applied offset, so recovering them or not
        # comes to the same. Everything else goes in batches on both brokers.
        self.send_mark: Changelog = marks or self.send_changelog
        self.closing = False
        # Bumped as partitions are about to be given up: a batch begun before
        # sends nothing more (``Revoked``), and what it sent is waited for
        # (``abandoned``) before the partitions go, so that no write of this
        # worker lands in the changelog after their next owner's.
        self.generation = 0
        self.abandoned: list[Awaitable[Any]] = []
        # Written behind: a batch's states and applied offsets reach the
        # store (and its persisted changelog offsets) only once the broker
        # acknowledged them in the changelog, so the store is never ahead of
        # the changelog, and a worker killed at any moment restarts from its
        # local state plus the changelog's tail (stream/store.py). Until
        # then they are read from here: (partition, key) -> value.
        self.unwritten: dict[tuple[int, bytes], bytes] = {}
        # each batch's changelog sends, oldest first, until its writes are
        # in the store: a later batch's states can reach a changelog
        # partition before an earlier batch's applied offsets (which wait
        # for that batch's acknowledgements), and the store's persisted
        # offset must not pass them (stream/store.py, ``persistable``)
        self.unstored: list[list[Any]] = []
        self.stored_up_to: dict[int, int] = {}  # changelog partition -> newest offset stored

    # --- the table, partition by partition (stream/store.py) -------------------
    def _get(self, partition: int, key: bytes) -> bytes | None:
        value = self.unwritten.get((partition, key))
        if value is not None:
            return value
        with on_partition(partition):
            stored: bytes | None = self.table.data.get(key)
            return stored

    def _store(self, writes: list[tuple[int, bytes, bytes]], sent: list[Any]) -> None:
        """A batch's writes, acknowledged in the changelog: into the store,
        then each changelog partition's newest offset among them as the
        store's persisted offset (from where recovery reads on)."""
        data = self.table.data
        for partition, key, value in writes:
            with on_partition(partition):
                data[key] = value
            if self.unwritten.get((partition, key)) is value:
                del self.unwritten[(partition, key)]  # no later batch changed it
        self.unstored = [b for b in self.unstored if b is not sent]
        persist = getattr(data, "usertrail_persist", None)
        if persist is not None:
            for p, offset in acknowledged(sent):
                self.stored_up_to[p] = max(self.stored_up_to.get(p, -1), offset)
            later = (w for batch in self.unstored for w in acknowledged(batch))
            for p, offset in persistable(self.stored_up_to, later).items():
                persist(p, offset)

    async def profiles_producer(self) -> AIOKafkaProducer:
        if self._producer is None:  # started by the first batch
            # aiokafka holds one batch per partition while the one before
            # is in flight, and `send` waits when that batch is full: with
            # its default of 16 KB, a batch of active users' states (up to
            # 15 KB each) went one or two states per round trip. In a 60 s
            # round of 1,000 events/s under `up --broker kafka`, sending a
            # batch's writes took 350-580 ms (2026-12-02); with 256 KB,
            # 10-70 ms, and the profiles' p99 fell from 2.3 s to 1.1 s.
            producer = AIOKafkaProducer(
                acks="all",
                linger_ms=5,
                max_batch_size=256 * 1024,
                **self.settings.kafka_options(),
            )
            await producer.start()
            self._producer = producer
        return self._producer

    async def _send_changelog(
        self, partition: int, key: bytes, value: bytes
    ) -> asyncio.Future[Any]:
        producer = await self.profiles_producer()
        future: asyncio.Future[Any] = await producer.send(
            self.settings.changelog_topic, value, key=key, partition=partition
        )
        return future

    async def writes_acknowledged(self) -> None:
        while self.in_flight:
            await self.in_flight.pop(0)  # a failed write raises here: the agent stops

    async def before_revoke(self, folding: Callable[[], Awaitable[None]] | None = None) -> None:
        """Before the partitions change hands: every write of ours
        acknowledged (or failed), so their next owner recovers all of them
        and none lands after theirs. ``folding()``: until the batch being
        folded (if any) ends; it stops before its next user's writes. The
        stopped batch and its sends get REVOKE_WAIT_SECONDS together."""
        self.generation += 1
        self.delivered_at.clear()  # the next assignment's partitions get their grace again
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REVOKE_WAIT_SECONDS
        try:
            if folding is not None:
                await asyncio.wait_for(folding(), REVOKE_WAIT_SECONDS)
            await asyncio.wait_for(
                asyncio.gather(*self.abandoned, return_exceptions=True),
                max(0.0, deadline - loop.time()),
            )
        except TimeoutError:
            # a broker that answers nothing for that long: what this worker
            # sent may still land after the next owner's writes (no fencing
            # without transactions, docs/architecture.md)
            log.error(
                "writes of a stopped batch still unanswered %d s into a rebalance",
                REVOKE_WAIT_SECONDS,
            )
        self.abandoned.clear()
        try:
            await self.writes_acknowledged()
        except KafkaError as exc:  # the next owner re-reads from the applied offset
            log.error("writes of the last batch failed before a rebalance: %r", exc)
        # what was acknowledged is in the store; anything left failed, and the
        # partitions' next owner (this worker again, maybe) recovers them
        self.unwritten.clear()
        self.unstored.clear()
        self.stored_up_to.clear()  # recovery sets the persisted offsets of what comes next

    async def close(self) -> None:
        self.closing = True  # no batch is folded from here on
        try:
            await self.writes_acknowledged()
        except KafkaError as exc:  # a restart re-reads from the applied offset
            log.error("writes of the last batch failed at shutdown: %r", exc)
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_within(producer, 10, "profiles producer")

    # --- the log's identity ---------------------------------------------------
    async def events_log_id(self) -> bytes | None:
        """The events topic's id as the broker answers now (None: it offers none)."""
        client = (await self.profiles_producer()).client
        topic = self.settings.events_topic
        try:
            found = (await log_identity(client, [topic])).topic_ids
        except KafkaError as exc:
            log.warning("could not ask the broker for the topic id (%r)", exc)
            return None
        topic_id = found.get(topic)
        return None if topic_id is None else str(topic_id).encode()

    def same_log(self, partition: int, current: bytes | None) -> bool:
        stored = self._get(partition, log_key(partition))
        if stored is None or current is None or stored == current:
            return True
        self._stop(
            LogResetError(
                f"{self.settings.events_topic}: the broker's log is not the one the stream's "
                f"state was folded from (partition {partition} was read from topic id "
                f"{stored.decode()}; the broker's has id {current.decode()}); nothing of it "
                "was folded. If the broker lost its log, restart `usertrail up` (it restores "
                "the log from the archive); if that log is gone for good, `usertrail replay "
                "stream` folds the new one from its start"
            )
        )
        return False

    def _stop(self, error: UsertrailError) -> None:
        if self.stopped_for is None:
            self.stopped_for = error
            log.error("%s", error)
            # stop as SIGTERM does (a faust crash left the process running);
            # `usertrail stream` then exits with the error's code
            os.kill(os.getpid(), signal.SIGTERM)

    async def homes(self) -> int | None:
        """The partition count users' homes are taken over (usertrail/topics.py),
        None if the broker cannot say; stops the worker if the events topic
        no longer matches its changelog."""
        producer = await self.profiles_producer()
        counts = {}
        for topic in (
            self.settings.events_topic,
            self.settings.changelog_topic,
            self.settings.profiles_topic,
        ):
            try:
                counts[topic] = len(await producer.partitions_for(topic))
            except KafkaError as exc:
                log.warning("the partitions of %s are unknown (%r)", topic, exc)
        try:
            return homes_count(self.settings, counts)
        except ConfigurationError as exc:
            self._stop(exc)
            raise

    # --- applied offsets ------------------------------------------------------
    def applied_offset(self, partition: int) -> int | None:
        raw = self._get(partition, applied_key(partition))
        return None if raw is None else int(raw)

    async def applied_or_before_start(self, partition: int) -> int | None:
        """The partition's applied offset; with none yet, the offset just
        before the log's start, so that the first record folded is the
        first record there is. faust was seen on Apache Kafka to begin a
        partition new to the group at a later offset (while a rebalance
        moved it under traffic); folding from there would have dropped
        every earlier event for good. None only if the broker cannot say."""
        applied = self.applied_offset(partition)
        if applied is not None:
            return applied
        tp = TP(self.settings.events_topic, partition)
        try:
            starts = await self.consumer.earliest_offsets(tp)
        except KafkaError as exc:
            log.warning("%s: the log's start is unknown (%r); folding what comes", tp, exc)
            return None
        start = starts.get(tp)
        return None if start is None else int(start) - 1

    # --- a batch --------------------------------------------------------------
    def handed_over(self, batch: Sequence[Record]) -> None:
        """Delivered (they wait for the fold, stream/pipeline.py):
        their partitions are not the ones ``reread_undelivered`` looks for."""
        now = time.monotonic()
        for record in batch:
            self.delivered_at[record.partition] = now

    async def fold_batch(self, batch: Sequence[Record]) -> None:
        """Fold one batch of the events topic's records."""
        if self.stopped_for is not None or self.closing:
            return  # stopping (see _stop, close): nothing more is folded
        generation = self.generation
        current = await self.events_log_id()
        if not all(self.same_log(p, current) for p in {r.partition for r in batch}):
            return
        started = time.perf_counter()
        try:
            homes = await self.homes()
        except ConfigurationError:
            return
        forward: list[Record] = []  # records a producer put away from their home
        applied: dict[int, int | None] = {}
        recovered: dict[int, int | None] = {}  # as the batch found them
        gaps: dict[int, int] = {}
        ahead: dict[int, int] = {}
        per_user: dict[bytes, tuple[int, list[tuple[bytes, int, int]]]] = {}
        now = time.monotonic()
        for record in batch:
            partition, offset = record.partition, record.offset
            self.delivered_at[partition] = now
            if partition not in applied:
                applied[partition] = recovered[partition] = await self.applied_or_before_start(
                    partition
                )
            verdict = self.positions.admit(partition, offset, applied[partition])
            if verdict is Verdict.DONE:
                if partition not in ahead:
                    target = self.positions.skip_to(
                        partition, offset, cast(int, applied[partition])
                    )
                    if target is not None:
                        ahead[partition] = target
                continue
            if verdict is Verdict.GAP:
                gaps[partition] = cast(int, applied[partition]) + 1
                continue
            applied[partition] = offset
            key, value = record.key, record.value
            if not is_home(key, partition, homes):
                forward.append(record)  # to be read, and folded, at its home
                continue
            if key is None or value is None:
                continue  # never an event of the contract: the sink dead-letters it
            mine = per_user.get(key)  # a valid event's key is its user id
            if mine is None:
                mine = per_user[key] = (partition, [])
            stamp = record.timestamp
            mine[1].append((value, offset, -1 if stamp is None else stamp))
        try:
            await self._write(
                per_user, applied, recovered, current, len(batch), forward, homes, generation
            )
        except Revoked:
            log.info("a batch of %d records stopped: its partitions are being given up", len(batch))
            return
        if self.on_applied is not None:
            self._when_applied(self.in_flight[0], list(batch), self.on_applied)
        self.folded_at = time.monotonic()
        metrics = self.metrics
        metrics.batch_seconds.observe(time.perf_counter() - started)
        metrics.batch_records.observe(len(batch))
        metrics.records.inc(len(batch))
        if forward:
            metrics.forwarded.inc(len(forward))
        for partition, want in gaps.items():
            if self.positions.should_seek(partition, want):
                log.warning(
                    "%s[%d]: delivery skipped to a later offset; re-reading from %d",
                    self.settings.events_topic,
                    partition,
                    want,
                )
                await self.seek(partition, want)
        for partition, want in ahead.items():
            if partition not in gaps:
                log.info(
                    "%s[%d]: state already holds up to %d; reading on from there",
                    self.settings.events_topic,
                    partition,
                    want - 1,
                )
                await self.seek(partition, want)

    async def _write(
        self,
        per_user: dict[bytes, tuple[int, list[tuple[bytes, int, int]]]],
        applied: dict[int, int | None],
        recovered: dict[int, int | None],
        current: bytes | None,
        n: int,
        forward: Sequence[Record] = (),
        homes: int | None = None,
        generation: int | None = None,
    ) -> None:
        pending: list[Awaitable[Any]] = []
        to_store: list[tuple[int, bytes, bytes]] = []  # into the store once acknowledged
        sent: list[Any] = []  # the changelog sends, for their offsets
        self.unstored.append(sent)

        def write(partition: int, key: bytes, value: bytes) -> None:
            self.unwritten[(partition, key)] = value
            to_store.append((partition, key, value))

        def going_on() -> None:
            """Raises Revoked once partitions are being given up."""
            if generation is not None and self.generation != generation:
                self.abandoned.extend(pending)  # waited for before they go
                raise Revoked

        going_on()

        profiles = await self.profiles_producer()
        for record in forward:
            # a copy at the end of its home partition, where the worker (this
            # one, or the home's owner) folds it and the sink writes it, in
            # that partition's order; the partition's applied offset moves
            # past the original only once the copy is acknowledged
            assert record.key is not None and homes is not None
            stamp = record.timestamp
            pending.append(
                await profiles.send(
                    self.settings.events_topic,
                    record.value,
                    key=record.key,
                    partition=home_partition(record.key, homes),
                    timestamp_ms=None if stamp is None or stamp < 0 else stamp,
                    headers=copy_headers(list(record.headers), record.partition, record.offset),
                )
            )
            going_on()
        if forward:
            log.info("%d records copied to their home partitions", len(forward))
        users = [UserBatch(key, self._get(p, key), items) for key, (p, items) in per_user.items()]
        for (key, (partition, _)), result in zip(
            per_user.items(), await self._fold_with_chunks(users, per_user), strict=True
        ):
            going_on()
            if result is None:
                continue  # nothing new, or not valid events: the sink dead-letters those
            # the store and the changelog directly (what table[key] = value
            # does), so the changelog partition is the event's and the send
            # can be awaited; a chunk before the state that names it
            for index, chunk in result.chunks:
                write(partition, seen_key(key, index), chunk)
                sent.append(await self.send_changelog(partition, seen_key(key, index), chunk))
                pending.append(sent[-1])
            write(partition, key, result.state)
            self.metrics.profiles.inc()
            sent.append(await self.send_changelog(partition, key, result.state))
            pending.append(sent[-1])
            pending.append(
                await profiles.send(self.settings.profiles_topic, result.message, key=key)
            )
        marks: list[tuple[int, bytes, bytes]] = []
        for partition, done_to in applied.items():
            if done_to is not None and done_to != recovered[partition]:
                mark, value = applied_key(partition), str(done_to).encode()
                write(partition, mark, value)
                marks.append((partition, mark, value))
                if current is not None and self._get(partition, log_key(partition)) != current:
                    write(partition, log_key(partition), current)
                    marks.append((partition, log_key(partition), current))
        # Each partition's applied offset goes to its changelog partition only
        # once this batch's other writes and every earlier batch's are
        # acknowledged, so a recovered applied offset implies all of them:
        # without an idempotent producer (the embedded broker has none) a
        # write can fail while a later one to the same partition gets
        # through. One future: done when every write so far is acknowledged.
        previous = list(self.in_flight)

        async def send_marks(
            marks: list[tuple[int, bytes, bytes]] = marks,
        ) -> Sequence[Awaitable[Any]]:
            futures = [await self.send_mark(*m) for m in marks]
            sent.extend(futures)
            return futures

        writes = asyncio.ensure_future(then_send([*pending, *previous], send_marks))
        self.in_flight[:] = [writes]
        self._when_acknowledged(writes, n, to_store, sent)
        for earlier in previous:
            await earlier  # at most two batches' writes in flight

    async def _fold_with_chunks(
        self,
        users: list[UserBatch],
        per_user: dict[bytes, tuple[int, list[tuple[bytes, int, int]]]],
    ) -> list[Folded | None]:
        """``fold``, and again for the users whose late resends need sealed
        chunks of their event ids (stream/fold.py), with those chunks."""
        with self.metrics.fold_seconds.time():
            results = await self.fold(users)
        for _ in range(3):
            wanted = [i for i, r in enumerate(results) if isinstance(r, Wanted)]
            if not wanted:
                break
            again = []
            for i in wanted:
                want = cast(Wanted, results[i])
                partition = per_user[users[i].key][0]
                chunks = {}
                for index in want.chunks:
                    value = self._get(partition, seen_key(users[i].key, index))
                    if value is None:  # a write the broker lost: nothing to compare with
                        log.error(
                            "user %r: sealed chunk %d of event ids is missing",
                            users[i].key[:200],
                            index,
                        )
                        value = b""
                    chunks[index] = value
                users[i] = users[i]._replace(chunks=chunks)
                again.append(users[i])
            with self.metrics.fold_seconds.time():
                folded_again = await self.fold(again)
            for i, result in zip(wanted, folded_again, strict=True):
                results[i] = result
        out: list[Folded | None] = []
        for r in results:
            if isinstance(r, Wanted):
                raise RuntimeError(f"sealed chunks {r.chunks} still wanted after loading them")
            out.append(r)
        return out

    def _when_acknowledged(
        self,
        writes: asyncio.Future[Any],
        n: int,
        batch: list[tuple[int, bytes, bytes]],
        sent: list[Any],
    ) -> None:
        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                return
            if (exc := f.exception()) is not None:
                # the next batch raises it; the next owner or a restart
                # re-reads from the applied offset
                log.error("a batch's writes failed: %r", exc)
                return
            self._store(batch, sent)  # before anything awaiting the batch resumes
            if self.on_batch is not None:
                self.on_batch(n)

        writes.add_done_callback(done)

    @staticmethod
    def _when_applied(
        writes: asyncio.Future[Any],
        records: list[Record],
        on_applied: Callable[[Sequence[Record]], None],
    ) -> None:
        def done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                on_applied(records)

        writes.add_done_callback(done)

    def lags(self) -> list[tuple[str, int, int]]:
        """(topic, partition, records not yet folded) of each events partition
        assigned: the high-water mark past the applied offset."""
        out = []
        for tp in list(self.consumer.assignment()):
            if tp.topic != self.settings.events_topic:
                continue
            try:
                high = self.consumer.highwater(tp)
            except AssertionError:  # revoked meanwhile
                continue
            if high is None:
                continue
            applied = self.applied_offset(tp.partition)
            out.append((tp.topic, tp.partition, max(0, high - (applied or -1) - 1)))
        return out

    # --- records fetched but never delivered ------------------------------------
    async def reread_undelivered(self) -> None:
        """On Apache Kafka, with a rebalance under traffic, faust was seen to
        fetch a partition new to the group to its end without handing one
        record to the agent: the consumer's position sat at the high-water
        mark, the table had nothing of it, and nothing more came until new
        traffic. So: a partition that has records past its applied offset
        (or, none applied yet, past the log's start) and delivered nothing
        for RESEEK_SECONDS is re-read from the first record not applied. A
        needless re-read costs only reading: records already applied are
        skipped. (Run by a timer; not while the app rebalances.)"""
        now = time.monotonic()
        for tp in list(self.consumer.assignment()):
            if tp.topic != self.settings.events_topic:
                continue
            since = self.delivered_at.setdefault(tp.partition, now)  # grace after assignment
            if now - since < RESEEK_SECONDS:
                continue
            try:
                high = self.consumer.highwater(tp)
            except AssertionError:  # aiokafka's word for "revoked meanwhile"
                continue
            applied = await self.applied_or_before_start(tp.partition)
            if high is None or applied is None or high <= applied + 1:
                continue
            log.warning(
                "%s[%d]: records up to %d were never delivered; re-reading from %d",
                self.settings.events_topic,
                tp.partition,
                high - 1,
                applied + 1,
            )
            self.delivered_at[tp.partition] = now
            await self.seek(tp.partition, applied + 1)

    async def seek(self, partition: int, offset: int) -> None:
        try:
            await self.consumer.seek_wait({TP(self.settings.events_topic, partition): offset})
        except KafkaError as exc:  # revoked meanwhile: its new owner reads it
            log.warning("seek of partition %d failed: %r", partition, exc)
