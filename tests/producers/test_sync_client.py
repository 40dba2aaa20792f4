"""SyncTrackingClient never hurts the app: a call hands its event over
without waiting for the client's thread, a full buffer waits a documented
time then refuses, every wait has a limit, a forgotten close() still
delivers at exit, and a forked child gets a client of its own. The client's
thread is held still (a callback blocking its loop) to show what does not
wait for it; events are read back from the real broker."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from usertrail.producers import SyncTrackingClient, decode
from usertrail.producers.spool import Spool

from tests.conftest import create_topics, read_all
from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.errors import BrokerUnavailableError, BufferFullError, ClientClosedError
from usertrail.settings import Settings


def _hold(client: SyncTrackingClient) -> threading.Event:
    """Block the client's loop until the returned event is set."""
    release = threading.Event()
    client._loop.call_soon_threadsafe(release.wait, 30)
    return release


async def test_calls_return_while_the_client_thread_is_held(settings: Settings) -> None:
    await create_topics(settings)

    def app() -> tuple[list[str], int]:
        with SyncTrackingClient(source="flask", settings=settings) as client:
            release = _hold(client)
            # had a call waited for the client's thread, this would never end
            ids = [
                client.track_interaction(user_id=f"u{i % 4}", type="chat", service="saju")
                for i in range(300)
            ]
            release.set()
            return ids, client.flush().delivered

    ids, delivered = await asyncio.to_thread(app)
    assert delivered == 300
    records = await read_all(settings, settings.events_topic, expected=300)
    assert {decode(v or b"").event_id for _, _, v in records} == set(ids)


async def test_a_full_buffer_waits_then_refuses_and_waits_are_bounded(
    settings: Settings, tmp_path: Path
) -> None:
    await create_topics(settings)

    def app() -> None:
        client = SyncTrackingClient(
            source="flask",
            settings=settings,
            buffer_size=5,
            buffer_timeout=0.2,
            spool_path=tmp_path / "s.jsonl",
        )
        client.start()
        release = _hold(client)
        for _ in range(5):
            client.track_interaction(user_id="u", type="chat", service="saju")
        with pytest.raises(BufferFullError) as info:
            client.track_interaction(user_id="u", type="chat", service="saju")
        assert info.value.retriable
        with pytest.raises(TimeoutError, match="did not answer within"):
            client.flush(timeout=0.5)  # the thread is held: bounded, not forever
        release.set()
        # the flush given up on went on behind: its report is that flush's
        assert client.close().spooled == 0

    await asyncio.to_thread(app)
    records = await read_all(settings, settings.events_topic, expected=5)
    assert len({decode(v or b"").event_id for _, _, v in records}) == 5


def _nowhere(
    broker_factory: Callable[..., EmbeddedBroker], settings_factory: Callable[..., Settings]
) -> tuple[int, Settings]:
    """A free port where no broker runs yet, and settings pointing there
    (as tests/producers/test_client.py's offline start does)."""
    port = free_port()
    nowhere = settings_factory(broker_factory(), kafka_bootstrap_servers=f"127.0.0.1:{port}")
    return port, nowhere.model_copy(update={"broker": "tansu"})  # asked of nobody yet


async def test_a_sync_client_started_before_its_broker_delivers_when_it_appears(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """Offline start from a thread without a loop: start() and every call
    return although nothing answers (past the buffer the events go to the
    spool), and once a broker answers at that address every event reaches
    the topic, spooled ones too, with no restart and no flush of the client."""
    port, settings = _nowhere(broker_factory, settings_factory)
    spool = tmp_path / "s.jsonl"
    client = SyncTrackingClient(source="flask", settings=settings, buffer_size=10, spool_path=spool)

    def offline() -> list[str]:
        client.start()  # no broker: no error
        return [
            client.track_interaction(user_id=f"u{i % 3}", type="chat", service="saju")
            for i in range(25)
        ]

    ids = await asyncio.to_thread(offline)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while client.spool.count() < 20:  # two full buffers spill on the client's thread
        assert loop.time() < deadline, f"{client.spool.count()} events spooled, not 20"
        await asyncio.sleep(0.05)
    broker_factory(port=port)
    await create_topics(settings)
    # read back while the client still runs: it connected and sent by itself
    records = await read_all(settings, settings.events_topic, expected=25, timeout=60)
    assert {decode(v or b"").event_id for _, _, v in records} == set(ids)
    report = await asyncio.to_thread(client.close)
    # the 20 spilled were spooled, then sent with the 5 held
    assert (report.delivered, report.spooled) == (25, 20) and not spool.exists()


async def test_a_sync_client_that_must_not_start_offline_raises_at_start(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """offline_start=False (a command line tool): start() raises
    BrokerUnavailableError at once rather than accepting events, within its
    call timeout (past it, TimeoutError), and nothing is accepted after."""
    _, settings = _nowhere(broker_factory, settings_factory)
    spool = tmp_path / "s.jsonl"

    def tool() -> tuple[int, int]:
        client = SyncTrackingClient(
            source="cli", settings=settings, offline_start=False, spool_path=spool
        )
        try:
            with pytest.raises(BrokerUnavailableError, match="cannot reach Kafka") as info:
                client.start(timeout=20)
            assert info.value.retriable and info.value.exit_code == 4
            with pytest.raises(ClientClosedError):
                client.track_interaction(user_id="u", type="chat", service="saju")
        finally:
            report = client.close()
        return report.delivered, report.spooled

    assert await asyncio.to_thread(tool) == (0, 0)
    assert not spool.exists()


_FORGOTTEN = """
import json, sys
from usertrail.producers import SyncTrackingClient
from usertrail.settings import Settings

settings = Settings(kafka_bootstrap_servers=sys.argv[1], events_topic=sys.argv[2])
client = SyncTrackingClient(source="script", settings=settings, linger_ms=60_000)
client.start()
print(json.dumps([client.track_interaction(user_id="u", type="chat", service="tarot")
                  for _ in range(40)]))
# no close(): the interpreter's exit delivers them
"""

_FORKED = """
import json, os, sys
from usertrail.producers import SyncTrackingClient
from usertrail.settings import Settings

settings = Settings(kafka_bootstrap_servers=sys.argv[1], events_topic=sys.argv[2])
client = SyncTrackingClient(source="gunicorn", settings=settings, linger_ms=60_000)
client.start()
before = [client.track_interaction(user_id="parent", type="chat", service="tarot")
          for _ in range(10)]  # still buffered when the process forks
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read)
    mine = [client.track_interaction(user_id="child", type="chat", service="saju")
            for _ in range(5)]
    os.write(write, json.dumps(mine).encode())
    os.close(write)
    sys.exit(0)  # the child's client closes at exit
os.close(write)
child = json.loads(os.read(read, 1 << 20))
_, status = os.waitpid(pid, 0)
after = [client.track_interaction(user_id="parent", type="chat", service="tarot")
         for _ in range(5)]
client.close()
print(json.dumps({"parent": before + after, "child": child, "status": status}))
"""


def _script(code: str, settings: Settings, tmp_path: Path) -> object:
    script = tmp_path / "app.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script), settings.bootstrap_servers, settings.events_topic],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_a_forgotten_close_still_delivers_at_exit(settings: Settings, tmp_path: Path) -> None:
    await create_topics(settings)
    ids = await asyncio.to_thread(_script, _FORGOTTEN, settings, tmp_path)
    records = await read_all(settings, settings.events_topic, expected=40)
    assert {decode(v or b"").event_id for _, _, v in records} == set(ids)  # type: ignore[arg-type]


async def test_the_exit_close_reaches_a_broker_named_by_host_name(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """A broker advertised as ``localhost``: the exit close opens its first
    connection to the partition's leader then, and asyncio resolves host
    names in an executor that an atexit hook finds shut down already; the
    client's exit close runs before that, so the events arrive."""
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "tansu.log", host="localhost")
    broker.start()
    try:
        settings = settings_factory(broker)
        await create_topics(settings)
        ids = await asyncio.to_thread(_script, _FORGOTTEN, settings, tmp_path)
        records = await read_all(settings, settings.events_topic, expected=40)
        assert {decode(v or b"").event_id for _, _, v in records} == set(ids)  # type: ignore[arg-type]
    finally:
        broker.stop()


async def test_a_forked_child_has_a_client_of_its_own(settings: Settings, tmp_path: Path) -> None:
    await create_topics(settings)
    got = await asyncio.to_thread(_script, _FORKED, settings, tmp_path)
    assert isinstance(got, dict) and got["status"] == 0
    records = await read_all(settings, settings.events_topic, expected=20)
    counts = collections.Counter(decode(v or b"").event_id for _, _, v in records)
    assert set(counts) == set(got["parent"]) | set(got["child"])
    assert all(n == 1 for n in counts.values()), "the parent's buffer was sent twice"


async def test_a_close_that_times_out_spools_what_it_held(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """The broker freezes (SIGSTOP) under a client holding events: close()
    with a timeout gives up in time, says how many it spooled, and leaves
    nothing pending; the next client of the same spool sends every one."""
    broker = broker_factory()
    settings = settings_factory(broker)
    await create_topics(settings)
    spool = tmp_path / "s.jsonl"

    def app() -> tuple[list[str], float, str]:
        client = SyncTrackingClient(
            source="flask", settings=settings, linger_ms=60_000, spool_path=spool
        )
        client.start()
        ids = [
            client.track_interaction(user_id=f"u{i % 5}", type="chat", service="saju")
            for i in range(30)
        ]
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)
        began = time.monotonic()
        try:
            with pytest.raises(TimeoutError, match="30 undelivered events were spooled") as info:
                client.close(timeout=1.0)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        assert not client._thread.is_alive() and client._loop.is_closed()
        return ids, time.monotonic() - began, str(info.value)

    ids, took, _ = await asyncio.to_thread(app)
    assert took < 15, f"close(timeout=1) took {took:.1f} s"
    assert Spool(spool).count() == 30

    def next_run() -> int:
        with SyncTrackingClient(source="flask", settings=settings, spool_path=spool) as again:
            return again.resent_from_spool

    assert await asyncio.to_thread(next_run) == 30
    records = await read_all(settings, settings.events_topic, expected=30, timeout=60)
    assert {decode(v or b"").event_id for _, _, v in records} == set(ids)


_POOL_CHILD = """
import json, multiprocessing, sys
from usertrail.producers import SyncTrackingClient
from usertrail.settings import Settings

settings = Settings(kafka_bootstrap_servers=sys.argv[1], events_topic=sys.argv[2])
client = SyncTrackingClient(source="worker", settings=settings, linger_ms=60_000)
client.start()

def task(queue):
    # a multiprocessing child ends with os._exit: no atexit hook runs there
    queue.put([client.track_interaction(user_id="child", type="chat", service="saju")
               for _ in range(15)])

if __name__ == "__main__":
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=task, args=(queue,))
    child.start()
    ids = queue.get(timeout=60)
    child.join(timeout=60)
    client.close()
    print(json.dumps({"child": ids, "exitcode": child.exitcode}))
"""


async def test_a_multiprocessing_child_delivers_at_its_exit(
    settings: Settings, tmp_path: Path
) -> None:
    """A child of multiprocessing (fork) tracks and never closes: it ends with
    os._exit, which runs no atexit hook, but its client is closed by the
    thread shutdown multiprocessing runs first, so its events arrive."""
    await create_topics(settings)
    got = await asyncio.to_thread(_script, _POOL_CHILD, settings, tmp_path)
    assert isinstance(got, dict) and got["exitcode"] == 0
    records = await read_all(settings, settings.events_topic, expected=15)
    assert {decode(v or b"").event_id for _, _, v in records} == set(got["child"])
