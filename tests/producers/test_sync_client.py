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
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from usertrail.producers import SyncTrackingClient, decode

from tests.conftest import create_topics, read_all
from usertrail.errors import BufferFullError
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


async def test_a_forked_child_has_a_client_of_its_own(settings: Settings, tmp_path: Path) -> None:
    await create_topics(settings)
    got = await asyncio.to_thread(_script, _FORKED, settings, tmp_path)
    assert isinstance(got, dict) and got["status"] == 0
    records = await read_all(settings, settings.events_topic, expected=20)
    counts = collections.Counter(decode(v or b"").event_id for _, _, v in records)
    assert set(counts) == set(got["parent"]) | set(got["child"])
    assert all(n == 1 for n in counts.values()), "the parent's buffer was sent twice"
