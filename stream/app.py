"""The faust worker: folds ``usertrail.events`` into per-user profiles.

``create_app(settings, rules)`` builds the app and only wires faust; nothing
here runs at import. faust's consumer hands each fetch of events, in one
call past faust's per-event path (``consumer.deliver_in_batches``), to the
batch folder (``folder.BatchFolder``), which takes what waits as a batch
(``pipeline.BatchQueue``): it folds each user's events of
a batch into the user's state (a redelivered or resent event leaves it
unchanged, docs/architecture.md, rule 2), writes each changed state once and
publishes the user's profile as a ``ProfileMessage`` to
``usertrail.profiles``. Decoding and folding run in a helper process by
default (``batch.FoldProcess``), on another core than the worker's fetching
and writes. The web view (``web.py``) answers ``GET /profiles/{user_id}``.

Each partition's applied offset lives in the table next to the users, so a
restarted worker knows exactly which records its state holds and refuses a
record that does not follow it (``policy.Positions``): the committed group
offset is where reading starts, never what decides. (That is also why faust
may commit a batch's offsets before its writes are acknowledged: after a
crash the recovered applied offset is behind the committed one, and the
worker re-reads from the applied offset.)

The table is co-partitioned with the events: the worker writes a user's
state to the changelog partition of the user's events, which is the
partition the producers' murmur2 partitioner chose for the same user id, so
every worker recovers exactly its own users.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
from usertrail.stream import consumer, store
from usertrail.stream.batch import FoldProcess, Result, UserBatch, fold_users
from usertrail.stream.folder import BatchFolder
from usertrail.stream.pipeline import BatchQueue
from usertrail.stream.policy import RESEEK_SECONDS
from usertrail.stream.segments import Rules
from usertrail.stream.watchdog import Watchdog
from usertrail.stream.web import add_metrics_view, add_profile_view

from usertrail.errors import UsertrailError
from usertrail.kafka import adopt_stale_group_leaders, never_create_topics
from usertrail.settings import METADATA_MAX_AGE_MS, STREAM_TABLE, Settings

log = logging.getLogger("usertrail.stream")

TABLE = STREAM_TABLE
DRAIN_SECONDS = 10
"""How long a rebalance or a stop waits for the batches handed over to be folded."""


class UsertrailApp(faust.App):
    """faust's app with what the worker keeps beside it."""

    usertrail_folder: BatchFolder | None = None
    usertrail_watchdog: Watchdog | None = None
    usertrail_table: Any = None  # the profiles table, for tests and operator tools

    @property
    def usertrail_stopped_for(self) -> UsertrailError | None:
        """What the worker stopped itself for, if anything: a log that is
        not its own (LogResetError) or a stall (StalledError); `usertrail
        stream` exits with its code."""
        if self.usertrail_folder is not None and self.usertrail_folder.stopped_for is not None:
            return self.usertrail_folder.stopped_for
        return None if self.usertrail_watchdog is None else self.usertrail_watchdog.stalled


def _stop_worker(error: UsertrailError) -> None:
    """Stop as SIGTERM stops the worker (a faust crash would leave the
    process running); if that hangs on what got stuck, exit anyway."""
    os.kill(os.getpid(), signal.SIGTERM)
    timer = threading.Timer(STOP_WITHIN, os._exit, (error.exit_code,))
    timer.daemon = True
    timer.start()


STOP_WITHIN = 60.0
"""Seconds a stalled worker's shutdown may take before the process exits."""


def worker_dir(settings: Settings, web_port: int) -> Path:
    """This worker's faust directory (its table's local state): one per
    worker, named by its web address, which no two workers of a host share
    (workers on 127.0.0.2 and 127.0.0.3 may listen on the same port)."""
    where = f"{settings.stream_web_host}-{web_port}".replace("/", "_")
    return settings.data_dir / "faust" / settings.stream_app_id / f"worker-{where}"


def create_app(
    settings: Settings,
    rules: Rules,
    *,
    web_port: int = 6066,
    on_batch: Callable[[int], None] | None = None,
) -> UsertrailApp:
    """The worker's faust app. ``on_batch(n)`` is called after each batch of
    ``n`` records is folded and its writes (and every earlier batch's) are
    acknowledged."""
    group = settings.group_options()
    datadir = worker_dir(settings, web_port)
    datadir.mkdir(parents=True, exist_ok=True)
    kind = settings.stream_store_kind()
    never_create_topics()  # usertrail/kafka.py: topics are made by ensure_topics alone
    if settings.is_tansu:
        adopt_stale_group_leaders()  # docs/brokers.md, "Stale group leader"
    app = UsertrailApp(
        settings.stream_app_id,
        broker=[f"kafka://{host}" for host in settings.bootstrap_servers.split(",")],
        store=store.store_url(kind),
        autodiscover=False,
        topic_partitions=settings.events_partitions,
        topic_replication_factor=settings.replicas(),
        topic_disable_leader=True,
        processing_guarantee="at_least_once",
        broker_session_timeout=group["session_timeout_ms"] / 1000,
        broker_heartbeat_interval=group["heartbeat_interval_ms"] / 1000,
        broker_rebalance_timeout=group["rebalance_timeout_ms"] / 1000,
        consumer_group_instance_id=group.get("group_instance_id"),
        consumer_metadata_max_age_ms=METADATA_MAX_AGE_MS,
        producer_metadata_max_age_ms=METADATA_MAX_AGE_MS,
        # tansu answers ListOffsets(latest) with the first offset of the last
        # batch + 1 (docs/brokers.md), where faust's table recovery stops:
        # the folder's applied offsets go through faust's producer there, one
        # record per batch (stream/folder.py, ``send_mark``). Not on a real
        # cluster.
        producer_max_batch_size=1 if settings.is_tansu else 16384,
        # at most this much of a partition per fetch: records of a fetch are
        # delivered one by one, and a partition the folder re-reads from an
        # earlier offset is not fetched again before they all are (a 1 MB
        # fetch held a re-read partition for minutes on a loaded worker)
        consumer_max_fetch_size=256 * 1024,
        # faust's own files (rocksdb tables, if chosen) under our data
        # directory, never in the working directory
        datadir=str(datadir),
        web_port=web_port,
        web_bind=settings.stream_web_host,
        # what faust's router gives other workers for this one's partitions
        canonical_url=settings.web_url(web_port),
    )
    events = app.topic(
        settings.events_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    table = app.Table(
        TABLE,
        default=None,
        partitions=settings.events_partitions,
        # bytes -> bytes: faust's raw codec end to end (changelog, store,
        # recovery). The key is the user id in UTF-8, the very key bytes of
        # the events, so the changelog partition is the producers' partition.
        key_type=bytes,
        value_type=bytes,
        options=dict(store.OPTIONS) if kind == "rocksdb" else None,
    )
    # Decoding and folding, most of a batch's CPU, run in a helper process on
    # another core while faust's consumer thread fetches the next batch. The
    # batch is awaited before its events are acknowledged, so a rebalance
    # waits for it as for any batch.
    helper = FoldProcess(rules) if settings.stream_fold_process else None

    async def fold(users: list[UserBatch]) -> list[Result]:
        if helper is None:
            return fold_users(users, rules)
        before = len(helper.left_out)
        try:
            return await helper.fold(users)
        finally:
            if len(helper.left_out) > before:
                folder.metrics.left_out.inc(len(helper.left_out) - before)

    async def through_faust(partition: int, key: bytes, value: bytes) -> Any:
        return table.send_changelog(partition, key, value)

    # The folder writes the changelog in batches with its own producer; on
    # tansu the applied offsets alone go through faust's table, one record
    # per batch, so that recovery reads past the newest of them
    # (stream/folder.py), not a round trip through faust's buffer for every
    # state (`./dev bench scale --part freshness`, rounds 4-5 on tansu: the
    # profile's p99 1.5-1.7 s against 3.6-4.1; the medians of five rounds,
    # dominated by tansu's own slowing, showed no gain). A RocksDB store
    # on tansu keeps that: faust compares the offset a store holds data up
    # to with the partition's end offset, which must then be exact.
    exact_ends = settings.is_tansu and kind == "rocksdb"
    folder = BatchFolder(
        settings,
        table,
        app.consumer,
        fold,
        on_batch=on_batch,
        # faust commits what is acknowledged: only what is folded and
        # durable, so a restarted worker starts at most at its applied
        # offsets (acknowledged when handed over, a SIGKILL left the group's
        # offsets past them: the records between waited for the re-read
        # timer, up to 15 s a partition)
        on_applied=lambda records: consumer.acknowledge(
            app.consumer, settings.events_topic, records
        ),
        changelog=through_faust if exact_ends else None,
        marks=through_faust if settings.is_tansu else None,
    )
    watchdog = Watchdog(app, folder, settings, stop=_stop_worker)

    # each fetch is handed over and the consumer goes on fetching; the folder
    # takes everything waiting when it is free (stream/pipeline.py)
    queue: BatchQueue[Any] = BatchQueue(folder.fold_batch, settings.stream_batch_max)

    async def drain(why: str) -> None:
        try:
            await asyncio.wait_for(queue.drained(), DRAIN_SECONDS)
        except TimeoutError:
            # their next owner (or this worker's restart) re-reads them from
            # the applied offsets
            log.warning("%d events not folded within %d s %s", queue.discard(), DRAIN_SECONDS, why)

    async def hand_over(records: list[Any]) -> None:
        folder.handed_over(records)
        await queue.put(records)

    # each fetch's events go to the folder in one call, past faust's
    # per-record path (stream/consumer.py); the agent is what subscribes the
    # worker to the topic, so faust's group assigns it the partitions
    consumer.deliver_in_batches(app, settings.events_topic, hand_over)

    @app.agent(events)
    async def fold_events(stream: faust.StreamT[bytes]) -> None:
        async for _event in stream:
            raise RuntimeError("faust delivered an event past stream/consumer.py's batches")

    @app.timer(RESEEK_SECONDS / 2)  # type: ignore[untyped-decorator]
    async def reread_undelivered() -> None:
        if not app.rebalancing:  # recovery first: its end seeks every partition
            await folder.reread_undelivered()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def before_giving_up_partitions(sender: Any, revoked: Any, **kwargs: Any) -> None:
        watchdog.revoked()
        await drain("before the rebalance")
        await folder.before_revoke(queue.drained)  # a batch the drain gave up on stops

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assignment(sender: Any, assigned: Any, **kwargs: Any) -> None:
        consumer.set_fetch_wait(app, settings.fetch_wait_ms, settings.fetch_min_bytes)
        watchdog.assigned()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # faust's signal types
    async def stop_folding(sender: Any, **kwargs: Any) -> None:
        await drain("before the stop")
        await folder.close()
        if helper is not None:
            await helper.close()

    if helper is not None:

        @app.task  # type: ignore[untyped-decorator]
        async def start_helper() -> None:  # before the first batch needs it
            await helper.start()

    @app.task  # type: ignore[untyped-decorator]
    async def say_started() -> None:
        log.info(
            "stream worker of %s: folding %s into %s, table %s (%s), web %s",
            settings.stream_app_id,
            settings.events_topic,
            settings.profiles_topic,
            TABLE,
            kind,
            settings.web_url(web_port),
        )

    add_profile_view(app, table, rules, health=watchdog.health)
    add_metrics_view(app, table, folder, datadir if kind == "rocksdb" else None)
    app.usertrail_folder = folder
    app.usertrail_watchdog = watchdog
    app.usertrail_table = table  # for tests and operator tools
    return app


SIGNAL_STOP_WITHIN = 20.0
"""Seconds faust's shutdown may take after SIGTERM or Ctrl-C."""


class BoundedWorker(faust.Worker):
    """faust's worker, whose shutdown on SIGTERM or Ctrl-C ends within
    SIGNAL_STOP_WITHIN seconds: faust's own waits without a limit and was
    seen (about 1 run in 6 of a README recipe) to take over 30 s. Exiting
    then is as safe as a SIGKILL, which the worker is built to survive: its
    state is in the changelog up to what it acknowledged, and the next
    worker goes on from there."""

    def _schedule_shutdown(self, signum: signal.Signals) -> None:
        if not self._signal_stop_time:
            timer = threading.Timer(SIGNAL_STOP_WITHIN, _exit_late, (signum,))
            timer.daemon = True
            timer.start()
        super()._schedule_shutdown(signum)


def _exit_late(signum: signal.Signals) -> None:
    log.warning(
        "still stopping %.0f s after %s; exiting now (the state is in the changelog)",
        SIGNAL_STOP_WITHIN,
        signum.name,
    )
    logging.shutdown()
    os._exit(0)


def run_worker(settings: Settings, rules: Rules, *, web_port: int) -> None:
    """``usertrail stream``: the app run by faust's worker until SIGTERM or
    Ctrl-C, watched by its watchdog from the first moment (a task of its
    own, not a faust timer: those wait for faust's start, and faust's start
    waits for good on a broker that answers nothing). Raises what the
    worker stopped itself for (a log that is not its own, exit code 3; a
    stall, 6)."""
    from usertrail import logs
    from usertrail.runtime import tune_gc

    app = create_app(settings, rules, web_port=web_port)
    tune_gc()
    worker = BoundedWorker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        logging_config=logs.worker_config(settings.log_level, settings.log_format),
    )
    # faust's terminal spinner sets the root logger to DEBUG at levels of
    # WARNING and above, so every debug line of aiokafka and faust is built
    worker.spinner = None
    assert app.usertrail_watchdog is not None
    watching = worker.loop.create_task(app.usertrail_watchdog.run())
    try:
        worker.execute_from_commandline()
    except SystemExit:
        if app.usertrail_stopped_for is not None:
            raise app.usertrail_stopped_for from None  # one line, its exit code
        raise
    finally:
        watching.cancel()
