"""The faust worker: folds ``usertrail.events`` into per-user profiles.

``create_app(settings, rules)`` builds the app; nothing here runs at import.
The agent only moves bytes and calls the pure functions (``fold``,
``segment``, through ``batch.fold_users``): it takes the events in batches,
folds each user's events of a batch into the user's state (a redelivered or
resent event leaves it unchanged, docs/architecture.md, rule 2), writes each changed
state once and publishes the user's profile after the batch as a
``ProfileMessage`` to ``usertrail.profiles``. Decoding and folding run in a
helper process by default (``batch.FoldProcess``), on another core than
faust's own per-event work. A batch's writes are in flight while the next batch
is folded, and acknowledged by the broker before the one after it is folded
and before the worker gives up any partition.

Each partition's applied offset lives in the table next to the users, so a
restarted worker knows exactly which records its state holds and refuses a
record that does not follow it (``Positions``): the committed group offset
is where reading starts, never what decides. (That is also why faust may
commit a batch's offsets before its writes are acknowledged: after a crash
the recovered applied offset is behind the committed one, and the worker
re-reads from the applied offset.)

The table is co-partitioned with the events: the worker writes a user's
state to the changelog partition of the user's events, which is the
partition the producers' murmur2 partitioner chose for the same user id, so
every worker recovers exactly its own users.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from faust.types import TP
from usertrail.stream.batch import Folded, FoldProcess, UserBatch, fold_users
from usertrail.stream.policy import RESEEK_SECONDS, Positions, Verdict, then_send
from usertrail.stream.segments import Rules, segment
from usertrail.stream.state import applied_key, load_state, log_key, message_for

from usertrail.errors import LogResetError
from usertrail.kafka import adopt_stale_group_leaders, log_identity, stop_within
from usertrail.settings import STREAM_TABLE, Settings

log = logging.getLogger("usertrail.stream")

TABLE = STREAM_TABLE
BATCH_WITHIN = 0.25
"""Seconds a batch waits to fill before it is folded anyway."""


class _DeliverEverything(dict[Any, Any]):
    """faust's consumer remembers the last offset it delivered per partition
    and drops fetched records below it, and counts a jump in offsets as a
    gap it may commit over. After ``Positions`` seeks back, records still in
    flight from before the seek raise that remembered offset again, so the
    re-read would be dropped for good. With nothing remembered faust
    delivers every fetched record and commits only acked offsets without
    holes; records already applied are skipped by ``Positions``."""

    def __getitem__(self, key: Any) -> None:
        return None


class UsertrailApp(faust.App):
    """faust's app with what the worker keeps beside it."""

    # the LogResetError the worker stopped for, if any (`usertrail stream`
    # exits with its code)
    usertrail_log_reset: LogResetError | None = None
    usertrail_table: Any = None  # the profiles table, for tests and operator tools


def create_app(
    settings: Settings,
    rules: Rules,
    *,
    web_port: int = 6066,
    store: str = "memory://",
    on_batch: Callable[[int], None] | None = None,
) -> UsertrailApp:
    """The worker's faust app. ``on_batch(n)`` is called after each batch of
    ``n`` records is folded and its writes (and every earlier batch's) are
    acknowledged."""
    group = settings.group_options()
    datadir = settings.data_dir / "faust" / settings.stream_app_id
    datadir.mkdir(parents=True, exist_ok=True)
    if settings.is_tansu:
        adopt_stale_group_leaders()  # docs/brokers.md, "Stale group leader"
    app = UsertrailApp(
        settings.stream_app_id,
        broker=[f"kafka://{host}" for host in settings.bootstrap_servers.split(",")],
        store=store,
        autodiscover=False,
        topic_partitions=settings.events_partitions,
        topic_replication_factor=settings.replicas(),
        topic_disable_leader=True,
        processing_guarantee="at_least_once",
        broker_session_timeout=group["session_timeout_ms"] / 1000,
        broker_heartbeat_interval=group["heartbeat_interval_ms"] / 1000,
        broker_rebalance_timeout=group["rebalance_timeout_ms"] / 1000,
        # tansu answers ListOffsets(latest) with the first offset of the last
        # batch + 1 (docs/brokers.md): table recovery is only exact when faust's
        # own producer writes one record per batch. Not on a real cluster.
        producer_max_batch_size=1 if settings.is_tansu else 16384,
        # faust's own files (rocksdb tables, if chosen) under our data
        # directory, never in the working directory
        datadir=str(datadir),
        web_port=web_port,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
    )
    events = app.topic(
        settings.events_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    # Profiles go out through a producer of their own: on the embedded broker
    # faust's producer sends one record per request for its changelog's sake
    # (docs/brokers.md), which the profiles topic does not need (its readers go
    # by the high-water mark of their fetches). Measured: a profile cost
    # about 100 us of the worker's time through faust's producer.
    own_producer: list[AIOKafkaProducer] = []

    async def profiles_producer() -> AIOKafkaProducer:
        if not own_producer:  # started by the agent's first batch
            producer = AIOKafkaProducer(acks="all", linger_ms=5, **settings.kafka_options())
            await producer.start()
            own_producer.append(producer)
        return own_producer[0]

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # faust's signal types
    async def stop_profiles_producer(sender: Any, **kwargs: Any) -> None:
        try:
            await writes_acknowledged()
        except KafkaError as exc:  # a restart re-reads from the applied offset
            log.error("writes of the last batch failed at shutdown: %r", exc)
        while own_producer:
            await stop_within(own_producer.pop(), 10, "profiles producer")
        if helper is not None:
            await helper.close()

    table = app.Table(
        TABLE,
        default=None,
        partitions=settings.events_partitions,
        # bytes -> bytes: faust's raw codec end to end (changelog, store,
        # recovery). The key is the user id in UTF-8, the very key bytes of
        # the events, so the changelog partition is the producers' partition.
        key_type=bytes,
        value_type=bytes,
    )

    positions = Positions()
    app.consumer._read_offset = _DeliverEverything()  # type: ignore[attr-defined]

    async def events_log_id() -> bytes | None:
        """The events topic's id as the broker answers now (None: it offers none)."""
        client = (await profiles_producer()).client
        try:
            found = (await log_identity(client, [settings.events_topic])).topic_ids
        except KafkaError as exc:
            log.warning("could not ask the broker for the topic id (%r)", exc)
            return None
        topic_id = found.get(settings.events_topic)
        return None if topic_id is None else str(topic_id).encode()

    def same_log(partition: int, current: bytes | None) -> bool:
        stored = table.data.get(log_key(partition))
        if stored is None or current is None or stored == current:
            return True
        if app.usertrail_log_reset is None:
            reset = LogResetError(
                f"{settings.events_topic}: the broker's log is not the one the stream's "
                f"state was folded from (partition {partition} was read from topic id "
                f"{stored.decode()}; the broker's has id {current.decode()}); nothing of it "
                "was folded. If the broker lost its log, restart `usertrail up` (it restores "
                "the log from the archive); if that log is gone for good, `usertrail replay "
                "stream` folds the new one from its start"
            )
            log.error("%s", reset)
            app.usertrail_log_reset = reset
            # stop as SIGTERM does (a faust crash left the process running);
            # `usertrail stream` then exits with the error's code
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    @app.agent(events)
    async def fold_events(stream: faust.StreamT[bytes]) -> None:
        takes = stream.take_events  # type: ignore[attr-defined]  # faust's, untyped
        async for batch in takes(settings.stream_batch_max, within=BATCH_WITHIN):
            await fold_batch(batch)

    # The writes of the last batch folded (with every earlier batch's): the
    # broker acknowledges them while the next batch is delivered and folded.
    # On the embedded broker, where faust's producer sends one record per
    # request, waiting for them took about a sixth of a batch's time.
    in_flight: list[asyncio.Future[Any]] = []

    async def writes_acknowledged() -> None:
        while in_flight:
            await in_flight.pop(0)  # a failed write raises here: the agent stops

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def before_giving_up_partitions(sender: Any, revoked: Any, **kwargs: Any) -> None:
        delivered_at.clear()  # the next assignment's partitions get their grace again
        # faust flushed its producer already; this makes sure of every write
        # of ours, so the partitions' next owner recovers all of them.
        try:
            await writes_acknowledged()
        except KafkaError as exc:  # the next owner re-reads from the applied offset
            log.error("writes of the last batch failed before a rebalance: %r", exc)

    def when_acknowledged(writes: asyncio.Future[Any], n: int) -> None:
        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                return
            if (exc := f.exception()) is not None:
                # the next batch raises it; the next owner or a restart
                # re-reads from the applied offset
                log.error("a batch's writes failed: %r", exc)
            elif on_batch is not None:
                on_batch(n)

        writes.add_done_callback(done)

    # Decoding and folding, most of a batch's CPU, run in a helper process on
    # another core while faust's consumer thread fetches the next batch. The
    # batch is awaited before its events are acknowledged, so a rebalance
    # waits for it as for any batch.
    helper = FoldProcess(rules) if settings.stream_fold_process else None

    if helper is not None:

        @app.task  # type: ignore[untyped-decorator]
        async def start_helper() -> None:  # before the first batch needs it
            await helper.start()

    async def fold(users: list[UserBatch]) -> list[Folded | None]:
        if helper is None:
            return fold_users(users, rules)
        return await helper.fold(users)

    def applied_offset(partition: int) -> int | None:
        raw = table.data.get(applied_key(partition))
        return None if raw is None else int(raw)

    async def applied_or_before_start(partition: int) -> int | None:
        """The partition's applied offset; with none yet, the offset just
        before the log's start, so that the first record folded is the
        first record there is. faust was seen on Apache Kafka to begin a
        partition new to the group at a later offset (while a rebalance
        moved it under traffic); folding from there would have dropped
        every earlier event for good. None only if the broker cannot say."""
        applied = applied_offset(partition)
        if applied is not None:
            return applied
        tp = TP(settings.events_topic, partition)
        try:
            starts = await app.consumer.earliest_offsets(tp)
        except KafkaError as exc:
            log.warning("%s: the log's start is unknown (%r); folding what comes", tp, exc)
            return None
        start = starts.get(tp)
        return None if start is None else start - 1

    async def fold_batch(batch: Sequence[faust.EventT[bytes]]) -> None:
        if app.usertrail_log_reset is not None:
            return  # stopping: see same_log
        current = await events_log_id()
        if not all(same_log(p, current) for p in {e.message.partition for e in batch}):
            return
        applied: dict[int, int | None] = {}
        recovered: dict[int, int | None] = {}  # as the batch found them
        gaps: dict[int, int] = {}
        ahead: dict[int, int] = {}
        per_user: dict[bytes, tuple[int, list[tuple[bytes, int]]]] = {}
        now = time.monotonic()
        for event in batch:
            message = event.message
            partition, offset = message.partition, message.offset
            delivered_at[partition] = now
            if partition not in applied:
                applied[partition] = recovered[partition] = await applied_or_before_start(partition)
            verdict = positions.admit(partition, offset, applied[partition])
            if verdict is Verdict.DONE:
                if partition not in ahead:
                    target = positions.skip_to(partition, offset, cast(int, applied[partition]))
                    if target is not None:
                        ahead[partition] = target
                continue
            if verdict is Verdict.GAP:
                gaps[partition] = cast(int, applied[partition]) + 1
                continue
            applied[partition] = offset
            key, value = message.key, message.value
            if key is None or value is None:
                continue  # never an event of the contract: the sink dead-letters it
            mine = per_user.get(key)  # a valid event's key is its user id
            if mine is None:
                mine = per_user[key] = (partition, [])
            mine[1].append((value, offset))
        pending: list[Awaitable[Any]] = []
        profiles = await profiles_producer()
        users = [UserBatch(key, table.data.get(key), items) for key, (_, items) in per_user.items()]
        for (key, (partition, _)), result in zip(per_user.items(), await fold(users), strict=True):
            if result is None:
                continue  # nothing new, or not valid events: the sink dead-letters those
            # the store and the changelog directly (what table[key] = value
            # does), so the changelog partition is the event's and the send
            # can be awaited
            table.data[key] = result.state
            pending.append(table.send_changelog(partition, key, result.state))
            pending.append(await profiles.send(settings.profiles_topic, result.message, key=key))
        marks: list[tuple[int, bytes, bytes]] = []
        for partition, done_to in applied.items():
            if done_to is not None and done_to != recovered[partition]:
                mark, value = applied_key(partition), str(done_to).encode()
                table.data[mark] = value
                marks.append((partition, mark, value))
                if current is not None and table.data.get(log_key(partition)) != current:
                    table.data[log_key(partition)] = current
                    marks.append((partition, log_key(partition), current))
        # Each partition's applied offset goes to its changelog partition only
        # once this batch's other writes and every earlier batch's are
        # acknowledged, so a recovered applied offset implies all of them:
        # without an idempotent producer (the embedded broker has none) a
        # write can fail while a later one to the same partition gets
        # through. One future: done when every write so far is acknowledged.
        previous = list(in_flight)

        def send_marks(marks: list[tuple[int, bytes, bytes]] = marks) -> list[Awaitable[Any]]:
            return [table.send_changelog(*m) for m in marks]

        writes = asyncio.ensure_future(then_send([*pending, *previous], send_marks))
        in_flight[:] = [writes]
        when_acknowledged(writes, len(batch))
        for earlier in previous:
            await earlier  # at most two batches' writes in flight
        for partition, want in gaps.items():
            if positions.should_seek(partition, want):
                log.warning(
                    "%s[%d]: delivery skipped to a later offset; re-reading from %d",
                    settings.events_topic,
                    partition,
                    want,
                )
                await seek(partition, want)
        for partition, want in ahead.items():
            if partition not in gaps:
                log.info(
                    "%s[%d]: state already holds up to %d; reading on from there",
                    settings.events_topic,
                    partition,
                    want - 1,
                )
                await seek(partition, want)

    # Records faust fetched but never delivered. On Apache Kafka, with a
    # rebalance under traffic, faust was seen to fetch a partition new to
    # the group to its end without handing one record to the agent: the
    # consumer's position sat at the high-water mark, the table had nothing
    # of it, and nothing more came until new traffic. So: a partition that
    # has records past its applied offset (or, none applied yet, past the
    # log's start) and delivered nothing for RESEEK_SECONDS is re-read from
    # the first record not applied. A needless re-read costs only reading:
    # records already applied are skipped.
    delivered_at: dict[int, float] = {}

    @app.timer(RESEEK_SECONDS / 2)  # type: ignore[untyped-decorator]
    async def reread_undelivered() -> None:
        if app.rebalancing:  # recovery first: its end seeks every partition
            return
        now = time.monotonic()
        for tp in list(app.consumer.assignment()):
            if tp.topic != settings.events_topic:
                continue
            since = delivered_at.setdefault(tp.partition, now)  # grace after assignment
            if now - since < RESEEK_SECONDS:
                continue
            try:
                high = app.consumer.highwater(tp)
            except AssertionError:  # aiokafka's word for "revoked meanwhile"
                continue
            applied = await applied_or_before_start(tp.partition)
            if high is None or applied is None or high <= applied + 1:
                continue
            log.warning(
                "%s[%d]: records up to %d were never delivered; re-reading from %d",
                settings.events_topic,
                tp.partition,
                high - 1,
                applied + 1,
            )
            delivered_at[tp.partition] = now
            await seek(tp.partition, applied + 1)

    async def seek(partition: int, offset: int) -> None:
        try:
            await app.consumer.seek_wait({TP(settings.events_topic, partition): offset})
        except KafkaError as exc:  # revoked meanwhile: its new owner reads it
            log.warning("seek of partition %d failed: %r", partition, exc)

    @app.task  # type: ignore[untyped-decorator]
    async def know_the_changelog() -> None:
        # faust's table router asks the producer's metadata for the
        # changelog's partitions and fails (a 500) until it has them.
        producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
        await producer.partitions_for(table.changelog_topic.get_topic_name())
        routable.set()

    routable = asyncio.Event()

    def when_routable(view: Any) -> Any:
        @functools.wraps(view)
        async def guarded(web: Any, request: Any, **kwargs: Any) -> Any:
            if not routable.is_set():
                return web.json({"error": "starting: try again shortly"}, status=503)
            return await view(web, request, **kwargs)

        return guarded

    @app.page("/profiles/{user_id}")
    @when_routable
    @app.table_route(table=table, match_info="user_id")
    async def get_profile(web: Any, request: Any, user_id: str) -> Any:
        state = load_state(table.get(user_id.encode()))
        if state is None or state.profile.erased_at is not None:
            return web.json({"error": f"unknown user {user_id!r}"}, status=404)
        body = message_for(state, segment(state.profile, rules)).model_dump(
            mode="json", by_alias=True
        )
        p = state.profile
        body["profile"] = {
            "countsByType": p.counts_by_type,
            "countsByService": p.counts_by_service,
            "countsByTheme": p.counts_by_theme,
            "favouriteThemes": p.favourite_themes(),
            "ratingSumByService": p.rating_sum_by_service,
            "ratingCountByService": p.rating_count_by_service,
            "firstActivity": p.first_activity.isoformat() if p.first_activity else None,
            "lastActivity": p.last_activity.isoformat() if p.last_activity else None,
            "preferences": p.preferences,
            "onboarding": p.onboarding,
        }
        return web.json(body)

    app.usertrail_table = table  # for tests and operator tools
    return app
