"""The client SDK: ``TrackingClient`` (asyncio) and ``SyncTrackingClient``.

::

    async with TrackingClient(source="web") as client:
        event_id = await client.track_interaction(
            user_id="u1", type="reading", service="tarot", theme="love", rating=5
        )

Each ``track_*`` validates at the call (``EventValidationError`` names the
field and the rule; nothing is sent), buffers the event and returns its id.
Delivery is asynchronous: failures reach ``on_delivery`` and the log, and the
event goes to the local spool, which the client sends again once the broker
answers (and the next ``start()`` does too). A broker that does not answer at
``start()`` is no error: events are accepted and sent once it does.
``flush()`` and ``close()`` wait for everything buffered and say how many
events were delivered and how many spooled.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import concurrent.futures.thread  # its exit hook registered before ours (below)
import contextlib
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    UnknownError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import DefaultPartitioner
from usertrail.producers import events, headers
from usertrail.producers.events import EventBase
from usertrail.producers.ids import uuid7
from usertrail.producers.spool import Spool, SpooledRecord, default_directory

from usertrail.errors import (
    BrokerUnavailableError,
    BufferFullError,
    ClientClosedError,
    DeliveryError,
    EventValidationError,
)
from usertrail.kafka import (
    TANSU_CLUSTER_ID,
    confirm_topics_before_producing,
    log_identity,
    no_topic_creation,
    stop_within,
)
from usertrail.settings import Settings

log = logging.getLogger("usertrail.producers")

DeliveryCallback = Callable[[str, BaseException | None], None]
T = TypeVar("T")


_PARTITIONER = DefaultPartitioner()

RESEND_SECONDS = 15.0
"""How often a running client sends its spool again, if the broker answers."""
TOPIC_WAIT = 5.0
"""How long the first event for a topic waits for the broker to know it; past
that, its events are spooled until the re-send finds the topic."""
LINGER_MS = 5
"""How long an event waits for others to its partition, by default."""
TANSU_LINGER_MS = 100
"""The same on the embedded broker (tansu), when the app did not choose: it
pays on every fetch for every batch a partition holds (docs/brokers.md, 12),
so its cost grows with the number of batches sent, not of events (the
README's freshness figures show what 50, 100 and 200 ms do). Known by the cluster
id alone, the first of ``BrokerInfo.is_tansu``'s tests: its other, the APIs
offered, is in aiokafka's connections only."""


def _within_bounds(event: events.EventBase) -> None:
    """Refuse, as the sink would dead-letter it, an event whose time lies
    outside the contract's window around now (the record's timestamp)."""
    error = events.bound_error(event, int(time.time() * 1000))
    if error is not None:
        raise error


@dataclass(eq=False, slots=True)
class _Batch:
    """One partition's open (or in-flight) batch and what it carries."""

    topic: str
    partition: int
    builder: Any  # aiokafka BatchBuilder
    records: list[SpooledRecord] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    future: asyncio.Future[Any] | None = None
    shipped: bool = False  # closed and queued for sending: nothing more appended
    due: bool = False  # its linger passed while the partition's shipper was busy


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What happened to the events buffered since the previous report."""

    delivered: int
    spooled: int


class TrackingClient:
    """Publishes validated events to ``usertrail.events``, keyed by user id."""

    def __init__(
        self,
        *,
        source: str,
        settings: Settings | None = None,
        bootstrap_servers: str | None = None,
        topic: str | None = None,
        acks: Literal[0, 1, "all"] = "all",
        compression_type: Literal["gzip", "lz4", "zstd", "snappy"] | None = "lz4",
        linger_ms: int | None = None,
        max_batch_size: int = 256 * 1024,
        buffer_size: int = 20_000,
        buffer_timeout: float = 5.0,
        delivery_timeout: float = 30.0,
        idempotence: bool | None = None,
        spool_path: Path | str | None = None,
        on_delivery: DeliveryCallback | None = None,
        disabled: bool = False,
        offline_start: bool = True,
        connect_timeout: float = 10.0,
    ) -> None:
        """
        :param source: the emitting app, stamped on every event.
        :param settings: connection settings (default: from the environment).
        :param bootstrap_servers: overrides the settings' broker address.
        :param linger_ms: how long an event waits for others to its
            partition before they are sent together (default: 5, or 50 on
            the embedded broker, tansu, whose every fetch costs more with
            every batch a partition holds).
        :param buffer_size: events accepted but not yet acknowledged, at most.
        :param buffer_timeout: how long a ``track_*`` call waits for room in a
            full buffer before raising ``BufferFullError``.
        :param delivery_timeout: how long the broker has to acknowledge an
            event before it is spooled.
        :param idempotence: ``None`` uses Kafka's idempotent producer where
            the broker offers it; ``True`` requires it; ``False`` never.
        :param spool_path: where undelivered events wait for the next start
            (default: ``<spool dir>/<source>.jsonl``, the spool directory
            being ``USERTRAIL_SPOOL_DIR`` or the user's data directory).
        :param on_delivery: called with ``(event_id, None)`` on delivery and
            ``(event_id, error)`` when an event was spooled instead.
        :param disabled: validate every event and return its id, but connect
            to nothing and send nothing (tests, local development; to see
            what would have been sent, ``usertrail.producers.testing``).
        :param offline_start: a broker that does not answer at ``start()`` is
            no error: events are accepted and sent once it answers. False:
            ``start()`` raises ``BrokerUnavailableError`` (a command line
            tool that should fail at once).
        :param connect_timeout: how long a connection attempt waits for the
            broker's first answer; a broker that accepts connections but
            does not answer (frozen, overloaded) then counts as unreachable,
            as one that refuses them does.
        """
        self._settings = settings if settings is not None else Settings()
        if bootstrap_servers is not None:
            self._settings = self._settings.model_copy(
                update={"kafka_bootstrap_servers": bootstrap_servers}
            )
        events.check_source(source)
        self.source = source
        self.topic = topic or self._settings.events_topic
        self._producer_options: dict[str, Any] = {
            **self._settings.kafka_options(),
            "client_id": f"{self._settings.kafka_client_id}-{source}",
            "acks": acks,
            "compression_type": compression_type,
            # the batches are ours (_Batch, shipped when linger_ms passes):
            # aiokafka sends what it is given at once, or a flush would wait
            # out its linger too, and every event twice the linger
            "linger_ms": 0,
            "max_batch_size": max_batch_size,
            "request_timeout_ms": int(delivery_timeout * 1000),
        }
        self._idempotence = idempotence
        self._buffer_size = buffer_size
        self._buffer_timeout = buffer_timeout
        self._delivery_timeout = delivery_timeout
        self.spool = Spool(
            Path(spool_path)
            if spool_path is not None
            else (self._settings.spool_dir or default_directory()) / f"{source}.jsonl"
        )
        self._on_delivery = on_delivery
        self._linger_chosen = linger_ms is not None
        self._linger = (LINGER_MS if linger_ms is None else linger_ms) / 1000
        self._producer: AIOKafkaProducer | None = None
        self._open: dict[tuple[str, int], _Batch] = {}
        self._in_flight: set[_Batch] = set()
        # closed batches waiting for their partition's shipper (_ship)
        self._ready: collections.defaultdict[tuple[str, int], collections.deque[_Batch]] = (
            collections.defaultdict(collections.deque)
        )
        self._shippers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._buffered = 0
        self._room = asyncio.Event()
        self._partitions: dict[str, list[int]] = {}
        self._key_partitions: dict[tuple[str, bytes], int] = {}
        # topics the broker lacks (their events are spooled), and when that was last said
        self._topicless: set[str] = set()
        self._topicless_said: dict[str, float] = {}
        # their events, written to the spool together a moment later (one write, not one each)
        self._topicless_held: list[SpooledRecord] = []
        self._topicless_timer: asyncio.TimerHandle | None = None
        self._delivered = 0
        self._spooled = 0
        self.idempotent = False
        self.resent_from_spool = 0
        self.disabled = disabled
        self._offline_start = offline_start
        self._connect_timeout = connect_timeout
        self._started_disabled = False
        self._healthy = True  # the last batch was acknowledged (_resend_spooled)
        self._resender: asyncio.Task[None] | None = None
        # accepted while no broker answers (started offline, _connect_later)
        self._held: list[tuple[SpooledRecord, str | None, _Batch]] = []
        self._connecting: asyncio.Task[None] | None = None
        # events handed over by SyncTrackingClient's callers, in their order
        self._inbox: collections.deque[tuple[SpooledRecord, str]] = collections.deque()
        self._drainer: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Connect, then re-send whatever an earlier run spooled. A broker
        that does not answer is no error: events are accepted (held, and
        spooled past the buffer) and sent once it answers."""
        if self.disabled:
            self._started_disabled = True
            return
        if self._producer is not None or self._connecting is not None:
            return
        try:
            self._producer = await self._start_producer()
        except _Unreachable as exc:
            if not self._offline_start:
                raise
            # Accepted all the same: held here (and spooled past the buffer)
            # until the broker answers, then sent (_connect_later).
            log.warning("%s; accepting events and connecting in the background", exc)
            self._connecting = asyncio.get_running_loop().create_task(self._connect_later())
            return
        self._partitions.clear()
        self._key_partitions.clear()
        self._resender = asyncio.get_running_loop().create_task(self._resend_spooled())
        records = self.spool.take()
        if records:
            log.info("re-sending %d spooled events from %s", len(records), self.spool.path)
            await self._resend(records)
            report = await self.flush()
            self.resent_from_spool = report.delivered
            if report.spooled:
                log.warning("%d spooled events are still undelivered", report.spooled)

    async def _connect_later(self) -> None:
        """Started while the broker was unreachable: try again, more and
        more slowly (0.5 s to 10 s), until it answers; then send what an
        earlier run spooled and what was accepted meanwhile, in that order,
        appended without an await between them, so no event accepted later
        overtakes one held."""
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            try:
                producer = await self._start_producer()
            except _Unreachable:
                continue
            except (KafkaError, BrokerUnavailableError) as exc:
                log.warning("connecting failed (%r); trying again", exc)
                continue
            try:
                topics = {self.topic} | {r.topic for r, _, _ in self._held}
                for topic in topics:
                    self._partitions[topic] = sorted(await self._partitions_of(producer, topic))
            except (KafkaError, TimeoutError) as exc:
                await self._stop_producer(producer)
                log.warning("the broker answers but has not got its topics (%r); waiting", exc)
                continue
            except BaseException:
                await self._stop_producer(producer)
                raise
            break
        # from here on, no await: nothing is accepted meanwhile
        self._key_partitions.clear()
        self._producer = producer
        self._connecting = None
        log.info("connected to Kafka at %s", self._settings.bootstrap_servers)
        self._resender = asyncio.get_running_loop().create_task(self._resend_spooled())
        spooled = self.spool.take()
        unknown = [r for r in spooled if r.topic not in self._partitions]
        if unknown:
            self.spool.append(unknown)  # sent by the next start
        held, self._held = self._held, []
        self._buffered -= len(held)
        for record in spooled:
            if record.topic in self._partitions:
                self._append_known(record, None)
        for record, event_id, placeholder in held:
            batch = self._append_known(record, event_id)
            if placeholder.future is not None:
                if batch.future is None:
                    batch.future = asyncio.get_running_loop().create_future()
                _chain(batch.future, placeholder.future)

    async def _resend_spooled(self) -> None:
        """While the client runs: every RESEND_SECONDS, if the broker's last
        word was an acknowledgement, send again what was spooled (by this
        client during an outage, or by another process of the same source),
        so that a broker that comes back gets it without a restart."""
        while True:
            await asyncio.sleep(RESEND_SECONDS)
            producer = self._producer
            if producer is None or not self.spool.path.exists():
                continue
            if not self._healthy:  # is it back? (nothing may have been sent since)
                try:
                    await asyncio.wait_for(producer.client.fetch_all_metadata(), 5)
                except (KafkaError, TimeoutError):
                    continue
                self._healthy = True
            if self._topicless:
                await self._look_for_topics(producer)
                if self._topicless:
                    continue  # the spool stays as it is until its topic exists
            records = self.spool.take()
            if records:
                log.info("re-sending %d spooled events from %s", len(records), self.spool.path)
                await self._resend(records)

    async def _resend(self, records: list[SpooledRecord]) -> None:
        """Spooled events buffered again, in order. What cannot be (the
        buffer full, the client closing, the broker without their topic)
        goes back to the spool, for a later re-send or the next start."""
        for i, record in enumerate(records):
            try:
                batch = await self._enqueue(record)
            except (BufferFullError, ClientClosedError):
                self.spool.append(records[i:])
                return
            except BaseException:  # cancelled: the rest stays spooled
                self.spool.append(records[i:])
                raise
            if batch.partition < 0 and record.topic in self._topicless:
                self._write_topicless()  # spooled again (no topic yet), the rest after it
                self.spool.append(records[i + 1 :])
                return

    def _append_known(self, record: SpooledRecord, event_id: str | None) -> _Batch:
        """``_enqueue`` without an await, for a topic whose partitions are
        known (the buffer's room is not waited for)."""
        assert self._producer is not None
        partitions = self._partitions[record.topic]
        partition: int = _PARTITIONER(record.key, partitions, partitions)
        tp = (record.topic, partition)
        batch = self._open.get(tp) or self._new_batch(self._producer, tp)
        if not self._add(batch, record, event_id):
            self._ship_soon(batch)
            batch = self._new_batch(self._producer, tp)
            self._add(batch, record, event_id)  # it fitted in a batch when it was accepted
        return batch

    def _hold(self, record: SpooledRecord, event_id: str | None) -> _Batch:
        """Accept an event while no broker answers. A full buffer goes to
        the spool at once (one write), so there is room again: nothing
        accepted waits on a broker that is not there."""
        if self._buffered >= self._buffer_size:
            self._spool_held(BrokerUnavailableError("the broker did not answer yet"))
        placeholder = _Batch(record.topic, -1, None)
        self._held.append((record, event_id, placeholder))
        self._buffered += 1
        return placeholder

    def _spool_held(self, error: BaseException) -> None:
        held, self._held = self._held, []
        if not held:
            return
        self._buffered -= len(held)
        self._spool_now([r for r, _, _ in held], [i for _, i, _ in held if i is not None], error)
        for _, _, placeholder in held:
            if placeholder.future is not None and not placeholder.future.done():
                placeholder.future.set_exception(DeliveryError(f"spooled: {error}"))

    async def _start_producer(self) -> AIOKafkaProducer:
        attempts = [True, False] if self._idempotence is None else [self._idempotence]
        for idempotent in attempts:
            producer = AIOKafkaProducer(enable_idempotence=idempotent, **self._producer_options)
            confirm_topics_before_producing(producer.client)
            try:
                # Never a topic made by asking for it (usertrail/kafka.py): a
                # broker back empty would get the events topic with its own
                # partition count. A missing topic holds and spools events.
                with no_topic_creation():
                    if idempotent and self._idempotence is None:
                        with _quiet_probe():
                            await asyncio.wait_for(producer.start(), self._connect_timeout)
                    else:
                        await asyncio.wait_for(producer.start(), self._connect_timeout)
            except UnknownError:
                # The embedded broker (tansu 0.6) answers InitProducerId with
                # UnknownError: no idempotent producer there. Dedup by event id
                # downstream makes it optional (docs/architecture.md, rule 2).
                await self._stop_producer(producer)
                if idempotent and self._idempotence is None:
                    log.info("broker has no idempotent producer; continuing without it")
                    continue
                raise BrokerUnavailableError(
                    "the broker refused the idempotent producer; pass idempotence=None or False"
                ) from None
            except KafkaConnectionError as exc:
                await self._stop_producer(producer)
                raise _Unreachable(
                    f"cannot reach Kafka at {self._settings.bootstrap_servers}: {exc}"
                ) from exc
            except TimeoutError:
                await stop_within(producer, 2, "producer")
                raise _Unreachable(
                    f"cannot reach Kafka at {self._settings.bootstrap_servers}: no answer "
                    f"within {self._connect_timeout:g} s"
                ) from None
            self.idempotent = idempotent
            if not self._linger_chosen:
                try:
                    await self._linger_for(producer)
                except BaseException:  # cancelled (a close, a start's timeout)
                    await self._stop_producer(producer)
                    raise
            return producer
        raise AssertionError("unreachable")

    async def _linger_for(self, producer: AIOKafkaProducer) -> None:
        """The default linger for the broker that answered: TANSU_LINGER_MS
        on tansu (by its cluster id), else LINGER_MS."""
        try:
            identity = await asyncio.wait_for(
                log_identity(producer.client, [self.topic]), self._connect_timeout
            )
        except Exception as exc:  # noqa: BLE001  # a question only: the client works without it
            log.debug("could not ask what the broker is (%r): lingering %d ms", exc, self.linger_ms)
            return
        tansu = identity.cluster_id == TANSU_CLUSTER_ID
        self._linger = (TANSU_LINGER_MS if tansu else LINGER_MS) / 1000

    async def _stop_producer(self, producer: AIOKafkaProducer) -> None:
        await stop_within(producer, self._delivery_timeout + 5, "producer")

    async def flush(self) -> DeliveryReport:
        """Wait until every buffered event is delivered or spooled."""
        if self.disabled:
            if not self._started_disabled:
                raise ClientClosedError("call start() (or use `async with`) before sending")
            return DeliveryReport(0, 0)
        await self._drained()
        self._write_topicless()
        if self._producer is None and self._connecting is not None:
            # no broker yet: what is held goes to the spool, delivered later
            self._spool_held(BrokerUnavailableError("the broker did not answer yet"))
            report = DeliveryReport(self._delivered, self._spooled)
            self._delivered = self._spooled = 0
            return report
        producer = self._require_started()
        for batch in list(self._open.values()):
            self._ship_soon(batch)  # after the ships asked for before (their order)
        while self._shippers:
            # asyncio.wait: a flush given up on (cancelled) leaves the ships
            # to go on; gather would cancel them with it
            await asyncio.wait(list(self._shippers.values()))
        try:
            await asyncio.wait_for(producer.flush(), timeout=self._delivery_timeout + 5)
        except TimeoutError:
            log.warning("flush did not finish within the delivery timeout")
        # Delivery callbacks run on the loop right after the futures resolve.
        for _ in range(100):
            if not self._in_flight:
                break
            await asyncio.sleep(0.01)
        report = DeliveryReport(self._delivered, self._spooled)
        self._delivered = self._spooled = 0
        if report.spooled:
            log.warning(
                "%d events were not acknowledged and were spooled to %s",
                report.spooled,
                self.spool.path,
            )
        return report

    async def close(self) -> DeliveryReport:
        """Deliver everything buffered, spool what cannot be, and disconnect."""
        self._started_disabled = False
        await self._drained()
        resender, self._resender = self._resender, None
        if resender is not None:
            resender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resender
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
        if self._producer is None:
            self._spool_held(BrokerUnavailableError("the broker never answered"))
            spooled, self._spooled = self._spooled, 0
            return DeliveryReport(self._delivered, spooled)
        report = await self.flush()
        producer, self._producer = self._producer, None
        await self._stop_producer(producer)
        leftover = [r for b in (*self._open.values(), *self._in_flight) for r in b.records]
        self._open.clear()
        self._in_flight.clear()
        self._ready.clear()
        self._buffered = 0
        if leftover:
            self.spool.append(leftover)
            log.warning("%d undelivered events spooled to %s", len(leftover), self.spool.path)
        return DeliveryReport(report.delivered, report.spooled + len(leftover))

    def spool_unsent(self, error: BaseException) -> int:
        """Everything accepted and not yet acknowledged (handed over, held,
        buffered, in flight), written to the spool at once, without a wait:
        what a close that cannot finish in time leaves behind, so that the
        next start sends it. An in-flight batch the broker did take is then
        sent twice; the pipeline drops the second copy by its event id
        (docs/architecture.md, rule 2). Returns the number spooled."""
        self._write_topicless()
        records = [record for record, _ in self._inbox]
        ids = [event_id for _, event_id in self._inbox]
        self._inbox.clear()
        for record, event_id, placeholder in self._held:
            records.append(record)
            if event_id is not None:
                ids.append(event_id)
            if placeholder.future is not None and not placeholder.future.done():
                placeholder.future.set_exception(DeliveryError(f"spooled: {error}"))
        self._held = []
        for batch in (*self._open.values(), *self._in_flight):
            records.extend(batch.records)
            ids.extend(batch.ids)
            if batch.future is not None and not batch.future.done():
                batch.future.set_exception(DeliveryError(f"spooled: {error}"))
        self._open.clear()
        self._in_flight.clear()  # a late acknowledgement settles nothing now
        self._ready.clear()
        self._buffered = 0
        if records:
            self._spool_now(records, ids, error)
        return len(records)

    async def __aenter__(self) -> TrackingClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __del__(self) -> None:
        if getattr(self, "_producer", None) is not None:
            warnings.warn(
                f"TrackingClient({self.source!r}) was not closed: buffered events may be lost",
                ResourceWarning,
                stacklevel=1,
            )

    # --- sending ---------------------------------------------------------------
    # Events are partitioned here with aiokafka's own murmur2 partitioner (the
    # placement of every Kafka client) and appended to one open batch per
    # partition, shipped with send_batch when full, when linger_ms passes or
    # on flush. One batch per partition is in flight at a time (aiokafka's
    # own rule), and a partition's batches go out in the order they were
    # closed (one shipper task per partition), so one user's events keep
    # their order,
    # while a partition whose leader is frozen holds back only its own. Per
    # event this costs a dict lookup and an append instead of a send() each.
    def _require_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise ClientClosedError("call start() (or use `async with`) before sending")
        return self._producer

    def _not_sent(self, record: SpooledRecord) -> _Batch:
        """A disabled client's send: nothing leaves, the event is settled."""
        if not self._started_disabled:
            raise ClientClosedError("call start() (or use `async with`) before sending")
        self.record_unsent(record)
        batch = _Batch(record.topic, -1, None)
        batch.future = asyncio.get_running_loop().create_future()
        batch.future.set_result(None)
        return batch

    def record_unsent(self, record: SpooledRecord) -> None:
        """What a disabled client does with an event instead of sending it:
        nothing here (``usertrail.producers.testing`` keeps them)."""

    async def send(self, event: EventBase) -> asyncio.Future[Any]:
        """Buffer a built event. The returned future resolves when the batch
        holding it is acknowledged, and fails if it was spooled instead."""
        record = SpooledRecord(
            self.topic, events.key(event), events.encode(event), headers.for_event()
        )
        batch = await self._enqueue(record, event.event_id)
        if batch.future is None:
            batch.future = asyncio.get_running_loop().create_future()
        return batch.future

    async def _partition(self, topic: str, key: bytes) -> int:
        cached = self._key_partitions.get((topic, key))
        if cached is not None:
            return cached
        partitions = self._partitions.get(topic)
        if partitions is None:
            producer = self._require_started()
            if topic in self._topicless:  # looked for in the background (_resend_spooled)
                raise UnknownTopicOrPartitionError(f"the broker has no topic {topic}")
            try:
                partitions = sorted(await self._partitions_of(producer, topic))
            except (KafkaError, TimeoutError) as exc:
                self._topicless.add(topic)
                raise UnknownTopicOrPartitionError(f"the broker has no topic {topic}") from exc
            self._partitions[topic] = partitions
        if len(self._key_partitions) > 100_000:
            self._key_partitions.clear()
        partition: int = _PARTITIONER(key, partitions, partitions)
        self._key_partitions[(topic, key)] = partition
        return partition

    async def _partitions_of(self, producer: AIOKafkaProducer, topic: str) -> set[int]:
        """A topic's partitions, waiting at most TOPIC_WAIT for the broker
        to know it (aiokafka waits the whole delivery timeout, and would
        hold a ``track_*`` call that long)."""
        wait = min(TOPIC_WAIT, self._delivery_timeout)
        partitions: set[int] = await asyncio.wait_for(producer.partitions_for(topic), wait)
        return partitions

    async def _look_for_topics(self, producer: AIOKafkaProducer) -> None:
        """The topics the broker lacked: made since? (Events for them are
        spooled meanwhile, without a wait.)"""
        for topic in sorted(self._topicless):
            try:
                self._partitions[topic] = sorted(await self._partitions_of(producer, topic))
            except (KafkaError, TimeoutError):
                continue
            self._topicless.discard(topic)
            log.info("the broker has topic %s now", topic)

    async def _enqueue(self, record: SpooledRecord, event_id: str | None = None) -> _Batch:
        if self.disabled:
            return self._not_sent(record)
        if self._producer is None and self._connecting is not None:
            return self._hold(record, event_id)
        producer = self._require_started()
        if self._buffered >= self._buffer_size:
            await self._wait_for_room()
        partition = self._key_partitions.get((record.topic, record.key))
        if partition is None:
            try:
                partition = await self._partition(record.topic, record.key)
            except UnknownTopicOrPartitionError as exc:
                return self._spool_topicless(record, event_id, exc)
        tp = (record.topic, partition)
        if event_id is None and self._on_delivery is not None:
            event_id = _event_id_of(record.value)
        batch = self._open.get(tp)
        if batch is None:
            batch = self._new_batch(producer, tp)
        if not self._add(batch, record, event_id):
            self._ship_soon(batch)  # full; the caller does not wait for its partition
            batch = self._new_batch(producer, tp)
            if not self._add(batch, record, event_id):
                self._open.pop(tp, None)
                raise EventValidationError("any", [("event", "too large for one Kafka batch")])
        return batch

    def _add(self, batch: _Batch, record: SpooledRecord, event_id: str | None) -> bool:
        """Append to a batch and account for it; False when the batch is full."""
        appended = batch.builder.append(
            key=record.key, value=record.value, timestamp=None, headers=list(record.headers)
        )
        if appended is None:
            return False
        batch.records.append(record)
        if self._on_delivery is not None and event_id is not None:
            batch.ids.append(event_id)
        self._buffered += 1
        return True

    def _new_batch(self, producer: AIOKafkaProducer, tp: tuple[str, int]) -> _Batch:
        batch = _Batch(tp[0], tp[1], producer.create_batch())
        self._open[tp] = batch
        batch.timer = asyncio.get_running_loop().call_later(self._linger, self._linger_over, batch)
        return batch

    def _linger_over(self, batch: _Batch) -> None:
        tp = (batch.topic, batch.partition)
        if self._open.get(tp) is not batch:
            return
        if tp in self._shippers:
            batch.due = True  # the partition's shipper takes it after its send
        else:
            self._ship_soon(batch)

    def _ship_soon(self, batch: _Batch) -> None:
        """Close a batch and queue it on its partition's shipper, one task
        per partition that sends the partition's batches one after another,
        in the order they were closed."""
        if batch.shipped:
            return  # a linger timer, flush() and a full batch can each ask
        batch.shipped = True
        tp = (batch.topic, batch.partition)
        if self._open.get(tp) is batch:
            del self._open[tp]
        if batch.timer is not None:
            batch.timer.cancel()
        if not batch.records:
            return
        self._in_flight.add(batch)
        self._ready[tp].append(batch)
        if tp not in self._shippers:
            task = asyncio.get_running_loop().create_task(self._ship(tp))
            self._shippers[tp] = task

    async def _ship(self, tp: tuple[str, int]) -> None:
        """Send a partition's batches while it has any. aiokafka takes one
        batch per partition at a time (send_batch returns once the one
        before is on the wire), so while a send waits, the partition's open
        batch keeps growing: when the broker is slow, batches get bigger
        rather than more numerous, and the rate the SDK can deliver keeps
        up with the rate it accepts (natural batching, as Kafka's own
        producer does). A partition whose leader is frozen holds back only
        its own batches."""
        ready = self._ready[tp]
        try:
            while True:
                if not ready:
                    batch = self._open.get(tp)
                    if batch is None or not batch.due:
                        return  # its linger timer ships it
                    self._ship_soon(batch)  # queues it; this task sends it next
                    if not ready:
                        return
                batch = ready.popleft()
                producer = self._require_started()
                try:
                    future = await producer.send_batch(batch.builder, tp[0], partition=tp[1])
                except KafkaError as exc:
                    self._settle(batch, exc, None)
                    continue
                future.add_done_callback(
                    lambda fut, batch=batch: self._settle(batch, _error_of(fut), fut)
                )
        finally:
            del self._shippers[tp]

    async def _wait_for_room(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._buffer_timeout
        while self._buffered >= self._buffer_size:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), timeout=deadline - loop.time())
            except TimeoutError:
                raise BufferFullError(
                    f"{self._buffer_size} events are waiting for the broker "
                    f"after {self._buffer_timeout}s"
                ) from None

    def _settle(
        self, batch: _Batch, error: BaseException | None, future: asyncio.Future[Any] | None
    ) -> None:
        if batch not in self._in_flight:
            return  # already settled (close() spooled it)
        self._in_flight.discard(batch)
        count = len(batch.records)
        self._buffered -= count
        if self._buffered < self._buffer_size:
            self._room.set()
        self._healthy = error is None  # the broker's last word
        if error is None:
            self._delivered += count
            if batch.future is not None and future is not None:
                batch.future.set_result(future.result())
        else:
            self.spool.append(batch.records)
            self._spooled += count
            log.warning(
                "%d events not delivered (%r); spooled to %s", count, error, self.spool.path
            )
            if batch.future is not None:
                batch.future.set_exception(DeliveryError(f"spooled after {error!r}"))
        if self._on_delivery is not None:
            for event_id in batch.ids:
                self._on_delivery(event_id, error)

    def _record(self, kind: str, fields: dict[str, Any]) -> tuple[SpooledRecord, str]:
        """Validate and encode an event: the record to send and its id."""
        if fields.get("event_id") is None:
            fields["event_id"] = uuid7()
        if fields.get("occurred_at") is None:
            fields["occurred_at"] = datetime.now(UTC)
        fields["source"] = self.source
        event, wire = events.build_encoded(kind, fields)
        _within_bounds(event)
        record = SpooledRecord(self.topic, event.user_id.encode(), wire, headers.for_event())
        return record, event.event_id

    async def _track(self, kind: str, fields: dict[str, Any]) -> str:
        record, event_id = self._record(kind, fields)
        if not self._append_now(record, event_id):
            await self._enqueue(record, event_id)
        return event_id

    def _accept(self, record: SpooledRecord, event_id: str) -> None:
        """An event handed over from another thread (SyncTrackingClient), on
        this client's loop: appended at once in the common case, else by a
        task that takes the handed-over events one by one, in order. What it
        cannot buffer (closed meanwhile, the buffer full against the odds:
        the caller checked for room) is spooled, never dropped."""
        if not self._inbox and self._append_now(record, event_id):
            return
        self._inbox.append((record, event_id))
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._inbox:
                record, event_id = self._inbox[0]
                try:
                    if not self._append_now(record, event_id):
                        await self._enqueue(record, event_id)
                except (BufferFullError, ClientClosedError) as exc:
                    self._spool_now([record], [event_id], exc)
                self._inbox.popleft()
        finally:
            self._drainer = None

    async def _drained(self) -> None:
        while self._drainer is not None:
            await asyncio.shield(self._drainer)

    def _spool_topicless(
        self, record: SpooledRecord, event_id: str | None, error: KafkaError
    ) -> _Batch:
        """An event for a topic the broker does not have (yet): the SDK never
        makes it by asking for it (usertrail/kafka.py), so the event is
        spooled, and sent by the next re-send once the topic is made. Said
        once a minute per topic, not per event. Written to the spool with
        the others of the next moment, in one write: one fsync per event held
        a fast app to the disk's pace while its topic was missing."""
        self._topicless_held.append(record)
        if self._topicless_timer is None:
            loop = asyncio.get_running_loop()
            self._topicless_timer = loop.call_later(0.05, self._write_topicless)
        self._spooled += 1
        now = time.monotonic()
        if now - self._topicless_said.get(record.topic, -60.0) >= 60.0:
            self._topicless_said[record.topic] = now
            log.warning(
                "the broker did not give the partitions of topic %s (%r): no such topic yet, "
                "or no answer; events for it are spooled to %s and sent once it has it (topics "
                "are made by `usertrail up --only-setup` or compose's init)",
                record.topic,
                error,
                self.spool.path,
            )
        if self._on_delivery is not None and event_id is not None:
            self._on_delivery(event_id, error)
        placeholder = _Batch(record.topic, -1, None)
        placeholder.future = asyncio.get_running_loop().create_future()
        placeholder.future.set_exception(DeliveryError(f"spooled: {error!r}"))
        placeholder.future.exception()  # retrieved: a caller that ignores it is not warned
        return placeholder

    def _write_topicless(self) -> None:
        """The events held for a missing topic, into the spool (in order)."""
        if self._topicless_timer is not None:
            self._topicless_timer.cancel()
            self._topicless_timer = None
        held, self._topicless_held = self._topicless_held, []
        self.spool.append(held)

    def _spool_now(
        self, records: list[SpooledRecord], ids: list[str], error: BaseException
    ) -> None:
        self.spool.append(records)
        self._spooled += len(records)
        log.warning(
            "%d events not buffered (%r); spooled to %s", len(records), error, self.spool.path
        )
        if self._on_delivery is not None:
            for event_id in ids:
                self._on_delivery(event_id, error)

    def _append_now(self, record: SpooledRecord, event_id: str) -> bool:
        """The common case without an await: room in the buffer, the key's
        partition known, an open batch with room. False: take ``_enqueue``."""
        if self._producer is None or self._buffered >= self._buffer_size:
            return False
        partition = self._key_partitions.get((record.topic, record.key))
        if partition is None:
            return False
        batch = self._open.get((record.topic, partition))
        if batch is None:
            batch = self._new_batch(self._producer, (record.topic, partition))
        return self._add(batch, record, event_id)  # full: _enqueue ships it, opens the next

    async def track_interaction(
        self,
        *,
        user_id: str,
        type: str,
        service: str,
        theme: str | None = None,
        rating: int | None = None,
        metadata: dict[str, Any] | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """A reading, chat, feedback or share. Returns the event id."""
        fields = interaction_fields(
            user_id=user_id,
            type=type,
            service=service,
            theme=theme,
            rating=rating,
            metadata=metadata,
            occurred_at=occurred_at,
            event_id=event_id,
        )
        # _track, _record and _append_now inlined: the hottest call of the SDK
        fields["source"] = self.source
        event, wire = events.build_encoded("interaction", fields)
        _within_bounds(event)
        new_id, key = event.event_id, event.user_id.encode()
        record = SpooledRecord(self.topic, key, wire, headers.for_event())
        producer = self._producer
        if producer is not None and self._buffered < self._buffer_size:
            partition = self._key_partitions.get((record.topic, key))
            if partition is not None:
                batch = self._open.get((record.topic, partition))
                if batch is None:
                    batch = self._new_batch(producer, (record.topic, partition))
                if self._add(batch, record, new_id):
                    return new_id
        await self._enqueue(record, new_id)  # full, unknown partition or not started
        return new_id

    @property
    def linger_ms(self) -> int:
        """How long an event waits for others to its partition: the
        ``linger_ms`` given, else the broker's default (known once a broker
        answered: TANSU_LINGER_MS on the embedded one, else LINGER_MS)."""
        return round(self._linger * 1000)

    @property
    def room(self) -> int:
        """Events the buffer takes now without a wait (while no broker has
        answered yet, what does not fit goes to the spool: no wait either)."""
        if self._producer is None and self._connecting is not None:
            return self._buffer_size
        return max(0, self._buffer_size - self._buffered)

    async def send_event(self, event: EventBase) -> str:
        """Send an event validated elsewhere (the collector validates a
        batch before it answers). It must carry this client's source; its
        time is checked against now, as every ``track_*`` call's is."""
        if event.source != self.source:
            raise EventValidationError(
                getattr(event, "kind", "any"),
                [("source", f"is {event.source!r}; this client sends {self.source!r}")],
            )
        _within_bounds(event)
        record = self._record_of(event)
        if not self._append_now(record, event.event_id):
            await self._enqueue(record, event.event_id)
        return event.event_id

    def spool_events(self, batch: list[EventBase], error: BaseException) -> None:
        """Events validated elsewhere that cannot be buffered now (the
        collector's, after a refusal mid-batch): to the spool, sent by the
        next re-send, never dropped."""
        records = [self._record_of(event) for event in batch]
        self._spool_now(records, [event.event_id for event in batch], error)

    def _record_of(self, event: EventBase) -> SpooledRecord:
        """A built event as this client sends it."""
        return SpooledRecord(
            self.topic, event.user_id.encode(), events.encode(event), headers.for_event()
        )

    async def track_preferences(
        self,
        *,
        user_id: str,
        preferred_language: str | None = None,
        preferred_themes: Iterable[str] | None = None,
        preferred_services: Iterable[str] | None = None,
        notification_settings: dict[str, Any] | None = None,
        reading_length: str | None = None,
        tone_preference: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """Explicit preferences; only the fields given change. Returns the event id."""
        return await self._track(
            "preferences.updated",
            preferences_fields(
                user_id=user_id,
                preferred_language=preferred_language,
                preferred_themes=preferred_themes,
                preferred_services=preferred_services,
                notification_settings=notification_settings,
                reading_length=reading_length,
                tone_preference=tone_preference,
                occurred_at=occurred_at,
                event_id=event_id,
            ),
        )

    async def track_onboarding(
        self,
        *,
        user_id: str,
        interests: Iterable[str] = (),
        services: Iterable[str] = (),
        experience: str | None = None,
        answers: dict[str, Any] | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """The onboarding answers (cold-start segments). Returns the event id."""
        return await self._track(
            "onboarding.completed",
            onboarding_fields(
                user_id=user_id,
                interests=interests,
                services=services,
                experience=experience,
                answers=answers,
                occurred_at=occurred_at,
                event_id=event_id,
            ),
        )

    async def erase_user(
        self,
        *,
        user_id: str,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """Erase every row and aggregate of the user. Returns the event id."""
        return await self._track(
            "user.erased", erase_fields(user_id=user_id, occurred_at=occurred_at, event_id=event_id)
        )


def _list_or_none(values: Iterable[str] | None) -> list[str] | None:
    return None if values is None else list(values)


# --- each kind's fields from the track_* arguments (both clients) -----------------
def interaction_fields(
    *,
    user_id: str,
    type: str,
    service: str,
    theme: str | None = None,
    rating: int | None = None,
    metadata: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "user_id": user_id,
        "type": type,
        "service": service,
        "occurred_at": occurred_at or datetime.now(UTC),
        "event_id": event_id or uuid7(),
    }
    if theme is not None:
        fields["theme"] = theme
    if rating is not None:
        fields["rating"] = rating
    if metadata is not None:
        fields["metadata"] = metadata
    return fields


def preferences_fields(
    *,
    user_id: str,
    preferred_language: str | None = None,
    preferred_themes: Iterable[str] | None = None,
    preferred_services: Iterable[str] | None = None,
    notification_settings: dict[str, Any] | None = None,
    reading_length: str | None = None,
    tone_preference: str | None = None,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "preferred_language": preferred_language,
        "preferred_themes": _list_or_none(preferred_themes),
        "preferred_services": _list_or_none(preferred_services),
        "notification_settings": notification_settings,
        "reading_length": reading_length,
        "tone_preference": tone_preference,
        "occurred_at": occurred_at,
        "event_id": event_id,
    }


def onboarding_fields(
    *,
    user_id: str,
    interests: Iterable[str] = (),
    services: Iterable[str] = (),
    experience: str | None = None,
    answers: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "user_id": user_id,
        "interests": list(interests),
        "services": list(services),
        "experience": experience,
        "occurred_at": occurred_at,
        "event_id": event_id,
    }
    if answers is not None:
        fields["answers"] = answers
    return fields


def erase_fields(
    *, user_id: str, occurred_at: datetime | None = None, event_id: str | None = None
) -> dict[str, Any]:
    return {"user_id": user_id, "occurred_at": occurred_at, "event_id": event_id}


@contextlib.contextmanager
def _quiet_probe() -> Iterator[None]:
    """aiokafka logs an ERROR when the broker refuses InitProducerId; while we
    only probe for the idempotent producer, that refusal is expected."""
    sender_log = logging.getLogger("aiokafka.producer.sender")

    def drop(record: logging.LogRecord) -> bool:
        return "InitProducerIdRequest" not in record.getMessage()

    sender_log.addFilter(drop)
    try:
        yield
    finally:
        sender_log.removeFilter(drop)


class _Unreachable(BrokerUnavailableError):
    """No broker answered at the bootstrap address (as opposed to a broker
    that refused what was asked of it)."""


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    """``target`` settles as ``source`` does."""

    def settle(done: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (exc := done.exception()) is not None:
            target.set_exception(exc)
        else:
            target.set_result(done.result())

    source.add_done_callback(settle)


def _error_of(future: asyncio.Future[Any]) -> BaseException | None:
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()


def _event_id_of(value: bytes) -> str:
    return events.decode(value).event_id


class SyncTrackingClient:
    """``TrackingClient`` for code without an event loop (Flask, Django,
    Celery, scripts), safe to share between threads.

    The asyncio client runs on a private background thread. A ``track_*``
    call validates and encodes the event in the caller's thread (an invalid
    event raises there, and the caller's OpenTelemetry span is the one on
    the event), hands it to that thread without waiting for it, and returns
    the event id: microseconds. Only when the buffer is full does it wait,
    up to ``buffer_timeout`` seconds, then raise ``BufferFullError`` (the
    event is not accepted). ``start``, ``flush`` and ``close`` wait at most
    ``call_timeout`` seconds (then ``TimeoutError``).

    Forgotten ``close()``: the client closes at interpreter exit (delivering
    or spooling what it buffered). After ``os.fork`` (gunicorn
    ``--preload``, Celery, multiprocessing) the child's client is a fresh one
    with an empty buffer, started on first use if the parent's was: the
    parent's buffered events are the parent's to deliver, never twice.
    """

    client_class: type[TrackingClient] = TrackingClient  # what runs on the thread

    def __init__(self, *, call_timeout: float | None = None, **kwargs: Any) -> None:
        self._kwargs = kwargs
        delivery = float(kwargs.get("delivery_timeout", 30.0))
        self._call_timeout = call_timeout if call_timeout is not None else delivery + 30
        self._lock = threading.Lock()
        self._handed = 0  # handed to the thread, not yet taken by its client
        self._started = False
        self._closed = False
        self._begin()
        _LIVE.add(self)

    def _begin(self) -> None:
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="usertrail-sdk", daemon=True
        )
        self._thread.start()
        self._client: TrackingClient = self._call(
            _make_client(self.client_class, self._kwargs), self._call_timeout
        )

    def _after_fork(self) -> None:
        """In a forked child: the parent's thread is gone and its buffer is
        the parent's. Keep its objects from being finalized here, and begin
        again on first use."""
        _ABANDONED.append((self._loop, self._thread, self._client))
        self._pid = -1
        self._handed = 0
        self._lock = threading.Lock()

    def _ready(self) -> TrackingClient:
        if self._pid != os.getpid():  # a forked child's first use
            with _FORK_LOCK:
                if self._pid != os.getpid():
                    self._begin()
                    if self._started and not self._closed:
                        self._call(self._client.start(), self._call_timeout)
        return self._client

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            # not cancelled: what it does (deliver, connect) goes on behind
            raise TimeoutError(
                f"the usertrail client did not answer within {timeout:g} s"
            ) from None

    @property
    def spool(self) -> Spool:
        return self._ready().spool

    @property
    def resent_from_spool(self) -> int:
        return self._ready().resent_from_spool

    @property
    def idempotent(self) -> bool:
        return self._ready().idempotent

    def start(self, timeout: float | None = None) -> None:
        client = self._ready()
        self._call(client.start(), self._call_timeout if timeout is None else timeout)
        self._started, self._closed = True, False

    def flush(self, timeout: float | None = None) -> DeliveryReport:
        """``TrackingClient.flush``, waiting at most ``timeout`` seconds
        (default: ``call_timeout``); then ``TimeoutError``, and the events
        stay buffered."""
        return self._call(self._ready().flush(), self._call_timeout if timeout is None else timeout)

    def close(self, timeout: float | None = None) -> DeliveryReport:
        if self._pid != os.getpid():  # a forked child that never sent: nothing to close
            self._closed = True
            _LIVE.discard(self)
            return DeliveryReport(0, 0)
        client = self._client
        self._closed = True
        timeout = self._call_timeout if timeout is None else timeout
        try:
            return self._call(client.close(), timeout)
        except TimeoutError:
            spooled = self._give_up(client, TimeoutError(f"close() took over {timeout:g} s"))
            raise TimeoutError(
                f"the usertrail client did not close within {timeout:g} s; "
                f"{spooled} undelivered events were spooled to {client.spool.path} "
                "(the next start sends them)"
            ) from None
        finally:
            if self._loop.is_running():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
            if not self._loop.is_running():
                self._loop.close()
            _LIVE.discard(self)

    def _give_up(self, client: TrackingClient, error: BaseException) -> int:
        """A close that did not finish in time: spool what is unsent, and
        cancel the client's tasks (the close among them), so that the loop
        can stop with nothing pending. Returns the number spooled."""

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        async def abandon() -> int:
            spooled = client.spool_unsent(error)
            await cancel_the_rest()
            producer, client._producer = client._producer, None
            if producer is not None:  # its connections closed, whatever the broker does
                await stop_within(producer, 2, "producer")
                await cancel_the_rest()  # what a stop given up on left running
            return spooled

        future = asyncio.run_coroutine_threadsafe(abandon(), self._loop)
        return future.result(15)

    def _close_at_exit(self) -> None:
        if self._started and not self._closed and self._pid == os.getpid():
            try:
                report = self.close()
            except Exception as exc:  # noqa: BLE001  # at exit: say it, never raise
                log.error("closing the usertrail client at exit failed: %r", exc)
                return
            log.info("closed at interpreter exit: %s", report)

    def __enter__(self) -> SyncTrackingClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _hand_over(self, kind: str, fields: dict[str, Any]) -> str:
        client = self._ready()
        if self._closed or not self._started:
            raise ClientClosedError("call start() (or use `with`) before sending")
        record, event_id = client._record(kind, fields)
        if client.disabled:
            client.record_unsent(record)
            return event_id
        self._wait_for_room(client)
        with self._lock:
            self._handed += 1
        self._loop.call_soon_threadsafe(self._taken, client, record, event_id)
        return event_id

    def _taken(self, client: TrackingClient, record: SpooledRecord, event_id: str) -> None:
        with self._lock:
            self._handed -= 1
        client._accept(record, event_id)

    def _wait_for_room(self, client: TrackingClient) -> None:
        """The documented policy when the buffer is full: wait up to
        ``buffer_timeout`` for room, then refuse with ``BufferFullError``."""
        if client._producer is None:
            return  # no broker yet: the client spools past its buffer, never blocks
        size = client._buffer_size

        def used() -> int:
            return self._handed + client._buffered + len(client._inbox)

        if used() < size:
            return
        deadline = time.monotonic() + client._buffer_timeout
        while used() >= size:
            if time.monotonic() >= deadline:
                raise BufferFullError(
                    f"{size} events are waiting for the broker after {client._buffer_timeout}s"
                )
            time.sleep(0.002)

    def track_interaction(self, **fields: Any) -> str:
        return self._hand_over("interaction", interaction_fields(**fields))

    def track_preferences(self, **fields: Any) -> str:
        return self._hand_over("preferences.updated", preferences_fields(**fields))

    def track_onboarding(self, **fields: Any) -> str:
        return self._hand_over("onboarding.completed", onboarding_fields(**fields))

    def erase_user(self, **fields: Any) -> str:
        return self._hand_over("user.erased", erase_fields(**fields))


# Sync clients alive in this process: closed at exit, begun again after a fork.
_LIVE: weakref.WeakSet[SyncTrackingClient] = weakref.WeakSet()
_ABANDONED: list[Any] = []  # a forked child's inherited loops and threads, never finalized
_FORK_LOCK = threading.Lock()


def _close_all_at_exit() -> None:
    for client in list(_LIVE):
        client._close_at_exit()


def _after_fork_in_child() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()
    for client in list(_LIVE):
        client._after_fork()


# At exit, before concurrent.futures shuts its executors down: asyncio
# resolves host names in the default executor, so a close run by atexit
# (after that) could not connect to a broker named by host name.
# threading._register_atexit (Python 3.9+) runs its calls in reverse order of
# registration, so this one, registered after concurrent.futures.thread is
# imported (below: asyncio imports it only when it first needs a thread),
# runs first; atexit is the fallback elsewhere.
_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_close_all_at_exit)
else:  # pragma: no cover - CPython has it
    atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


async def _make_client(cls: type[TrackingClient], kwargs: dict[str, Any]) -> TrackingClient:
    # Built on the client's own loop thread, where it will run.
    return cls(**kwargs)
