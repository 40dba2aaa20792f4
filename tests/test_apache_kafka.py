"""What only a real Apache Kafka shows: the broker is recognised by what it
answers, the SDK's idempotent producer writes nothing twice through broker
stalls, compacted topics restore the same profiles, and a three-node cluster
loses nothing while its nodes are killed, restarted and frozen under a
running pipeline (2 sinks, 2-3 stream workers, the SDK)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from usertrail.producers import TrackingClient, decode, demo

from tests.conftest import Broker, kafka_cluster, read_all, unique
from tests.sink.conftest import query
from tests.workers import (
    Supervisor,
    Traffic,
    caught_up,
    cli,
    count_rows,
    events_by_user,
    expected_view,
    kill,
    owners,
    sink_process,
    stream_process,
    wait_for_profile,
    want,
    worker_view,
    written_through,
)
from usertrail import apache_kafka
from usertrail.apache_kafka import KafkaCluster, KafkaNode, java_binary, jvm_options
from usertrail.embedded import free_port
from usertrail.kafka import probe, stop_within
from usertrail.settings import Settings
from usertrail.topics import TopicSpec, ensure_topics, topic_specs


def test_the_broker_is_recognised_by_what_it_answers(
    broker: Broker, settings_factory: Callable[..., Settings]
) -> None:
    info = probe(broker.bootstrap_servers)
    assert info.kind == broker.kind
    assert settings_factory(broker).is_tansu == (broker.kind == "tansu")
    told = settings_factory(broker).model_copy(update={"broker": "tansu"})
    assert told.is_tansu  # the documented override wins over the answer


async def test_what_the_tansu_workarounds_are_for(
    broker: Broker, settings_factory: Callable[..., Settings]
) -> None:
    """The two gaps behind the workarounds, asked of each broker: end offsets
    after a batch of several records (faust's table recovery reads them;
    tansu answers the first offset of the last batch + 1, so the worker
    writes its applied offsets one record per batch there), and the idempotent
    producer (tansu has none, so the SDK goes without it there)."""
    settings = settings_factory(broker, events_partitions=1)
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=50)
    await producer.start()
    try:
        batch = producer.create_batch()
        for i in range(5):
            batch.append(key=b"k", value=b"%d" % i, timestamp=None)
        await (await producer.send_batch(batch, settings.events_topic, partition=0))
    finally:
        await stop_within(producer, 10)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    await consumer.start()
    try:
        tp = TopicPartition(settings.events_topic, 0)
        end = (await consumer.end_offsets([tp]))[tp]
    finally:
        await stop_within(consumer, 10)
    assert end == (1 if broker.kind == "tansu" else 5)
    async with TrackingClient(source="probe", settings=settings) as client:
        assert client.idempotent == (broker.kind == "kafka")


async def _leaders(cluster: KafkaCluster, topic: str) -> dict[int, KafkaNode]:
    """Each partition's leader, as one metadata answer gives them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap_servers)
    await admin.start()
    try:
        return {
            p["partition"]: cluster.node(p["leader"])
            for described in await admin.describe_topics([topic])
            for p in described["partitions"]
            if p["leader"] >= 0  # none while an election runs
        }
    finally:
        await admin.close()


async def _leader(cluster: KafkaCluster, topic: str, partition: int) -> KafkaNode:
    leader = (await _leaders(cluster, topic)).get(partition)
    if leader is None:
        raise AssertionError(f"no leader for {topic}[{partition}]")
    return leader


async def test_the_idempotent_sdk_writes_nothing_twice_through_broker_stalls(
    kafka1: KafkaCluster,
    settings_factory: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests time out while the broker is frozen, aiokafka re-sends them,
    and the broker (which wrote the first copy once it woke up) drops the
    second by its producer id and sequence. Without idempotence the same
    stalls write some batches twice; consumers would dedup them by event
    id, here the topic itself has none."""
    settings = settings_factory(kafka1, events_partitions=2)
    await ensure_topics(settings)
    node = kafka1.nodes[0]
    sent: list[str] = []
    acked: set[str] = set()
    caplog.set_level(logging.WARNING, logger="aiokafka")

    def on_delivery(event_id: str, error: BaseException | None) -> None:
        if error is None:
            acked.add(event_id)

    async with TrackingClient(
        source="stalls", settings=settings, delivery_timeout=1.5, on_delivery=on_delivery
    ) as client:
        assert client.idempotent, "Apache Kafka offers the idempotent producer"

        async def send() -> None:
            for i in range(6000):
                sent.append(
                    await client.track_interaction(
                        user_id=f"u{i % 50}", type="chat", service="saju"
                    )
                )
                if i % 100 == 0:
                    await asyncio.sleep(0.01)

        sending = asyncio.create_task(send())
        await asyncio.sleep(0.3)
        for _ in range(3):
            node.pause()
            await asyncio.sleep(3)
            node.resume()
            await asyncio.sleep(0.5)
        await sending
        await client.flush()
    retried = [r for r in caplog.records if "RequestTimedOutError" in r.getMessage()]
    assert retried, "the stalls forced no retry: the test proved nothing"
    # whatever the first client spooled (never handed to the broker), the
    # next start re-sends
    async with TrackingClient(source="stalls", settings=settings, on_delivery=on_delivery):
        pass
    records = await read_all(settings, settings.events_topic, expected=len(sent), timeout=30)
    copies = collections.Counter(decode(value or b"").event_id for _, _, value in records)
    assert sorted(copies) == sorted(sent), "every event is in the topic"
    assert [e for e, n in copies.items() if n > 1] == [], "no event twice"
    assert acked == set(sent)


async def test_compacted_topics_restore_the_same_profiles(
    kafka1: KafkaCluster, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """``usertrail.profiles`` and the stream's changelog are compacted on
    Kafka (tiny segments here, so the cleaner runs within seconds); a worker
    started after compaction recovers exactly the profiles it had."""
    settings = settings_factory(kafka1, stream_app_id=unique("compact"))
    quick = {
        "segment.ms": "100",
        "min.cleanable.dirty.ratio": "0.001",
        "delete.retention.ms": "100",
    }
    await ensure_topics(
        settings,
        [
            TopicSpec(s.name, s.partitions, {**s.config, **quick})
            if s.config.get("cleanup.policy") == "compact"
            else s
            for s in topic_specs(settings)
        ],
    )
    port = free_port()
    proc = stream_process(settings, port, tmp_path / "w1.log")
    sent = 0
    try:
        for wave in range(4):  # each wave rolls the segments the last one wrote
            async with TrackingClient(source="demo", settings=settings) as client:
                sent += await demo.run(client, demo.plan(users=30, events=800, seed=20 + wave))
            by_user = await events_by_user(settings, sent)
            for user, events in by_user.items():
                await wait_for_profile(port, user, max(o for _, o in events))
            await asyncio.sleep(1)
        compacted = {
            topic: await _compacted(settings, topic)
            for topic in (settings.changelog_topic, settings.profiles_topic)
        }
    finally:
        kill(proc)
    for topic, (kept, written) in compacted.items():
        assert kept < written, f"{topic}: the cleaner removed nothing ({kept} of {written})"

    port = free_port()
    proc = stream_process(settings, port, tmp_path / "w2.log")
    try:
        for user, events in by_user.items():
            body = await wait_for_profile(port, user, max(o for _, o in events))
            assert worker_view(body) == expected_view(events), user
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    checked = cli(settings, tmp_path, "verify", "--only", "profiles")
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def _compacted(settings: Settings, topic: str, timeout: float = 60) -> tuple[int, int]:
    """(records left, offsets written) once the cleaner has removed some, or
    at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            while not consumer.assignment():
                await asyncio.sleep(0.1)
            tps = list(consumer.assignment())
            ends = await consumer.end_offsets(tps)
            kept = 0
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                batch = await consumer.getmany(timeout_ms=500)
                kept += sum(len(records) for records in batch.values())
        finally:
            await stop_within(consumer, 10)
        written = sum(ends.values())
        if kept < written or time.monotonic() > deadline:
            return kept, written
        await asyncio.sleep(1)


# It failed in about 1 full-suite run in 4 until 2026-11-30 (xfail, "not yet
# understood"). Three causes, all fixed:
# - A sink stopped with exit code 3 during a failover ("the stored position
#   lies beyond its end"): a partition's new leader answers a high-water mark
#   below its old leader's until its followers catch up. Seen once in a run
#   that printed its workers' restarts; the test's supervisor restarted the
#   sink, and while the end lagged it could stop again. The sink now asks
#   again for a minute (sink/consumer.py, beyond_grace), and the test
#   asserts that no sink stopped.
# - The test asserted that no event was twice in the topic, which is not the
#   pipeline's promise: an event whose acknowledgement a killed leader kept
#   away is spooled by the SDK and sent again by its next producer session,
#   which idempotence cannot span (the sink and the stream count it once).
#   A copy twice is allowed only for what the SDK spooled.
# - Seen on 2026-11-30 (1 of 7 full runs): 12,086 rows of 22,778 when the
#   120 s wait ended, while the sinks' aiokafka fetchers asked node 1, no
#   longer the leader, for the offsets of t.profiles[2] every 100 ms, never
#   updating their metadata: aiokafka's lookup of a starting offset does not
#   refresh metadata on a leader error, only its periodic refresh (every
#   5 min by default) does. Every client now refreshes every 5 s
#   (usertrail/settings.py, METADATA_MAX_AGE_MS; docs/brokers.md, "Stale
#   leader").
@pytest.mark.xdist_group("heavy-a")
async def test_a_frozen_leader_holds_back_the_sdk_on_its_own_partitions_only(
    kafka3: KafkaCluster, settings_factory: Callable[..., Settings]
) -> None:
    """A leader that takes requests and answers nothing (SIGSTOP): the SDK's
    batches for its partitions wait (aiokafka keeps one batch per partition
    in flight, up to the delivery timeout), and the other partitions' events
    are acknowledged meanwhile. The SDK once shipped every partition's
    batches through one lock: the second batch of a frozen partition held it,
    and with it every partition, for the whole delivery timeout (30 s)."""
    # one replica per partition: with three, a frozen follower holds every
    # partition's acks=all writes until it leaves the in-sync replicas (30 s,
    # replica.lag.time.max.ms), which is the broker's rule, not the SDK's
    settings = settings_factory(kafka3, events_partitions=6, replication_factor=1)
    await ensure_topics(settings)
    await asyncio.to_thread(kafka3.wait_ready)
    leaders = await _leaders(kafka3, settings.events_topic)
    frozen = leaders[0]
    held = [p for p in range(6) if leaders[p] is frozen]
    others = [p for p in range(6) if p not in held]
    assert others, "the other nodes lead some partitions"
    partitions = list(range(6))
    users: dict[int, list[str]] = collections.defaultdict(list)
    n = 0
    while min(len(users[p]) for p in partitions) < 3:
        user = f"user-{n}"
        users[DefaultPartitioner()(user.encode(), partitions, partitions)].append(user)
        n += 1
    acked: dict[str, float] = {}
    spooled: set[str] = set()
    ids: dict[str, int] = {}

    def delivered(event_id: str, error: BaseException | None) -> None:
        if error is None:
            acked[event_id] = time.monotonic()
        else:
            spooled.add(event_id)

    async with TrackingClient(
        source="frozen", settings=settings, on_delivery=delivered, max_batch_size=4096
    ) as client:
        for p in partitions:  # partitions known, connections open
            ids[
                await client.track_interaction(user_id=users[p][0], type="chat", service="saju")
            ] = p
        await client.flush()
        frozen.pause()
        try:
            started = time.monotonic()
            for i in range(600):  # several full batches for every partition
                p = partitions[i % 6]
                event_id = await client.track_interaction(
                    user_id=users[p][i % 3], type="chat", service="saju", metadata={"pad": "x" * 64}
                )
                ids[event_id] = p
            waited = time.monotonic() - started
            deadline = time.monotonic() + 10
            theirs = {e for e, p in ids.items() if p in others}
            while not theirs <= set(acked) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            missing = theirs - set(acked)
        finally:
            frozen.resume()
    assert waited < 2, f"the app waited {waited:.1f} s for 600 calls"
    assert not missing, (
        f"{len(missing)} events of the partitions {others} that no frozen node leads were "
        f"not acknowledged within 10 s while node {frozen.node_id} was frozen"
    )
    assert set(ids) == set(acked) | spooled  # afterwards every event is settled


@pytest.mark.xdist_group("heavy-a")
async def test_three_brokers_killed_restarted_and_frozen_lose_nothing(
    kafka3: KafkaCluster,
    settings_factory: Callable[..., Settings],
    database_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(kafka3, database_url=database_url, stream_app_id=unique("cluster"))
    assert settings.replicas() == 3
    await ensure_topics(settings)
    group = unique("sink")
    ports = [free_port() for _ in range(3)]
    supervisor = Supervisor()

    def sink(i: int) -> Callable[[], subprocess.Popen[bytes]]:
        return lambda: sink_process(settings, database_url, tmp_path / f"sink{i}.log", group)

    def stream(i: int) -> Callable[[], subprocess.Popen[bytes]]:
        return lambda: stream_process(settings, ports[i], tmp_path / f"stream{i}.log")

    watching: asyncio.Task[None] | None = None
    try:
        for i in range(2):
            supervisor.start(f"sink {i}", sink(i))
            supervisor.start(f"stream {i}", stream(i))
        watching = asyncio.create_task(supervisor.watch())
        # 200 a second: every fault falls on traffic in flight all the same,
        # and the suite's two cores serve half the events of 400 (three
        # replicas each, two sinks, two or three workers)
        traffic = Traffic(settings, rate=200)
        sending = asyncio.create_task(traffic.run())
        summary: list[str] = []
        outage: dict[str, float] = {}
        started = time.monotonic()

        async def down_for(node: KafkaNode, seconds: float, how: str) -> None:
            t = time.monotonic()
            if how == "SIGSTOP":
                node.pause()
                await asyncio.sleep(seconds)
                node.resume()
            else:
                node.kill()
                await asyncio.sleep(seconds)
                node.start()
                await asyncio.to_thread(node.wait_listening, 240)
                await asyncio.to_thread(kafka3.wait_ready)
            outage[f"node {node.node_id} ({how})"] = time.monotonic() - t

        try:
            await asyncio.sleep(4)
            leader = await _leader(kafka3, settings.events_topic, 0)
            summary.append(f"SIGKILL node {leader.node_id}, leader of {settings.events_topic}[0]")
            await down_for(leader, 5, "SIGKILL")
            # a third stream worker joins: the group rebalances while traffic flows
            supervisor.start("stream 2", stream(2))
            await owners(ports[2], settings.changelog_topic)  # it joined and was given partitions
            controller = kafka3.active_controller()
            summary.append(f"SIGKILL node {controller.node_id}, the active controller")
            await down_for(controller, 5, "SIGKILL")
            # ... and one leaves again
            supervisor.stop("stream 0")
            await asyncio.sleep(3)
            frozen = (
                kafka3.nodes[-1]
                if kafka3.active_controller() is not kafka3.nodes[-1]
                else kafka3.nodes[0]
            )
            summary.append(f"SIGSTOP node {frozen.node_id} for 15 s")
            await down_for(frozen, 15, "SIGSTOP")
            await asyncio.sleep(3)
        finally:
            traffic.stopped.set()
            await sending
        # the SDK spools what a fault kept unacknowledged; its next start re-sends it
        async with TrackingClient(
            source="cluster", settings=settings, on_delivery=traffic._delivered
        ):
            pass
        try:
            await _until(lambda: count_rows(database_url) >= len(traffic.sent), 120, "every row")
        except AssertionError:
            supervisor.stop_all()  # the sinks say where they stopped (and why)
            rows_now = count_rows(database_url)
            raise AssertionError(
                f"{rows_now:,} rows of {len(traffic.sent):,} events 120 s after the faults\n"
                + _tails(tmp_path, "sink*.log", 40)
            ) from None
        by_user = await events_by_user(settings, len(traffic.sent))
        expected = want(by_user)
        states = await caught_up(settings, expected)
        behind = sorted(u for u, p in expected.items() if states.get(u) != p)
        if behind:
            supervisor.stop_all()  # the workers say where they stopped (and why)
            raise AssertionError(
                f"{len(behind)} of {len(expected)} profiles differ from the events 120 s "
                f"after every row arrived (e.g. {behind[:5]})\n"
                + _tails(tmp_path, "stream*.log", 60)
            )
        await written_through(supervisor, settings, database_url, group)
    finally:  # also when a fault step itself fails: no worker outlives the test
        if watching is not None:
            watching.cancel()
        supervisor.stop_all()

    rows = {r[0] for r in query(database_url, 'SELECT id FROM "UserInteraction"')}
    records = await read_all(
        settings, settings.events_topic, expected=len(traffic.sent), timeout=30
    )
    copies = collections.Counter(decode(v or b"").event_id for _, _, v in records)
    lost = traffic.acked - rows
    duplicated = sum(n - 1 for n in copies.values())
    twice = {e for e, n in copies.items() if n > 1}
    dead = query(database_url, "SELECT count(*) FROM usertrail_dead_letters")[0][0]
    print(
        "\ncluster fault run: "
        + "; ".join(summary)
        + f"\n  outages: {', '.join(f'{k} {v:.1f} s' for k, v in outage.items())}"
        + f"\n  events sent {len(traffic.sent):,}, acknowledged {len(traffic.acked):,}, "
        + f"rows {len(rows):,}, lost {len(lost)}, duplicated in the topic {duplicated} "
        + f"(spooled by the SDK and sent again: {len(traffic.spooled)}), "
        + f"dead letters {dead}, {time.monotonic() - started:.0f} s in all"
        + f"\n  worker restarts after a crash: {dict(supervisor.restarts) or 'none'}"
    )
    assert lost == set()
    assert rows == set(traffic.sent), "rows = distinct events, nothing more"
    # twice in the topic only what a fault kept unacknowledged and the SDK's
    # spool sent again (another producer session: idempotence cannot span it)
    assert twice <= traffic.spooled, twice - traffic.spooled
    assert dead == 0
    checked = cli(settings, tmp_path, "verify", "--database-url", database_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The sinks ride out every fault (one stopped once with "the stored
    # position lies beyond its end" while a new leader's high-water mark
    # lagged: sink/consumer.py, beyond_grace); a stream worker may crash when
    # a node it is talking to dies (faust gives up on NodeNotReadyError) and
    # is restarted: counted above, and nothing of it shows in the results.
    assert _tracebacks(tmp_path, "sink*.log") == []
    sinks_stopped = [n for n in supervisor.restarts if n.startswith("sink")]
    assert sinks_stopped == [], _errors(tmp_path, "sink*.log") + "\n" + _group_story(tmp_path)


def _tails(folder: Path, pattern: str, lines: int) -> str:
    return "\n".join(
        f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:])
        for log in sorted(folder.glob(pattern))
    )


def _group_story(folder: Path) -> str:
    """What each sink's group did (joins, revocations, coordinator moves,
    assignments): the lines a stalled sink is read by."""
    return "\n".join(
        f"--- {log.name}\n"
        + "\n".join(
            [
                line
                for line in log.read_text().splitlines()
                if "group_coordinator" in line or "usertrail.sink" in line
            ][-80:]
        )
        for log in sorted(folder.glob("sink*.log"))
    )


def _errors(folder: Path, pattern: str) -> str:
    return "\n".join(
        f"{log.name}: {line}"
        for log in sorted(folder.glob(pattern))
        for line in log.read_text().splitlines()
        if line.startswith("usertrail: error:")
    )


def _tracebacks(folder: Path, pattern: str) -> list[str]:
    return [log.name for log in folder.glob(pattern) if "Traceback" in log.read_text()]


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def test_up_runs_one_kafka_node_or_three(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USERTRAIL_EMBEDDED_BROKER", "kafka")
    monkeypatch.setenv("USERTRAIL_EMBEDDED_KAFKA_BROKERS", "3")
    settings = Settings(embedded_kafka_port=19092)
    assert settings.bootstrap_servers == "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
    monkeypatch.setenv("USERTRAIL_EMBEDDED_KAFKA_BROKERS", "2")
    with pytest.raises(ValueError, match="1 node or 3"):
        Settings()


@pytest.mark.parametrize("extra", ["", "-XX:TieredStopAtLevel=4 -XX:+UseG1GC", "-Xss1m"])
def test_the_jvm_starts_with_our_options_and_any_kafka_opts(extra: str) -> None:
    """``KAFKA_OPTS`` goes after our options: a flag of its own wins, and a
    collector of its own replaces ours (the JVM refuses two collectors)."""
    done = subprocess.run(
        [java_binary(), *jvm_options(extra), "-XX:+PrintFlagsFinal", "-version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    flags = {f[1]: f[3] for f in (line.split() for line in done.stdout.splitlines()) if len(f) > 3}
    assert flags["TieredStopAtLevel"] == ("4" if "Tiered" in extra else "1")
    assert flags["UseG1GC" if "G1" in extra else "UseSerialGC"] == "true"


def test_a_node_loads_its_classes_from_the_archive_a_stopped_node_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first node to stop writes the JVM's class-data archive (one killed
    leaves none, and nothing half-written); the nodes started after it map
    it; a damaged one is left to the JVM, which loads the classes from the
    jars and starts all the same."""
    archive = tmp_path / "classes.jsa"
    monkeypatch.setattr(apache_kafka, "class_archive", lambda java: archive)
    monkeypatch.delenv("KAFKA_OPTS", raising=False)
    cluster = kafka_cluster(tmp_path / "kafka", brokers=1)
    node = cluster.nodes[0]

    def mapped() -> bool:
        assert node.proc is not None
        return str(archive) in Path(f"/proc/{node.proc.pid}/maps").read_text()

    try:
        cluster.start()
        cluster.kill()
        assert not archive.exists() and list(tmp_path.glob("*.tmp")) == []
        cluster.start()
        cluster.stop()
        assert archive.exists(), "the stopped node wrote the archive at its exit"
        assert list(tmp_path.glob("*.tmp")) == []
        cluster.start()
        assert mapped(), "a node started after it loads its classes from it"
        cluster.stop()
        archive.chmod(0o644)
        archive.write_bytes(os.urandom(1 << 20))
        cluster.start()
        assert probe(cluster.bootstrap_servers).kind == "kafka"
        assert not mapped()
    finally:
        cluster.kill()
