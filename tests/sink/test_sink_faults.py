"""The sink under faults: SIGKILL, database restart, broker outage, two members."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from usertrail.sink.consumer import Sink, SinkOptions

from tests.conftest import create_topics, unique
from tests.sink.conftest import make_database
from tests.workers import (
    assert_rows_equal_events,
    count_rows,
    get,
    make_events,
    produce,
    resolve_resends,
    sink_process,
    wait_for,
)
from usertrail.cli import main
from usertrail.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from usertrail.settings import Settings


@pytest.mark.xdist_group("heavy-b")
async def test_sigkill_at_random_moments_leaves_exactly_one_row_per_event(
    settings_factory: Callable[..., Settings],
    broker: EmbeddedBroker,
    database_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(broker, database_url=database_url)
    group = unique("sink")
    await create_topics(settings)
    calls = resolve_resends(make_events(50_000))
    # ~5 s a cycle (a killed member's partitions move after its session
    # expires): at 1,000 events/s every kill lands while events still flow.
    enough = asyncio.Event()  # set after the last kill: no need to send all of them
    producing = asyncio.create_task(produce(settings, calls, rate=1000, enough=enough))
    rng = random.Random(7)
    kills = 0
    proc: subprocess.Popen[bytes] | None = None
    try:
        while kills < 10:
            assert not producing.done(), f"the stream ended after {kills} kills"
            before = count_rows(database_url)
            proc = sink_process(settings, database_url, tmp_path / "sink.log", group)
            # kill it mid-stream: once it has written something, at a random moment
            await wait_for(lambda b=before: count_rows(database_url) > b, 60, "progress")
            await asyncio.sleep(rng.uniform(0, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    finally:
        enough.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    sent = await producing
    # thousands of calls, every 25th a resend of an earlier event (same id)
    assert len(sent) >= 5000, "the kills fell while events flowed"
    log = tmp_path / "sink.log"
    start = log.stat().st_size
    proc = sink_process(settings, database_url, log, group)
    try:
        await wait_for(lambda: count_rows(database_url) >= len(sent), 120, "all rows")
        # the earlier lives may have written every row: SIGTERM only once this
        # one runs (during its imports, SIGTERM's default action ends it, -15)
        await wait_for(lambda: "assigned {" in log.read_text()[start:], 60, "assignment")
        await asyncio.sleep(1)  # anything more would be a duplicate
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    assert kills >= 10
    assert_rows_equal_events(database_url, sent)
    # what the crashes left is what a rebuild from the log gives
    args = ["--database-url", database_url, "--log-level", "WARNING"]
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "USERTRAIL_EVENTS_TOPIC": settings.events_topic,
        "USERTRAIL_PROFILES_TOPIC": settings.profiles_topic,
        "USERTRAIL_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "USERTRAIL_DATA_DIR": str(settings.data_dir),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert await asyncio.to_thread(main, ["verify", "--only", "database", *args]) == 0
        assert await asyncio.to_thread(main, ["replay", "db", *args]) == 0
    assert_rows_equal_events(database_url, sent)


async def test_database_restart_and_broker_outage_need_no_manual_step(
    settings_factory: Callable[..., Settings],
    broker_factory: Callable[..., EmbeddedBroker],
    tmp_path: Path,
) -> None:
    own_broker = broker_factory()
    pg = EmbeddedPostgres(data_dir=tmp_path / "pg", port=free_port(), database="usertrail")
    pg.start()
    try:
        url = make_database(pg)
        settings = settings_factory(own_broker, database_url=url)
        group = unique("sink")
        await create_topics(settings)
        calls = resolve_resends(make_events(20_000, seed=2))
        producing = asyncio.create_task(produce(settings, calls, rate=2000))
        web = free_port()
        proc = sink_process(
            settings, url, tmp_path / "sink.log", group, USERTRAIL_SINK_WEB_PORT=str(web)
        )

        async def health_says(status: int, state: str) -> None:
            health = f"http://127.0.0.1:{web}/health"
            for _ in range(300):
                try:
                    got, body = await asyncio.to_thread(get, health)
                except OSError:
                    got, body = 0, {}
                if got == status and body.get("state") == state:
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"/health never said {status} {state!r}: {got} {body}")

        try:
            await wait_for(lambda: count_rows(url) > 2000, 60, "progress")
            await health_says(200, "writing")
            pg.stop()  # the database goes away mid-run...
            await health_says(503, "waiting for the database")
            await asyncio.sleep(1)
            pg.start()  # ...and comes back
            await wait_for(lambda: count_rows(url) > 8000, 60, "progress after the restart")
            await health_says(200, "writing")
            assert own_broker.proc is not None
            own_broker.proc.send_signal(signal.SIGSTOP)  # the broker is gone for 10 s
            await asyncio.sleep(10)
            own_broker.proc.send_signal(signal.SIGCONT)
            sent = await producing
            await wait_for(lambda: count_rows(url) >= len(sent), 120, "all rows")
            await asyncio.sleep(1)
            assert proc.poll() is None, "the sink kept running through both outages"
        except AssertionError as exc:  # with what the sink said
            sink_log = (tmp_path / "sink.log").read_text()
            raise AssertionError(f"{exc}\n--- sink.log ---\n{sink_log[-6000:]}") from None
        finally:
            proc.send_signal(signal.SIGTERM)
            if proc.wait(timeout=30) is None:
                proc.kill()
        assert_rows_equal_events(url, sent)
        log = (tmp_path / "sink.log").read_text()
        assert "database unavailable" in log
    finally:
        pg.stop()


async def test_two_sinks_split_the_partitions_and_write_each_event_once(
    settings: Settings,
    database_url: str,
) -> None:
    calls = resolve_resends(make_events(6000, seed=3))
    sent = await produce(settings, calls[:3000], rate=1e9)
    group = unique("sink")
    sinks = [Sink(settings, SinkOptions(group=group)), Sink(settings, SinkOptions(group=group))]
    tasks = [asyncio.create_task(sink.run()) for sink in sinks]
    try:

        def split() -> bool:
            a, b = (set(s.consumer.assignment()) for s in sinks)
            return (
                bool(a) and bool(b) and not a & b and len(a | b) == 2 * settings.events_partitions
            )  # events + profiles

        await wait_for(split, 60, "both members to hold partitions")
        written_before = [s.written.records for s in sinks]
        sent.update(await produce(settings, calls[3000:], rate=1e9))
        await wait_for(lambda: count_rows(database_url) >= len(sent), 60, "all rows")
        await asyncio.sleep(1)
        assert split(), "the split held"
        assert all(
            s.written.records > before for s, before in zip(sinks, written_before, strict=True)
        ), "both members wrote events of the second half"
    finally:
        for sink in sinks:
            sink.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert_rows_equal_events(database_url, sent)


async def test_a_sink_without_partitions_for_too_long_exits_to_be_restarted(
    settings_factory: Callable[..., Settings],
    broker_factory: Callable[..., EmbeddedBroker],
    database_url: str,
    tmp_path: Path,
) -> None:
    """A broker that takes connections and answers nothing (frozen): the sink
    gets no partitions; after USERTRAIL_STALL_SECONDS it says why and exits
    with code 6. Restarted once the broker answers, it writes every event."""
    own_broker = broker_factory()
    settings = settings_factory(own_broker, database_url=database_url)
    await create_topics(settings)
    sent = await produce(settings, resolve_resends(make_events(300, seed=4)), rate=10_000)
    assert own_broker.proc is not None
    own_broker.proc.send_signal(signal.SIGSTOP)
    group, log = unique("sink"), tmp_path / "sink.log"
    # USERTRAIL_BROKER: not asked of a broker that answers nothing
    proc = sink_process(
        settings, database_url, log, group, USERTRAIL_STALL_SECONDS="3", USERTRAIL_BROKER="tansu"
    )
    try:
        code = await asyncio.to_thread(proc.wait, 60)
    finally:
        own_broker.proc.send_signal(signal.SIGCONT)
    said = log.read_text()
    assert code == 6, said
    assert "the sink stalled (no partitions assigned for" in said and "Traceback" not in said
    proc = sink_process(settings, database_url, log, group)
    try:
        await wait_for(lambda: count_rows(database_url) >= len(sent), 60, "every row")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert_rows_equal_events(database_url, sent)
