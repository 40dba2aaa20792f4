"""The stream table on disk (stream/store.py): faust's RocksDB store routed
by the partition the folder names; a worker restarted after a clean stop
recovers from its local state plus the changelog's tail, one restarted after
SIGKILL discards it and recovers from the changelog."""

from __future__ import annotations

import asyncio
import inspect
import signal
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from faust.stores import by_url
from faust.stores.rocksdb import Store as RocksDBStore
from usertrail.producers import TrackingClient, demo
from usertrail.stream import store
from usertrail.stream.app import worker_dir

from tests.conftest import create_topics, unique
from tests.workers import (
    events_by_user,
    expected_view,
    get,
    kill,
    stream_process,
    worker_view,
)
from usertrail.apache_kafka import KafkaCluster
from usertrail.embedded import free_port
from usertrail.kafka import partitions_of
from usertrail.settings import Settings


def test_what_the_store_takes_from_faust_is_still_there() -> None:
    """The faust internals stream/store.py relies on: if an upgrade changes
    them, this fails before a worker writes a user to the wrong partition."""
    assert by_url(f"{store.SCHEME}://") is store.PartitionedRocksDB
    for name in ("_db_for_partition", "_set", "_get", "_del"):
        assert callable(getattr(RocksDBStore, name, None)), name
    assert list(inspect.signature(RocksDBStore._db_for_partition).parameters) == [
        "self",
        "partition",
    ]
    assert list(inspect.signature(RocksDBStore._set).parameters) == ["self", "key", "value"]
    assert "self._key_index = " in inspect.getsource(RocksDBStore.__init__)
    assert "current_event()" in inspect.getsource(RocksDBStore._set)  # why we route


def test_a_stop_that_was_not_clean_discards_the_local_state(tmp_path: Path) -> None:
    tables = tmp_path / "v1" / "tables"
    (tables / "profiles-0.db").mkdir(parents=True)
    assert store.begin(tmp_path) is False  # never stopped cleanly: discarded
    assert not tables.exists()
    (tables / "profiles-0.db").mkdir(parents=True)
    store.end_clean(tmp_path)
    assert store.begin(tmp_path) is True  # kept ...
    assert (tables / "profiles-0.db").exists()
    assert not (tmp_path / store.CLEAN).exists()  # ... and the mark is used up
    assert store.begin(tmp_path) is False  # a kill after that start: discarded
    assert not tables.exists()


def test_auto_is_rocksdb_on_apache_kafka_and_memory_on_tansu(
    broker: KafkaCluster, settings_factory: Callable[..., Settings]
) -> None:
    settings = settings_factory(broker)
    assert settings.stream_store_kind() == ("rocksdb" if broker.kind == "kafka" else "memory")
    for kind in ("memory", "rocksdb"):
        assert settings.model_copy(update={"stream_store": kind}).stream_store_kind() == kind


async def _profiles(port: int, users: list[str]) -> dict[str, dict[str, object]]:
    out = {}
    for user in users:
        url = f"http://127.0.0.1:{port}/profiles/{urllib.parse.quote(user, safe='')}"
        try:
            status, body = await asyncio.to_thread(get, url)
        except OSError:
            status, body = 0, {}
        if status == 200:
            out[user] = worker_view(body)
    return out


async def _until_profiles(
    port: int, expected: dict[str, dict[str, object]], log: Path, seconds: float = 120
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    got: dict[str, dict[str, object]] = {}
    while loop.time() < deadline:
        got = await _profiles(port, list(expected))
        if got == expected:
            return
        await asyncio.sleep(0.5)
    differ = sorted(u for u in expected if got.get(u) != expected[u])
    raise AssertionError(
        f"{len(differ)} of {len(expected)} profiles differ, e.g. {differ[:3]}\n" + _tail(log)
    )


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _policy(topic: str, policy: str) -> ConfigResource:
    return ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": policy})


async def _wipe_changelog(settings: Settings) -> int:
    """Delete every record of the table's changelog (what a long-compacted,
    retention-trimmed changelog looks like to a worker that had read it):
    a worker can then recover only from its local state. Returns how many
    records there were."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
        await consumer.start()
        try:
            tps = await partitions_of(consumer, settings.changelog_topic)
            ends = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        # Kafka deletes records only from topics whose policy includes delete
        await admin.alter_configs([_policy(settings.changelog_topic, "compact,delete")])
        try:
            done = await admin.delete_records(
                {
                    TopicPartition(tp.topic, tp.partition): RecordsToDelete(end)
                    for tp, end in ends.items()
                }
            )
        finally:
            await admin.alter_configs([_policy(settings.changelog_topic, "compact")])
        assert done == ends  # every partition's log now starts at its end
        return sum(ends.values())
    finally:
        await admin.close()


@pytest.mark.xdist_group("heavy")
async def test_a_clean_restart_recovers_from_the_local_state_and_a_killed_one_from_the_changelog(
    kafka1: KafkaCluster, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(kafka1, stream_app_id=unique("store"))
    await create_topics(settings)
    plan = list(demo.plan(users=60, events=6000, seed=31))
    first, second = plan[:3000], plan[3000:]
    async with TrackingClient(source="demo", settings=settings) as client:
        sent = await demo.run(client, first)
    port = free_port()  # the same worker each time: the same directory
    log = tmp_path / "stream.log"
    env = {"USERTRAIL_STREAM_STORE": "rocksdb"}
    datadir = worker_dir(settings.model_copy(update={"data_dir": tmp_path}), port)

    proc = stream_process(settings, port, log, **env)
    by_user = await events_by_user(settings, sent)
    await _until_profiles(port, {u: expected_view(e) for u, e in by_user.items()}, log)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 60) == 0
    assert (datadir / store.CLEAN).exists(), "a clean stop is marked"
    assert any((datadir / "v1" / "tables").iterdir())

    # Nothing left in the changelog: the profiles can only come from disk.
    assert await _wipe_changelog(settings) > 0
    proc = stream_process(settings, port, log, **env)
    try:
        await _until_profiles(port, {u: expected_view(e) for u, e in by_user.items()}, log)
        # ... and the applied offsets too: the second half is folded on top,
        # nothing of the first half twice
        async with TrackingClient(source="demo", settings=settings) as client:
            sent += await demo.run(client, second)
        by_user = await events_by_user(settings, sent)
        await _until_profiles(port, {u: expected_view(e) for u, e in by_user.items()}, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0

    # Another app (a changelog of its own, whole) folds the same log and is
    # killed: its next start discards the local state and recovers it from
    # the changelog.
    other = settings.model_copy(update={"stream_app_id": unique("store")})
    await create_topics(other)
    port, log = free_port(), tmp_path / "other.log"
    datadir = worker_dir(other.model_copy(update={"data_dir": tmp_path}), port)
    expected = {u: expected_view(e) for u, e in by_user.items()}
    proc = stream_process(other, port, log, **env)
    try:
        await _until_profiles(port, expected, log)
    finally:
        kill(proc)
    assert not (datadir / store.CLEAN).exists()
    assert any((datadir / "v1" / "tables").iterdir())
    proc = stream_process(other, port, log, **env)
    try:
        await _until_profiles(port, expected, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    text = (tmp_path / "stream.log").read_text() + log.read_text()
    assert "the last stop of this worker was not clean" in log.read_text()
    assert "Traceback" not in text
