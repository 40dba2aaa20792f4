"""A kill schedule of our own, on each broker: 2 sinks and 2 stream workers
under steady SDK traffic, SIGKILLed at random every 1-2.5 s for 20 s and
restarted at once (as `usertrail up` does), with a sink frozen for 4 s and
the broker frozen for 3 s on the way. Each worker keeps its name in its group
across restarts, as under `up` (static membership, on Apache Kafka; tansu
ignores it: docs/brokers.md, "Rebalance storms"). Afterwards every event the SDK
acknowledged is exactly one row, the profiles are the fold of the log,
`verify` finds nothing, and no fault left a dead letter. Prints what was
done and how long the pipeline took to converge."""

from __future__ import annotations

import asyncio
import collections
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from usertrail.producers import TrackingClient, decode

from tests.conftest import Broker, create_topics, read_all, unique
from tests.sink.conftest import query
from tests.workers import (
    Supervisor,
    Traffic,
    caught_up,
    cli,
    count_rows,
    events_by_user,
    sink_process,
    stream_process,
    want,
    written_through,
)
from usertrail.apache_kafka import KafkaCluster
from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.settings import Settings

STORM_SECONDS = 20.0


def _freeze(broker: Broker) -> Callable[[], None]:
    """Freeze the broker; returns what thaws it."""
    if isinstance(broker, KafkaCluster):
        node = broker.nodes[0]
        node.pause()
        return node.resume
    assert isinstance(broker, EmbeddedBroker) and broker.proc is not None
    proc = broker.proc
    proc.send_signal(signal.SIGSTOP)
    return lambda: proc.send_signal(signal.SIGCONT)


@pytest.mark.xdist_group("heavy-b")
async def test_a_kill_schedule_loses_nothing_and_counts_nothing_twice(
    settings_factory: Callable[..., Settings],
    broker: Broker,
    database_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(broker, database_url=database_url, stream_app_id=unique("chaos"))
    await create_topics(settings)
    group = unique("sink")
    ports = [free_port() for _ in range(2)]
    supervisor = Supervisor()
    for i in range(2):
        supervisor.start(
            f"sink {i}",
            lambda i=i: sink_process(
                settings,
                database_url,
                tmp_path / f"sink{i}.log",
                group,
                USERTRAIL_GROUP_INSTANCE_ID=f"sink-{i}",
            ),
        )
        supervisor.start(
            f"stream {i}",
            lambda i=i: stream_process(
                settings,
                ports[i],
                tmp_path / f"stream{i}.log",
                USERTRAIL_GROUP_INSTANCE_ID=f"stream-{i}",
            ),
        )
    watching = asyncio.create_task(supervisor.watch())
    traffic = Traffic(settings, rate=300)
    sending = asyncio.create_task(traffic.run())
    rng = random.Random(20)
    kills: collections.Counter[str] = collections.Counter()
    stalls: list[str] = []
    try:
        started = time.monotonic()
        frozen_sink = frozen_broker = False
        while (elapsed := time.monotonic() - started) < STORM_SECONDS:
            await asyncio.sleep(rng.uniform(1.0, 2.5))
            if not frozen_sink and elapsed > STORM_SECONDS / 3:
                frozen_sink = True
                proc = supervisor.procs["sink 1"][1]
                proc.send_signal(signal.SIGSTOP)
                await asyncio.sleep(4)
                proc.send_signal(signal.SIGCONT)
                stalls.append("sink 1 frozen 4 s")
            elif not frozen_broker and elapsed > 2 * STORM_SECONDS / 3:
                frozen_broker = True
                thaw = _freeze(broker)
                await asyncio.sleep(3)
                thaw()
                stalls.append(f"broker ({broker.kind}) frozen 3 s")
            else:
                name = rng.choice(sorted(supervisor.procs))
                supervisor.procs[name][1].kill()  # SIGKILL; the supervisor restarts it
                kills[name.split()[0]] += 1
        last_fault = time.monotonic()
    finally:
        traffic.stopped.set()
        await sending
    try:
        # the SDK spools what a fault kept unacknowledged; its next start re-sends it
        async with TrackingClient(
            source="cluster", settings=settings, on_delivery=traffic._delivered
        ):
            pass
        deadline = time.monotonic() + 120
        while count_rows(database_url) < len(traffic.sent):
            assert time.monotonic() < deadline, (
                f"{count_rows(database_url):,} rows of {len(traffic.sent):,} events "
                "120 s after the last fault"
            )
            await asyncio.sleep(0.2)
        rows_at = time.monotonic() - last_fault
        expected = want(await events_by_user(settings, len(traffic.sent)))
        assert await caught_up(settings, expected) == expected
        profiles_at = time.monotonic() - last_fault
        await written_through(supervisor, settings, database_url, group)
    finally:
        watching.cancel()
        supervisor.stop_all()

    rows = {r[0] for r in query(database_url, 'SELECT id FROM "UserInteraction"')}
    records = await read_all(settings, settings.events_topic, expected=len(traffic.sent))
    copies = collections.Counter(decode(v or b"").event_id for _, _, v in records)
    duplicated = sum(n - 1 for n in copies.values())
    twice = {e for e, n in copies.items() if n > 1}
    lost = traffic.acked - rows
    dead = query(database_url, "SELECT count(*) FROM usertrail_dead_letters")[0][0]
    print(
        f"\nkill schedule ({broker.kind}): {sum(kills.values())} SIGKILLs in "
        f"{STORM_SECONDS:.0f} s ({dict(kills)}), stalls: {', '.join(stalls)}"
        f"\n  events sent {len(traffic.sent):,}, acknowledged {len(traffic.acked):,}, "
        f"rows {len(rows):,}, lost {len(lost)}, duplicated in the topic {duplicated} "
        f"(spooled by the SDK and sent again: {len(traffic.spooled)}), "
        f"dead letters {dead}; converged {rows_at:.1f} s (rows) and {profiles_at:.1f} s "
        f"(profiles) after the last fault; worker restarts: {dict(supervisor.restarts)}"
    )
    assert lost == set()
    assert rows == set(traffic.sent), "rows = distinct events, nothing more"
    assert dead == 0
    # twice in the topic only what a fault kept unacknowledged and the SDK's
    # spool sent again (on Kafka, its idempotent producer adds no copy of its own)
    if broker.kind == "kafka":
        assert twice <= traffic.spooled, twice - traffic.spooled
    checked = cli(settings, tmp_path, "verify", "--database-url", database_url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
