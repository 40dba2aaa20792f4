"""The stream table on disk (stream/store.py): faust's RocksDB store routed
by the partition the folder names and never ahead of the changelog, so that
a worker killed at any moment restarts from its local state plus the
changelog's tail."""

from __future__ import annotations

import asyncio
import inspect
import signal
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from faust.events import Event
from faust.stores import by_url
from faust.stores.memory import Store as MemoryStore
from faust.stores.rocksdb import Store as RocksDBStore
from faust.tables.base import Collection as Table
from faust.tables.recovery import Recovery
from faust.types import TP, Message
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from usertrail.producers import TrackingClient, demo
from usertrail.stream import store

from tests.conftest import create_topics, unique
from tests.workers import (
    changelog_ends,
    changelog_written,
    events_by_user,
    expected_view,
    get,
    kill,
    stream_process,
    worker_view,
)
from usertrail.apache_kafka import KafkaCluster
from usertrail.embedded import free_port
from usertrail.settings import Settings


def test_what_the_store_takes_from_faust_is_still_there() -> None:
    """The faust internals stream/store.py relies on: if an upgrade changes
    them, this fails before a worker writes a user to the wrong partition."""
    assert by_url(f"{store.SCHEME}://") is store.PartitionedRocksDB
    for name in ("_db_for_partition", "_set", "_get", "_del"):
        assert callable(getattr(RocksDBStore, name, None)), name

    def params(f: object) -> list[str]:
        return list(inspect.signature(f).parameters)  # type: ignore[arg-type]

    assert params(RocksDBStore._db_for_partition) == ["self", "partition"]
    assert params(RocksDBStore._set) == ["self", "key", "value"]
    assert params(RocksDBStore.set_persisted_offset) == ["self", "tp", "offset"]
    assert params(RocksDBStore.apply_changelog_batch) == ["self", "batch", "to_key", "to_value"]
    assert "self._key_index = " in inspect.getsource(RocksDBStore.__init__)
    assert "current_event()" in inspect.getsource(RocksDBStore._set)  # why we route
    # recovery marks what it read through set_persisted_offset, on the store
    assert "self.set_persisted_offset(" in inspect.getsource(RocksDBStore.apply_changelog_batch)
    # ... and the table, as each changelog write is acknowledged (ignored)
    assert "self.data.set_persisted_offset(" in inspect.getsource(Table._on_changelog_sent)


def test_what_recovered_only_takes_from_faust_is_still_there() -> None:
    """faust's recovery keeps the active partitions and the last offset it
    reads of each (its highwater - 1), and the memory store applies the
    batches it is given: ``recovered_only`` filters those batches by both."""
    source = inspect.getsource(Recovery)
    assert "self.active_tps" in source and "self.active_highwaters" in source
    assert "value - 1 if value is not None else -1" in inspect.getsource(Recovery._build_highwaters)
    # ... and it applies past the end what a fetch delivered after recovery
    # ended, from a buffer flushed later (what recovered_only leaves out)
    assert "buf.append(event)" in source
    assert "self.flush_buffers" in inspect.getsource(Recovery.on_partitions_revoked)
    assert by_url(f"{store.MEMORY}://") is store.FolderMemory
    assert list(inspect.signature(MemoryStore.apply_changelog_batch).parameters) == [
        "self",
        "batch",
        "to_key",
        "to_value",
    ]


@pytest.mark.parametrize("kind", ["memory", "rocksdb"])
def test_past_the_end_recovery_read_the_changelog_no_longer_writes_a_folded_partition(
    kind: str, tmp_path: Path
) -> None:
    """Of an active partition, a changelog record past the end recovery
    read to (tansu's short end, or a write of the worker that just lost it)
    is not applied when faust's buffer is flushed later: it would overwrite
    what the folder stored since. A standby partition's records all are."""
    app = faust.App(
        unique("recovered-only"), store=store.store_url(kind), datadir=tmp_path, autodiscover=False
    )
    table = app.Table("t", partitions=4, key_type=bytes, value_type=bytes)
    changelog = table.changelog_topic.get_topic_name()
    active, standby = TP(changelog, 0), TP(changelog, 1)
    recovery = app.tables.recovery
    recovery.active_tps.add(active)
    recovery.active_highwaters[active] = 5  # recovery reads offsets up to 5
    recovery.standby_tps.add(standby)

    def event(tp: TP, offset: int, key: bytes, value: bytes) -> Any:
        message = Message(tp.topic, tp.partition, offset, 0.0, 0, {}, key, value, None, tp=tp)
        return Event(app, key, value, {}, message)

    with store.on_partition(0):
        table.data[b"folded"] = b"by the folder"
    table.data.apply_changelog_batch(
        [
            event(active, 4, b"read", b"in recovery"),
            event(active, 5, b"end", b"the last record read"),
            event(active, 6, b"folded", b"a state past the end"),
            event(standby, 40, b"standby", b"followed"),
        ],
        to_key=lambda k: k,
        to_value=lambda v: v,
    )
    with store.on_partition(0):
        got = {k: table.data.get(k) for k in (b"read", b"end", b"folded")}
    with store.on_partition(1):
        got[b"standby"] = table.data.get(b"standby")
    assert got == {
        b"read": b"in recovery",
        b"end": b"the last record read",
        b"folded": b"by the folder",
        b"standby": b"followed",
    }
    assert table.data.usertrail_left_out == 1


@hypothesis_settings(max_examples=400, deadline=None)
@given(st.data())
def test_the_persisted_offset_never_passes_a_write_not_in_the_store(data: st.DataObject) -> None:
    """The folder's sends as they happen: batch k's states after batch
    k-1's, each batch's applied offsets (marks) only after its own states
    and the batch before's marks, so a later batch's states can come
    between a batch's states and its marks. Batches go into the store in
    order, each once its marks are acknowledged (acknowledgements come in
    the order of the log); a worker killed then recovers from the persisted
    offset on, so nothing at or below it may be missing from the store."""
    batches = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=6), label="states")
    partition_of = st.integers(0, 2)
    states_left = list(batches)
    marked = [False] * len(batches)
    log: list[tuple[int, int]] = []  # (batch, partition), in the order sent
    while not all(marked):
        options = []
        k = next((i for i, n in enumerate(states_left) if n), None)
        if k is not None:
            options.append(("state", k))
        m = marked.index(False)
        if m != k and (k is None or m < k):  # its states are all sent
            options.append(("mark", m))
        kind, batch = data.draw(st.sampled_from(options))
        if kind == "state":
            states_left[batch] -= 1
        else:
            marked[batch] = True
        log.append((batch, data.draw(partition_of)))
    # offsets: the order of the sends within each partition
    offsets, written = [], {0: 0, 1: 0, 2: 0}
    for _, partition in log:
        offsets.append(written[partition])
        written[partition] += 1

    persisted: dict[int, int] = {}
    stored_up_to: dict[int, int] = {}
    for k in range(len(batches)):
        last = max(i for i, (b, _) in enumerate(log) if b == k)  # its newest mark
        acked = data.draw(st.integers(last, len(log) - 1), label="acknowledged up to")
        for i, (b, p) in enumerate(log):
            if b == k:
                stored_up_to[p] = max(stored_up_to.get(p, -1), offsets[i])
        later = [(p, offsets[i]) for i, (b, p) in enumerate(log[: acked + 1]) if b > k]
        persisted.update(store.persistable(stored_up_to, later))
        for i, (b, p) in enumerate(log):
            if p in persisted and offsets[i] <= persisted[p]:
                assert b <= k, (log, k, persisted)
    # everything stored: recovery reads nothing again
    assert persisted == {p: n - 1 for p, n in written.items() if n}


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
        ends = await changelog_ends(settings)
        # Kafka deletes records only from topics whose policy includes delete
        await admin.alter_configs([_policy(settings.changelog_topic, "compact,delete")])
        try:
            done = await admin.delete_records(
                {tp: RecordsToDelete(end) for tp, end in ends.items()}
            )
        finally:
            await admin.alter_configs([_policy(settings.changelog_topic, "compact")])
        assert done == ends  # every partition's log now starts at its end
        return sum(ends.values())
    finally:
        await admin.close()


async def _recovered(port: int) -> int:
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/health")
    assert status == 200, body
    return int(body["changelogRecordsRecovered"])


@pytest.mark.xdist_group("heavy-a")
async def test_a_killed_worker_restarts_from_its_local_state_and_the_changelog_tail(
    kafka1: KafkaCluster, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(kafka1, stream_app_id=unique("store"))
    await create_topics(settings)
    plan = list(demo.plan(users=60, events=8000, seed=31))
    first, second = plan[:3000], plan[3000:]
    async with TrackingClient(source="demo", settings=settings) as client:
        sent = await demo.run(client, first)
    port = free_port()  # the same worker each time: the same directory
    log = tmp_path / "stream.log"
    env = {"USERTRAIL_STREAM_STORE": "rocksdb", "USERTRAIL_STREAM_BATCH_MAX": "200"}

    proc = stream_process(settings, port, log, **env)
    by_user = await events_by_user(settings, sent)
    try:
        await _until_profiles(port, {u: expected_view(e) for u, e in by_user.items()}, log)
    finally:
        kill(proc)  # SIGKILL: no stop of any kind

    # Nothing left in the changelog: the profiles can only come from disk.
    assert await _wipe_changelog(settings) > 0
    proc = stream_process(settings, port, log, **env)
    try:
        await _until_profiles(port, {u: expected_view(e) for u, e in by_user.items()}, log)
        assert await _recovered(port) == 0
        # the applied offsets came back too: the second half is folded on
        # top, nothing of the first half twice; killed while folding it, at
        # its first write (the demo sends a user's events in runs, so a batch
        # of 200 changes 1-5 users and the whole half writes about 100
        # records, which the worker does within a second or so)
        before = await changelog_written(settings)

        async def send_second_half() -> int:
            async with TrackingClient(source="demo", settings=settings) as client:
                return await demo.run(client, second)

        sending = asyncio.create_task(send_second_half())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await changelog_written(settings) <= before and loop.time() < deadline:
            await asyncio.sleep(0.02)
    finally:
        kill(proc)
    sent += await sending
    killed_at = await changelog_written(settings)
    assert killed_at > before, "it was killed while folding the second half"

    proc = stream_process(settings, port, log, **env)
    try:
        by_user = await events_by_user(settings, sent)
        await _until_profiles(port, {u: expected_view(e) for u, e in by_user.items()}, log)
        recovered = await _recovered(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    # what recovery read: at most the tail written after the second start
    # (the state before it came from disk), not the whole changelog
    assert recovered <= killed_at - before, (recovered, before, killed_at)
    assert "Traceback" not in log.read_text()
