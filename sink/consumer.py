"""The sink's consumer loop: ``usertrail.events`` -> PostgreSQL.

A member of the consumer group ``usertrail-sink`` (several processes share
the partitions). Positions live in the database, written with the rows
(``usertrail_positions``); on assignment the sink seeks to them. Kafka
commits are made after each batch for lag monitoring only. Where the log is
archived (``Settings.archiving``), the raw records go to
``usertrail_archive`` in the same transaction (docs/log.md).

Outages never skip anything: while the database is down the same batch is
retried with backoff; while the broker is down the consumer keeps asking.
Each position is stored with the id of the topic it was read from. A log
that is not that one (the broker answers another topic id, or a high-water
mark below the position: a recreated topic, a wiped or restarted embedded
broker, another cluster) stops the sink with LogResetError before it writes
anything read from it; with ``on_log_reset="start-over"`` it forgets the
positions and reads the new log from its start instead (idempotent writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import psycopg
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka.errors import (
    InvalidSessionTimeoutError,
    KafkaConnectionError,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
)
from usertrail.sink.careful import Careful, in_flight
from usertrail.sink.metrics import SinkMetrics
from usertrail.sink.plan import Record
from usertrail.sink.writer import Prepared, UnknownUsers, Writer, WriteResult

from usertrail import deadletters
from usertrail.errors import ConfigurationError, LogResetError, StalledError, UsertrailError
from usertrail.kafka import (
    adopt_stale_group_leaders,
    log_identity,
    never_create_topics,
    partitions_of,
    stop_within,
)
from usertrail.settings import Settings
from usertrail.topics import homes_in

log = logging.getLogger("usertrail.sink")

GROUP = "usertrail-sink"
STOP_CATCH_UP = 10.0
"""Seconds a stopping sink goes on writing what the log holds."""
ASK_TIMEOUT = 5.0
"""Seconds for a request whose answer can wait (topic ids; the last commit
kept for lag tools, at stop): aiokafka's own timeout is 40 s, and it
retries a commit without end."""
_PUBLISH_CHUNK = 500
"""Dead letters published, and marked, per transaction."""
_FETCH_SLICE = 64
"""Records taken from aiokafka between two yields to the event loop (see
writer._SLICE: 500 cost about a tenth of the sink's rate)."""


@dataclass(frozen=True)
class SinkOptions:
    group: str = GROUP
    unknown_users: UnknownUsers = "create"
    # records fetched per batch at most (split among the writers): a
    # transaction carries costs of its own, fewer when it holds more
    batch_max_records: int = 20000
    batch_max_wait_ms: int = 200
    max_backoff: float = 10.0
    # False for replay db: its dead letters are on the topic already
    publish_dead_letters: bool = True
    # keep the raw records in usertrail_archive; None: Settings.archiving
    archive: bool | None = None
    # a log that is not the one the positions were read from: "stop" with
    # LogResetError, or "start-over" from its beginning
    on_log_reset: Literal["stop", "start-over"] = "stop"
    # take every partition without joining the group (``up``'s last read
    # before it stops the embedded broker: no rebalance to wait for)
    assign_all: bool = False
    # seconds a stored position may lie beyond its partition's end before the
    # log counts as another one (_beyond_the_end)
    beyond_grace: float = 60.0
    # PostgreSQL connections writing at once, each the batches of its share
    # of the partitions (Sink.assign_lanes), in order
    writers: int = 2


def _commit_done(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.debug("kafka commit (monitoring only) failed: %r", exc)


class _SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
    """Seeks newly assigned partitions to the positions stored in the database."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.sink._unassigned_since = time.monotonic()
        # Every fetched batch is written before the partitions change hands.
        await self.sink.drain()
        self.sink.careful.forget([(tp.topic, tp.partition) for tp in revoked])
        for tp in revoked:
            self.sink._beyond.pop(tp, None)
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.sink.assign_lanes(assigned)
        await self.sink.seek_to_stored(assigned)
        self.sink._unassigned_since = None


class Sink:
    def __init__(
        self,
        settings: Settings,
        options: SinkOptions | None = None,
        metrics: SinkMetrics | None = None,
        *,
        dsn: str | None = None,
    ) -> None:
        """``dsn``: where to write instead of the settings' database
        (``replay db`` writes shadow tables through a search_path)."""
        self.settings = settings
        self.options = options or SinkOptions()
        self.metrics = metrics or SinkMetrics()
        if self.options.writers < 1:
            raise ConfigurationError(f"writers must be 1 or more, not {self.options.writers}")
        # Lanes: each writer has a connection of its own and writes the
        # batches of its share of the partitions (assign_lanes), one
        # transaction at a time, in the order they were fetched.
        # A partition's records (a user's events, the fences, positions and
        # archive rows of the partition) thus stay in one lane, in log
        # order; lanes meet only where sinks of a group meet (unique ids,
        # the "User" rows), which the writer handles for any two writers.
        # Two lanes keep PostgreSQL writing one batch while it commits the
        # other, and on a busy host they get it a second core's share.
        archive = settings.archiving if self.options.archive is None else self.options.archive
        self.writers = [
            Writer(
                dsn or settings.database_dsn(),
                group=self.options.group,
                unknown_users=self.options.unknown_users,
                profiles_topic=settings.profiles_topic,
                archive=archive,
                outbox=self.options.publish_dead_letters,
            )
            for _ in range(self.options.writers)
        ]
        # the first lane's also reads and marks positions, and forgets them;
        # what the consumer learns of the topics, every lane knows
        self.writer = self.writers[0]
        for other in self.writers[1:]:
            other.topic_ids, other.homes = self.writer.topic_ids, self.writer.homes
        # dead letters may wait in the table for the topic (a sink killed
        # before it published them, a broker that refused them): published
        # at the start, and with every batch that has dead letters
        self._publish_at_start = self.options.publish_dead_letters
        self._refusal: UsertrailError | None = None
        # the stall watchdog's view: since when without partitions (None:
        # assigned), whether waiting for the database, what it last saw
        self._unassigned_since: float | None = time.monotonic()
        self._waiting_for_db = False
        self._stalled: StalledError | None = None
        self._caught_up = False
        self._stop_by = 0.0
        self._forget: set[str] = set()
        self._beyond: dict[TopicPartition, float] = {}  # since when past the end (_beyond_the_end)
        self.careful = Careful()  # records a sink was handling when it died
        self.consumer = AIOKafkaConsumer(
            group_id=self.options.group,
            enable_auto_commit=False,
            # Positions come from the database; a position past the end of
            # the log raises (Apache Kafka) or fetches nothing with a lower
            # high-water mark (tansu): both are handled as a reset log.
            auto_offset_reset="none",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            fetch_max_wait_ms=settings.fetch_wait_ms,
            fetch_min_bytes=settings.fetch_min_bytes,
            **settings.group_options(),
            **settings.kafka_options(),
        )
        self.producer = AIOKafkaProducer(acks="all", **settings.kafka_options())
        self._stopping = asyncio.Event()
        # Per lane, fetched and prepared batches waiting for its writer:
        # preparing the next batch overlaps with PostgreSQL writing this one.
        self._queues: list[asyncio.Queue[Prepared | None]] = [
            asyncio.Queue(2) for _ in self.writers
        ]
        self._lanes: list[asyncio.Task[None]] = []
        self._lane_of: dict[int, int] = {}  # partition number -> lane (assign_lanes)
        self._committing: asyncio.Future[Any] | None = None
        self._to_commit: dict[TopicPartition, int] = {}
        self.written = WriteResult()

    def stop(self) -> None:
        """Write what the log holds (up to ``STOP_CATCH_UP`` seconds more),
        then return from ``run``: on the embedded broker, what the sink has
        not archived when the broker stops is lost (docs/log.md)."""
        self._stop_by = time.monotonic() + STOP_CATCH_UP
        self._stopping.set()

    async def seek_to_stored(self, assigned: Sequence[TopicPartition]) -> None:
        if not assigned:
            return
        topics = sorted({tp.topic for tp in assigned})  # events and profiles
        await self._learn_homes()
        current = await self._topic_ids(topics)
        stored: dict[TopicPartition, int] = {}
        for topic in topics:
            partitions = [tp.partition for tp in assigned if tp.topic == topic]
            found = await self._retry_db(
                lambda t=topic, ps=partitions: self.writer.positions(t, ps), "read positions"
            )
            ids = {i for _, i in found.values() if i is not None}
            now = current.get(topic)
            if now is not None and ids - {now}:
                reset = self._log_reset(topic, _other_id(min(ids - {now}), now))
                if reset is not None:
                    self._refusal = reset
                    log.error("%s", reset)
                    continue  # not sought: nothing of it is read
                found = {}
            if now is not None:
                self.writer.topic_ids[topic] = now
            stored.update({TopicPartition(topic, p): o for p, (o, _) in found.items()})
            marks = await self._retry_db(
                lambda t=topic, ps=partitions: self.writer.in_flight(t, ps), "read in-flight marks"
            )
            for p in partitions:
                position = found[p][0] if p in found else None
                if self.careful.found((topic, p), position, marks.get(p)):
                    first, last, attempts = marks[p]
                    log.warning(
                        "%s[%d]: records up to %d were in flight when a sink died (%d time(s) "
                        "with the same ones); reading them again in parts (sink/careful.py)",
                        topic,
                        p,
                        last,
                        attempts,
                    )
        for tp in assigned:
            if tp in stored:
                self.consumer.seek(tp, stored[tp])
            elif self._refusal is None:
                await self.consumer.seek_to_beginning(tp)  # the log is the source of truth
        log.info(
            "assigned %s",
            {f"{tp.topic}[{tp.partition}]": stored.get(tp, 0) for tp in sorted(assigned)},
        )

    async def _learn_homes(self) -> None:
        """The partition count of the events topic's homes (usertrail/topics.py);
        a count that no longer matches the stream's changelog is refused."""
        events = self.settings.events_topic
        try:
            cluster = await asyncio.wait_for(self.producer.client.fetch_all_metadata(), ASK_TIMEOUT)
        except (KafkaError, TimeoutError) as exc:
            log.warning("the events topic's partition count is unknown (%r)", exc)
            return
        try:
            homes = homes_in(self.settings, cluster)
        except ConfigurationError as exc:
            self._refusal = self._refusal or exc
            log.error("%s", exc)
            return
        if homes is not None:
            self.writer.homes[events] = homes

    async def _topic_ids(self, topics: Sequence[str]) -> dict[str, UUID | None]:
        """The broker's id of each topic (None: none offered, or no such topic)."""
        try:
            # the dead-letter producer's connections: a request on the
            # consumer's waits behind its fetch (up to fetch_max_wait_ms).
            # Bounded: asked inside the assignment callback too, and a frozen
            # broker would hold the request for aiokafka's 40 s request
            # timeout while the group waits for this member.
            return (
                await asyncio.wait_for(
                    log_identity(self.producer.client, list(topics)), ASK_TIMEOUT
                )
            ).topic_ids
        except (KafkaError, TimeoutError) as exc:
            log.warning("could not ask the broker for topic ids (%r); asking again later", exc)
            return {}

    def _log_reset(self, topic: str, why: str) -> LogResetError | None:
        """A log that is not the one the stored positions of ``topic`` were
        read from: the error to stop with, or None where the operator asked
        to start over (the caller then forgets the positions)."""
        if self.options.on_log_reset == "start-over":
            log.warning(
                "%s: the log was reset (%s); starting over from its beginning "
                "(--on-log-reset start-over)",
                topic,
                why,
            )
            self._forget.add(topic)
            return None
        return LogResetError(
            f"{topic}: the broker's log is not the one the stored positions of "
            f"'{self.options.group}' were read from ({why}); nothing was written from it. "
            "If the broker "
            "lost its log, restart `usertrail up` (it restores the log from the archive) or "
            "run `usertrail log restore`; if that log is gone for good, run the sink with "
            "`--on-log-reset start-over` to read the new one from its start"
        )

    async def _start_over_where_reset(self, topics: Sequence[str]) -> None:
        """``--on-log-reset start-over``, before the group is joined: forget
        the positions of each topic whose stored ids are not the broker's, so
        that the assignment finds none and reads from the beginning (found
        later, the positions are forgotten while the consumer runs, below)."""
        current = await self._topic_ids(topics)
        for topic in topics:
            now = current.get(topic)
            if now is None:
                continue
            found = await self._retry_db(
                lambda t=topic: self.writer.positions(t, None), "read positions"
            )
            old = {i for _, i in found.values() if i is not None} - {now}
            if old:
                self._log_reset(topic, _other_id(min(old), now))
            self.writer.topic_ids[topic] = now
        await self._forget_positions(seek=False)

    async def _forget_positions(self, *, seek: bool = True) -> None:
        """Start over on the topics a reset was found on (``--on-log-reset
        start-over``): every fetched batch written first, then the positions
        forgotten and the partitions read from their beginning."""
        if not self._forget:
            return
        await self.drain()
        self._lane_failure()  # not while a lane that failed holds its batch
        while self._forget:  # a reset may be found meanwhile (the assignment listener)
            topic = min(self._forget)
            n = await self._retry_db(lambda t=topic: self.writer.forget_positions(t), "forget")
            for other in self.writers[1:]:
                other.forget_archived(topic)
            log.warning("%s: forgot %d stored positions; reading it from its start", topic, n)
            ids = await self._topic_ids([topic])
            if ids.get(topic) is not None:
                self.writer.topic_ids[topic] = ids[topic]  # type: ignore[assignment]
            self._forget.discard(topic)
            if seek:
                for tp in self.consumer.assignment():
                    if tp.topic == topic:
                        await self.consumer.seek_to_beginning(tp)

    async def _retry_db(self, action: Any, what: str, writer: Writer | None = None) -> Any:
        """``action`` once it succeeds, on ``writer``'s connection (by
        default the first lane's), reconnected after connection errors."""
        writer = writer or self.writer
        delay = 0.2
        while True:
            try:
                await writer.connect()
                result = await action()
                self._waiting_for_db = False
                return result
            except psycopg.OperationalError as exc:
                self._waiting_for_db = True
                self.metrics.retries.labels("database").inc()
                log.warning(
                    "database unavailable (%s) during %s; retrying in %.1fs",
                    str(exc).strip().splitlines()[0],
                    what,
                    delay,
                )
                await writer.close_broken()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.options.max_backoff)

    async def run(self) -> None:
        main = asyncio.current_task()
        assert main is not None
        watchdog = asyncio.create_task(self._watch(main))
        try:
            await self._run()
        except asyncio.CancelledError:
            if self._stalled is None:
                raise
            raise self._stalled from None
        finally:
            watchdog.cancel()

    def _missing_topics(self) -> list[str]:
        """The sink's topics the broker's last metadata did not list (none
        if it never answered)."""
        cluster = self.consumer._client.cluster
        known = cluster.topics()
        if not known and not cluster.brokers():
            return []
        wanted = [self.settings.events_topic, self.settings.profiles_topic]
        return [t for t in wanted if t not in known]

    async def _watch(self, main: asyncio.Task[Any]) -> None:
        """Stop the sink (StalledError, exit code 6) when it makes no progress
        for ``stall_seconds``: no partitions assigned, or partitions behind
        their high-water mark and nothing written. Waiting for the database
        is not a stall (it is said, and retried, already)."""
        bound = self.settings.stall_seconds
        written, since = self.written.records, time.monotonic()
        while True:
            await asyncio.sleep(min(5.0, bound / 4))
            if not self._stopping.is_set() and self._refusal is None:
                await self._check_unread_logs()
            now = time.monotonic()
            if self._waiting_for_db or self._stopping.is_set():
                written, since = self.written.records, now
                continue
            why = ""
            if self._unassigned_since is not None and not self.options.assign_all:
                if now - self._unassigned_since > bound:
                    missing = self._missing_topics()
                    why = f"no partitions assigned for {now - self._unassigned_since:.0f} s: " + (
                        f"topics {', '.join(missing)} do not exist on the broker (they are "
                        "made by `usertrail up --only-setup` or compose's init)"
                        if missing
                        else f"the group '{self.options.group}' did not form, or the broker "
                        "did not answer"
                    )
            elif self.written.records != written or not (behind := await self._behind()):
                written, since = self.written.records, now
            elif now - since > bound:
                why = f"nothing read for {now - since:.0f} s while behind: {behind}"
            if why:
                self._stalled = StalledError(f"the sink stalled ({why}); exiting to start again")
                log.error("%s", self._stalled)
                main.cancel()
                return

    async def _check_unread_logs(self) -> None:
        """Is each topic this sink read from, but has no partition of now,
        still the same log? ``_same_log`` asks after every fetch, and a topic
        none of whose partitions is assigned is never fetched: a sink that
        rejoined its group on a broker restarted empty was assigned nothing
        (seen on tansu) and waited there, its log gone, instead of stopping."""
        assigned = {tp.topic for tp in self.consumer.assignment()}
        topics = sorted(t for t in self.writer.topic_ids if t not in assigned)
        if not topics:
            return
        self._compare_ids(await self._topic_ids(topics))

    async def _run(self) -> None:
        for writer in self.writers:  # each knows where the archive ends before it prepares
            await self._retry_db(lambda: self._noop(), "connect", writer)
        never_create_topics()  # usertrail/kafka.py: topics are made by ensure_topics alone
        # first: its connections ask the broker for topic ids (below), which
        # must not queue behind the consumer's long-polling fetches
        await self._start_client(self.producer)
        topics = [self.settings.events_topic, self.settings.profiles_topic]
        if not self.options.assign_all and self.settings.is_tansu:
            adopt_stale_group_leaders()  # docs/brokers.md, "Stale group leader"
        if self.options.on_log_reset == "start-over":
            await self._start_over_where_reset(topics)
        if not self.options.assign_all:
            self.consumer.subscribe(topics, listener=_SeekToStored(self))
        await self._start_client(self.consumer)
        if self.options.assign_all:
            tps = [tp for t in topics for tp in await partitions_of(self.consumer, t)]
            self.consumer.assign(tps)
            self.assign_lanes(tps)
            await self.seek_to_stored(tps)
        self._lanes = [asyncio.create_task(self._write_loop(i)) for i in range(len(self.writers))]
        try:
            while not (self._stopping.is_set() and self._done_reading()):
                self._lane_failure()
                fetched = await self._step()
                if self._stopping.is_set():
                    self._caught_up = not fetched and await self._at_the_end()
            for lane in range(len(self._lanes)):
                await self._hand(lane, None)
            await asyncio.gather(*self._lanes)
            if behind := await self._behind():
                log.warning("stopped before the end of %s", behind)
        finally:
            for task in self._lanes:
                if not task.done():
                    task.cancel()
            if self._committing is not None:  # the last commits for lag tools, briefly
                await asyncio.wait({self._committing}, timeout=ASK_TIMEOUT)
            if self._refusal is None and (self._committing is None or self._committing.done()):
                held = self.consumer.assignment()
                offsets = {tp: o for tp, o in self._to_commit.items() if tp in held}
                self._to_commit = {}
                if offsets:
                    with contextlib.suppress(KafkaError, TimeoutError):
                        await asyncio.wait_for(self.consumer.commit(offsets), ASK_TIMEOUT)
            await stop_within(self.consumer, 10, "consumer")
            await stop_within(self.producer, 10, "dead-letter producer")
            for writer in self.writers:
                await writer.close()

    @staticmethod
    async def _noop() -> None:
        return None

    def _session_refused(self) -> ConfigurationError:
        """A group session the broker will never accept: retrying is futile."""
        session = self.settings.group_options()["session_timeout_ms"]
        return ConfigurationError(
            f"the broker refuses a consumer-group session of {session} ms (below its "
            "group.min.session.timeout.ms): set USERTRAIL_GROUP_SESSION_TIMEOUT_MS higher, "
            "or unset it for the default"
        )

    async def _start_client(self, client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
        delay = 0.2
        while True:
            try:
                await client.start()
                return
            except KafkaError as exc:
                log.warning("broker unavailable (%r); retrying in %.1fs", exc, delay)
                self.metrics.retries.labels("broker").inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.options.max_backoff)

    def _done_reading(self) -> bool:
        return self._caught_up or time.monotonic() > self._stop_by

    async def _at_the_end(self) -> bool:
        """Every partition of this member read to its high-water mark (a
        sink stopped before it joined its group has read nothing yet)."""
        return bool(self.consumer.assignment()) and not await self._behind()

    async def _behind(self) -> str:
        """The partitions not read to their high-water mark: where and why."""
        out = []
        for tp in sorted(self.consumer.assignment()):
            high = self.consumer.highwater(tp)
            try:
                position: int | str = await asyncio.wait_for(self.consumer.position(tp), 1)
            except (KafkaError, TimeoutError):
                position = "none"
            if high is None or not isinstance(position, int) or position < high:
                out.append(f"{tp.topic}[{tp.partition}] at {position} of {high}")
        return ", ".join(out)

    async def _step(self) -> int:
        """Fetch a batch and hand it to the writer; the records fetched."""
        records: list[Record] = []
        failure: KafkaError | None = None
        try:
            await self._fetch(records)
        except InvalidSessionTimeoutError:
            raise self._session_refused() from None
        except KafkaError as exc:
            failure = exc
        if records:
            await self._same_log({r.topic for r in records})
        if self._refusal is not None:
            raise self._refusal
        if self._forget:
            await self._forget_positions()
            return 1  # what was fetched came from before the new beginning
        if records:  # fetched before a failure: the consumer's position is past them
            for topic, partition in {(r.topic, r.partition) for r in records}:
                # read from: not beyond its end (any more)
                self._beyond.pop(TopicPartition(topic, partition), None)
            records, again, classified = self.careful.cut(records)
            for (topic, partition), offset in again.items():
                self.consumer.seek(TopicPartition(topic, partition), offset)
            # what this batch holds, marked before it is decoded: if decoding
            # or writing it kills the process, the next sink knows (careful.py)
            if self.careful.active:
                # nothing else in flight while records are read again with
                # care: a death is then this batch's alone (careful.py)
                await self.drain()
            marks = in_flight(records)
            await self._retry_db(lambda: self.writer.mark_in_flight(marks), "mark in flight")
            # Preparing yields to the event loop every few hundred records, so
            # the writers' round trips to PostgreSQL wait microseconds, not
            # the tens of milliseconds a whole batch takes to decode.
            for lane, (some, decided) in self._by_lane(records, classified):
                await self._hand(lane, await self.writers[lane].prepare(some, classified=decided))
        if failure is not None:
            await self._fetch_failed(failure)
            return 1  # not caught up: the broker did not answer
        await self._check_reset_and_lag()
        return len(records)

    async def _same_log(self, topics: set[str]) -> None:
        """Asked after every fetch, before anything fetched is written: is
        each topic still the log the positions were read from? (The fetch may
        have come from a broker that lost its log a moment ago.)"""
        current = await self._topic_ids(sorted(topics))
        for _ in range(25):  # the broker just answered a fetch: ask it again
            if current:
                break
            await asyncio.sleep(0.2)
            current = await self._topic_ids(sorted(topics))
        else:
            raise KafkaConnectionError("the broker did not say which log it holds")
        self._compare_ids(current)

    def _compare_ids(self, current: dict[str, UUID | None]) -> None:
        """The broker's topic ids against those the positions were read
        from: a topic seen for the first time is noted, another id is a
        log reset."""
        for topic, now in sorted(current.items()):
            known = self.writer.topic_ids.get(topic)
            if now is None:
                continue
            if known is None:
                self.writer.topic_ids[topic] = now
            elif known != now:
                self._refusal = self._refusal or self._log_reset(topic, _other_id(known, now))

    async def _fetch(self, records: list[Record]) -> None:
        """Fill ``records`` up to a batch: waiting up to the batch time for
        the first, then taking what is already fetched, a slice at a time
        (aiokafka turns a whole ``getmany`` into records in one go, and the
        writer waits meanwhile)."""
        limit, timeout = self.options.batch_max_records, self.options.batch_max_wait_ms
        while len(records) < limit:
            batch = await self.consumer.getmany(
                timeout_ms=timeout, max_records=min(_FETCH_SLICE, limit - len(records))
            )
            if not batch:
                return
            records.extend(
                Record(tp.topic, tp.partition, r.offset, r.key, r.value, r.timestamp, r.headers)
                for tp, rs in batch.items()
                for r in rs
            )
            timeout = 0
            await asyncio.sleep(0)

    async def _fetch_failed(self, exc: KafkaError) -> None:
        if isinstance(exc, OffsetOutOfRangeError):
            for tp in list(exc.args[0]) if exc.args else []:
                await self._beyond_the_end(tp)
            await asyncio.sleep(0.5)  # before asking again
        elif isinstance(exc, NoOffsetForPartitionError):
            # aiokafka looked for a committed offset while the assignment
            # listener was still reading the stored positions: seek again
            lost = [tp for tp in exc.args if isinstance(tp, TopicPartition)]
            log.info("no position for %s yet; seeking to the stored positions", lost)
            await self.seek_to_stored([tp for tp in lost if tp in self.consumer.assignment()])
        else:
            log.warning("broker error while fetching: %r", exc)
            self.metrics.retries.labels("broker").inc()
            await asyncio.sleep(0.5)

    def assign_lanes(self, assigned: Sequence[TopicPartition]) -> None:
        """The lanes share this sink's partitions (by number: a topic's
        partition and the other topic's of the same number, a user's events
        and profile, go to one lane) in turn, whichever numbers the group
        gave it. Changed only with the assignment, after the revocation
        waited for every lane (a batch still being prepared then meets the
        new owner's fence, as a batch of a sink that lost the partition)."""
        numbers = sorted({tp.partition for tp in assigned})
        self._lane_of = {p: i % len(self.writers) for i, p in enumerate(numbers)}

    def _by_lane(
        self, records: list[Record], classified: list[Any] | None
    ) -> list[tuple[int, tuple[list[Record], list[Any] | None]]]:
        """A batch as each lane's part of it (records in their order), by lane."""
        lanes = len(self.writers)
        if lanes == 1:
            return [(0, (records, classified))]
        lane_of = self._lane_of
        parts: dict[int, tuple[list[Record], list[Any] | None]] = {}
        for i, r in enumerate(records):
            some, decided = parts.setdefault(
                lane_of.get(r.partition, r.partition % lanes),
                ([], None if classified is None else []),
            )
            some.append(r)
            if decided is not None and classified is not None:
                decided.append(classified[i])
        return sorted(parts.items())

    async def _hand(self, lane: int, prepared: Prepared | None) -> None:
        """``prepared`` queued for ``lane``'s writer (None: its last); a lane
        that failed meanwhile raises its error here instead of leaving the
        fetch loop waiting for room in its queue."""
        put = asyncio.ensure_future(self._queues[lane].put(prepared))
        try:
            await asyncio.wait({put, self._lanes[lane]}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
        self._lane_failure()

    def _lane_failure(self) -> None:
        """A lane that stopped early failed: stop, and say why."""
        for task in self._lanes:
            if task.done():
                task.result()

    async def _write_loop(self, lane: int) -> None:
        queue, writer = self._queues[lane], self.writers[lane]
        while True:
            if self._publish_at_start and lane == 0:
                self._publish_at_start = False
                await self._publish_dead_letters()
            item = await queue.get()
            if item is None:
                queue.task_done()
                return
            try:
                started = time.perf_counter()
                result = await self._retry_db(lambda p=item: writer.apply(p), "write", writer)
                self._account(result, time.perf_counter() - started)
                self._commit_for_monitoring(result)
                if result.dead_letters and self.options.publish_dead_letters:
                    await self._publish_dead_letters()
            finally:
                queue.task_done()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the sink is working, and what it is doing: not while it
        waits for the database, nor once it stalled (it then exits)."""
        state: dict[str, Any] = {
            "partitions": len(self.consumer.assignment()),
            "records": self.written.records,
        }
        if self._stalled is not None:
            return False, {**state, "state": str(self._stalled)}
        if self._waiting_for_db:
            return False, {**state, "state": "waiting for the database"}
        if self._stopping.is_set():
            return True, {**state, "state": "stopping"}
        if self._unassigned_since is not None and not self.options.assign_all:
            since = time.monotonic() - self._unassigned_since
            return True, {**state, "state": f"joining the group ({since:.0f} s)"}
        return True, {**state, "state": "writing"}

    async def drain(self) -> None:
        """Wait until every fetched batch is written, or a lane's writer has
        failed (the main loop says why and stops; a rebalance waiting here
        must not wait for ever). A lane that took its last batch is done,
        not failed: the others are still waited for."""
        if not self._lanes:
            return
        joined: asyncio.Future[Any] = asyncio.gather(*(q.join() for q in self._queues))
        try:
            while not joined.done():
                if any(t.done() and (t.cancelled() or t.exception()) for t in self._lanes):
                    return
                working = {t for t in self._lanes if not t.done()}
                await asyncio.wait({joined, *working}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            joined.cancel()

    def _account(self, result: WriteResult, seconds: float) -> None:
        m = self.metrics
        m.batch_size.observe(result.records)
        m.batch_seconds.observe(seconds)
        m.rows.labels("UserInteraction").inc(result.interactions)
        m.rows.labels("UserPreferences").inc(result.preferences)
        m.rows.labels("user_vectors").inc(result.vectors)
        for dead in result.dead_letters:
            m.dead_letters.labels(dead.reason).inc()
        self.written.add(result)

    async def _publish_dead_letters(self) -> None:
        """Every dead letter the table holds "unpublished" onto the dead-letter
        topic, for tools that watch it (the table, written in the batch's
        transaction, is the record of truth), oldest first: taken under a
        lock another sink of the group passes over, sent, and each marked
        once the broker acknowledged it. What failed stays for the next
        batch with dead letters, or the sink's next start: each reaches the
        topic at least once (twice if the sink dies between the
        acknowledgement and the mark). On a connection of its own: the
        writer's may be in a batch's transaction meanwhile."""
        try:
            async with await psycopg.AsyncConnection.connect(self.writer.conninfo) as conn:
                while True:
                    async with conn.transaction():
                        rows = await (
                            await conn.execute(
                                'SELECT id, reason, error, topic, partition, "offset", key, '
                                "value FROM usertrail_dead_letters WHERE unpublished "
                                "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                                (_PUBLISH_CHUNK,),
                            )
                        ).fetchall()
                        acknowledged, failed = await deadletters.send(
                            self.producer, self.settings.dead_letter_topic, rows
                        )
                        await conn.execute(
                            "UPDATE usertrail_dead_letters SET unpublished = false "
                            "WHERE id = ANY(%s)",
                            (acknowledged,),
                        )
                    if failed:
                        log.warning(
                            "%d dead letters not published to %s (they are in the table, and "
                            "go with the next batch that has some): %r",
                            len(failed),
                            self.settings.dead_letter_topic,
                            failed[0],
                        )
                        return
                    if len(rows) < _PUBLISH_CHUNK:
                        return
        except (KafkaError, psycopg.Error) as exc:
            log.warning(
                "could not publish dead letters to %s (they are in the table, and go "
                "with the next batch that has some): %r",
                self.settings.dead_letter_topic,
                exc,
            )

    def _commit_for_monitoring(self, result: WriteResult) -> None:
        """The written positions, committed to the group for lag tools (the
        positions that count live in the database). Never waited for: aiokafka
        retries a commit while the group's coordinator is unreachable, and a
        rebalance waits (drain, in the revocation callback) for the writer.
        One commit at a time; positions written meanwhile go with the next."""
        self._to_commit.update({TopicPartition(t, p): o for (t, p), o in result.positions.items()})
        if self._committing is not None and not self._committing.done():
            return
        offsets, self._to_commit = self._to_commit, {}
        self._committing = asyncio.ensure_future(self.consumer.commit(offsets))
        self._committing.add_done_callback(_commit_done)

    async def _check_reset_and_lag(self) -> None:
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                continue
            position = await self.consumer.position(tp)
            if position > highwater:
                await self._beyond_the_end(tp, f", whose end is {highwater}")
            else:
                self._beyond.pop(tp, None)
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(highwater - position)

    async def _beyond_the_end(self, tp: TopicPartition, end: str = "") -> None:
        """A stored position past the end of the log. For ``beyond_grace``
        seconds it is asked again: on Apache Kafka a partition's new leader
        answers a high-water mark below its old leader's until its followers
        catch up (seen in the three-node fault test: position 1505, end 887,
        during a failover). Past that, the log is not the one it was read
        from, whatever ids the broker answers (a truncated log, or a broker
        that offers no topic ids)."""
        position = await self.consumer.position(tp)
        now = time.monotonic()
        since = self._beyond.setdefault(tp, now)
        # no failover on tansu (one node): its end never lags a leader's
        grace = 0.0 if self.settings.is_tansu else self.options.beyond_grace
        if now - since < grace:
            if since == now:
                log.warning(
                    "%s[%d]: the stored position %d lies beyond the broker's end%s; asking "
                    "again for up to %.0f s (a new leader's end can lag its old one's)",
                    tp.topic,
                    tp.partition,
                    position,
                    end,
                    grace,
                )
            return
        why = f"the stored position {position} of partition {tp.partition} lies beyond its end{end}"
        self._refusal = self._refusal or self._log_reset(tp.topic, why)


def _other_id(stored: UUID, current: UUID) -> str:
    return f"they were read from topic id {stored}; the broker's has id {current}"


async def write_to_the_end(settings: Settings) -> int:
    """Every partition read to its end and written, archive included, by a
    sink that takes them all without joining the group: ``up``'s last step
    before the embedded tansu stops and its log with it (events sent a
    moment ago; a sink stopped while it was starting; ``up`` run without
    one). The records written."""
    sink = Sink(settings, SinkOptions(assign_all=True))
    sink.stop()  # read to the end of every partition, then return
    await asyncio.wait_for(sink.run(), 60)
    return sink.written.records


async def run_sink(settings: Settings, options: SinkOptions | None = None) -> None:
    import signal

    from usertrail.sink.web import serve

    from usertrail.runtime import tune_gc

    sink = Sink(settings, options)
    tune_gc()
    runner = None
    if settings.sink_web_port is not None:
        runner = await serve(sink, settings.sink_web_host, settings.sink_web_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sink.stop)
    try:
        await sink.run()
    finally:
        if runner is not None:
            await runner.cleanup()
    log.info("sink stopped after %d records", sink.written.records)
