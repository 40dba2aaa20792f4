"""Stream workers and sinks as processes, and what the tests ask of them."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from usertrail.producers import TrackingClient, decode
from usertrail.producers.events import EventBase
from usertrail.stream.fold import Profile, fold_all
from usertrail.stream.segments import load_rules, segment
from usertrail.stream.state import is_user_key, load_state

from tests.sink.conftest import query
from usertrail.kafka import high_waters, partitions_of, stop_within
from usertrail.settings import Settings

RULES = load_rules()


def stream_process(
    settings: Settings, web_port: int, log: Path, **extra_env: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "USERTRAIL_EVENTS_TOPIC": settings.events_topic,
        "USERTRAIL_PROFILES_TOPIC": settings.profiles_topic,
        "USERTRAIL_EVENTS_PARTITIONS": str(settings.events_partitions),
        "USERTRAIL_STREAM_APP_ID": settings.stream_app_id,
        "USERTRAIL_STREAM_WEB_PORT": str(web_port),
        "USERTRAIL_DATA_DIR": str(log.parent),
        **extra_env,
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "usertrail.cli",
                "stream",
                "--log-level",
                extra_env.get(
                    "USERTRAIL_LOG_LEVEL", os.environ.get("USERTRAIL_TEST_LOG_LEVEL", "WARNING")
                ),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def cli(settings: Settings, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "USERTRAIL_EVENTS_TOPIC": settings.events_topic,
        "USERTRAIL_PROFILES_TOPIC": settings.profiles_topic,
        "USERTRAIL_EVENTS_PARTITIONS": str(settings.events_partitions),
        "USERTRAIL_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "USERTRAIL_STREAM_APP_ID": settings.stream_app_id,
        "USERTRAIL_DATA_DIR": str(data_dir),
    }
    return subprocess.run(
        [sys.executable, "-m", "usertrail.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


async def events_by_user(
    settings: Settings, expected: int
) -> dict[str, list[tuple[EventBase, int]]]:
    consumer = AIOKafkaConsumer(
        settings.events_topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    out: dict[str, list[tuple[EventBase, int]]] = defaultdict(list)
    count = 0
    try:
        while count < expected:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    event = decode(r.value or b"")
                    out[event.user_id].append((event, r.offset))
                    count += 1
    finally:
        await stop_within(consumer, 10)
    return out


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except ValueError:
            return exc.code, {"body": body.decode(errors="replace")}


async def wait_for_profile(
    web_port: int,
    user: str,
    offset: int | None = None,
    host: str = "127.0.0.1",
    *,
    interactions: int | None = None,
) -> dict[str, Any]:
    """The user's profile once it was folded up to ``offset`` of the user's
    home partition, or holds ``interactions`` interactions (when a producer
    put them on other partitions, whose offsets say nothing of the copies)."""
    url = f"http://{host}:{web_port}/profiles/{urllib.parse.quote(user, safe='')}"
    for _ in range(600):
        try:
            status, body = await asyncio.to_thread(get, url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            status, body = 0, {}
        if (
            status == 200
            and (offset is None or body.get("sourceOffset") == offset)
            and (
                interactions is None
                or sum(body["profile"]["countsByType"].values()) == interactions
            )
        ):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"worker never reached offset {offset} / {interactions} interactions of {user}: "
        f"{status} {body}"
    )


def expected_view(events: list[tuple[EventBase, int]]) -> dict[str, Any]:
    profile = fold_all(events[0][0].user_id, list(events), config=RULES.affinity_config())
    seg = segment(profile, RULES)
    return {
        "counts": profile.counts_by_type,
        "services": profile.counts_by_service,
        "favourites": profile.favourite_themes(),
        "primary": seg.primary_segment,
        "segments": [(a.segment, round(a.score, 6), a.reasons) for a in seg.assignments],
        # exactly as the worker publishes it (rounding twice, to 9 places
        # and then 6, can differ from rounding once in the last place)
        "vector": {k: round(v, 9) for k, v in profile.affinity.items()},
    }


def worker_view(body: dict[str, Any]) -> dict[str, Any]:
    p = body["profile"]
    return {
        "counts": p["countsByType"],
        "services": p["countsByService"],
        "favourites": p["favouriteThemes"],
        "primary": body["primarySegment"],
        "segments": [(a["segment"], a["score"], a["reasons"]) for a in body["segments"]],
        "vector": body["vector"],
    }


async def changelog_ends(settings: Settings) -> dict[TopicPartition, int]:
    """Each partition's end offset in the table's changelog (on tansu, the
    first offset of its last batch + 1: it grows with every write all the
    same)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        tps = await partitions_of(consumer, settings.changelog_topic)
        return dict(await consumer.end_offsets(tps))
    finally:
        await stop_within(consumer, 10)


async def changelog_written(settings: Settings) -> int:
    """Records in the table's changelog so far (on tansu, fewer: see
    ``changelog_ends``), which grows with every write."""
    return sum((await changelog_ends(settings)).values())


async def changelog_states(settings: Settings) -> dict[str, Profile]:
    """The last state of every user in the table's changelog: what a worker
    starting now would recover."""
    topic = settings.changelog_topic
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    states: dict[str, Profile] = {}
    try:
        partitions = consumer.assignment()
        while not partitions:
            await asyncio.sleep(0.1)
            partitions = consumer.assignment()
        while True:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for r in records:
                    if not is_user_key(r.key):  # type: ignore[arg-type]
                        continue  # a partition's applied offset, its log's id, a chunk of ids
                    state = load_state(r.value)
                    if state is not None:
                        states[r.key.decode()] = state.profile  # type: ignore[union-attr]
                    else:  # a tombstone: the user is gone
                        states.pop(r.key.decode(), None)  # type: ignore[union-attr]
            # read to the high-water mark fetches carry (docs/brokers.md)
            behind = 0
            for tp in partitions:
                high = consumer.highwater(tp)
                if high is None or await consumer.position(tp) < high:
                    behind += 1
            if not behind:
                return states
    finally:
        await stop_within(consumer, 10)


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


async def owners(
    web_port: int, topic: str, timeout: float = 90.0, host: str = "127.0.0.1"
) -> dict[str, list[int]]:
    """The changelog partitions each worker owns, as faust's router tells
    (GET /router/), once the assignment covers every partition."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: Any = None
    while loop.time() < deadline:
        try:
            status, body = await asyncio.to_thread(get, f"http://{host}:{web_port}/router/")
        except OSError:
            status, body = 0, {}
        if status == 200:
            seen = {url: sorted(topics.get(topic, [])) for url, topics in body.items()}
            seen = {url: parts for url, parts in seen.items() if parts}
            if seen:
                return seen
        await asyncio.sleep(0.5)
    raise AssertionError(f"no assignment from worker on {web_port}: {seen}")


async def wait_for_split(
    web_port: int, topic: str, workers: int, partitions: int, host: str = "127.0.0.1"
) -> dict[str, list[int]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while True:
        split = await owners(web_port, topic, host=host)
        every = sorted(p for parts in split.values() for p in parts)
        if len(split) == workers and every == list(range(partitions)):
            return split
        if loop.time() > deadline:
            raise AssertionError(f"partitions never split over {workers} workers: {split}")
        await asyncio.sleep(0.5)


CONFIG = RULES.affinity_config()


def want(by_user: dict[str, list[tuple[EventBase, int]]]) -> dict[str, Profile]:
    return {u: fold_all(u, events, config=CONFIG) for u, events in by_user.items()}


async def caught_up(settings: Settings, expected: dict[str, Profile]) -> dict[str, Profile]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while True:
        states = await changelog_states(settings)
        if all(states.get(u) == p for u, p in expected.items()) or loop.time() > deadline:
            return states
        await asyncio.sleep(1)


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_events(n: int, resend_every: int = 25, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` SDK calls; every ``resend_every``-th repeats an earlier event
    (same id, same content), as an app retrying would."""
    rng = random.Random(seed)
    calls: list[dict[str, Any]] = []
    for i in range(n):
        if i and i % resend_every == 0:
            calls.append(dict(rng.choice(calls)))
            continue
        calls.append(
            {
                "user_id": f"user-{rng.randrange(500)}",
                "type": rng.choice(["reading", "chat", "feedback", "share"]),
                "service": rng.choice(["saju", "tarot", "astrology"]),
                "theme": rng.choice([None, "love", "career", "health"]),
                "rating": rng.choice([None, 1, 2, 3, 4, 5]),
                "metadata": {"n": i},
                "occurred_at": T0 + timedelta(seconds=i),
            }
        )
    return calls


async def produce(
    settings: Settings,
    calls: list[dict[str, Any]],
    rate: float,
    enough: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Send ``calls`` at about ``rate`` per second (until ``enough`` is set,
    if given); returns event id -> fields."""
    sent: dict[str, Any] = {}
    ids: dict[int, str] = {}
    async with TrackingClient(source="faults", settings=settings) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, call in enumerate(calls):
            if enough is not None and enough.is_set():
                break
            fields = {k: v for k, v in call.items() if k != "event_id"}
            key = id(call)
            if key in ids:  # a resend: same event id
                fields["event_id"] = ids[key]
            event_id = await client.track_interaction(**fields)
            ids.setdefault(key, event_id)
            sent[event_id] = fields
            if i % 500 == 0:
                await client.flush()
                ahead = i / rate - (loop.time() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    return sent


def resolve_resends(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # make_events copies the dict for a resend; mark copies so produce() reuses the id
    first: dict[tuple[Any, ...], dict[str, Any]] = {}
    out = []
    for call in calls:
        sig = tuple(sorted((k, repr(v)) for k, v in call.items()))
        out.append(first.setdefault(sig, call))
    return out


def assert_rows_equal_events(url: str, sent: dict[str, Any]) -> None:
    rows = query(
        url,
        'SELECT id, "userId", "createdAt", type, service, theme, rating, metadata '
        'FROM "UserInteraction"',
    )
    assert len(rows) == len(sent), f"{len(rows)} rows for {len(sent)} distinct events"
    for event_id, user, created, type_, service, theme, rating, metadata in rows:
        f = sent[event_id]
        assert (user, type_, service, theme, rating, metadata) == (
            f["user_id"],
            f["type"],
            f["service"],
            f["theme"],
            f["rating"],
            f["metadata"],
        )
        assert created == f["occurred_at"].replace(tzinfo=None)


def sink_process(
    settings: Settings,
    url: str,
    log: Path,
    group: str,
    *,
    prelude: str | None = None,
    **env_extra: str,
) -> subprocess.Popen[bytes]:
    """A sink process in ``group``: a group of the test's own, so members it
    kills cannot hold up the groups of later tests on the same broker.
    ``prelude``: Python run in the process before the sink starts."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "DATABASE_URL": url,
        "USERTRAIL_EVENTS_TOPIC": settings.events_topic,
        "USERTRAIL_PROFILES_TOPIC": settings.profiles_topic,
        "USERTRAIL_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "USERTRAIL_DATA_DIR": str(settings.data_dir),
        "USERTRAIL_GROUP_SESSION_TIMEOUT_MS": "2000",
        "USERTRAIL_GROUP_HEARTBEAT_INTERVAL_MS": "200",
        **env_extra,
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                *(
                    ["-m", "usertrail.cli"]
                    if prelude is None
                    else [
                        "-c",
                        f"{prelude}\nfrom usertrail.cli import main\nraise SystemExit(main())",
                    ]
                ),
                "sink",
                "--batch-max",
                "2000",
                "--group",
                group,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def count_rows(url: str) -> int:
    try:
        return int(query(url, 'SELECT count(*) FROM "UserInteraction"')[0][0])
    except psycopg.OperationalError:
        return -1


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def profile_message(user: str, at: datetime, primary: str, vector: float) -> bytes:
    from usertrail.producers.profiles import ProfileMessage, SegmentAssignment, encode_profile

    return encode_profile(
        ProfileMessage(
            user_id=user,
            updated_at=at,
            vector={"theme:love": vector},
            segments=[SegmentAssignment(segment=primary, score=0.8, reasons=["8 of 10 readings"])],
            primary_segment=primary,
            segment_confidence=0.5,
            last_segment_update=at,
        )
    )


# --- three brokers under faults ----------------------------------------------------------
class Traffic:
    """The SDK sending at a steady rate until stopped: what it sent, what the
    broker acknowledged, and what the SDK spooled instead (a send whose
    acknowledgement a fault kept away: it may have reached the log all the
    same, and the spool's re-send, from another producer session, is then a
    second copy in the topic, which the sink and the stream count once)."""

    def __init__(self, settings: Settings, rate: float) -> None:
        self.settings, self.rate = settings, rate
        self.sent: dict[str, dict[str, Any]] = {}
        self.acked: set[str] = set()
        self.spooled: set[str] = set()
        self.stopped = asyncio.Event()

    def _delivered(self, event_id: str, error: BaseException | None) -> None:
        if error is None:
            self.acked.add(event_id)
        else:
            self.spooled.add(event_id)

    async def run(self) -> None:
        services, types = ["saju", "tarot", "astrology"], ["reading", "chat", "feedback"]
        async with TrackingClient(
            source="cluster", settings=self.settings, on_delivery=self._delivered
        ) as client:
            loop = asyncio.get_running_loop()
            start, i = loop.time(), 0
            while not self.stopped.is_set():
                fields = {
                    "user_id": f"user-{i % 300}",
                    "type": types[i % 3],
                    "service": services[(i // 3) % 3],
                    "rating": 1 + i % 5,
                }
                self.sent[await client.track_interaction(**fields)] = fields
                i += 1
                ahead = i / self.rate - (loop.time() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)


class Supervisor:
    """Restarts a worker process that exits on its own, as `usertrail up`
    (or compose's restart policy) would; counts the restarts."""

    def __init__(self) -> None:
        self.procs: dict[
            str, tuple[Callable[[], subprocess.Popen[bytes]], subprocess.Popen[bytes]]
        ] = {}
        self.restarts: collections.Counter[str] = collections.Counter()
        self.stopped: set[str] = set()

    def start(self, name: str, make: Callable[[], subprocess.Popen[bytes]]) -> None:
        self.procs[name] = (make, make())

    def stop(self, name: str) -> None:
        self.stopped.add(name)
        self.procs[name][1].send_signal(signal.SIGTERM)

    async def watch(self) -> None:
        while True:
            for name, (make, proc) in list(self.procs.items()):
                if proc.poll() is not None and name not in self.stopped:
                    self.restarts[name] += 1
                    self.procs[name] = (make, make())
            await asyncio.sleep(0.5)

    def stop_all(self) -> None:
        self.stopped.update(self.procs)
        for _, proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill(proc)


async def sink_at_the_end(settings: Settings, url: str, group: str) -> bool:
    """Whether the sink's stored positions are at the high-water marks of the
    events and profiles topics."""
    consumer = AIOKafkaConsumer(**settings.kafka_options(), group_id=None)
    await consumer.start()
    try:
        ends = {}
        for topic in (settings.events_topic, settings.profiles_topic):
            tps = await partitions_of(consumer, topic)
            consumer.assign(tps)
            for p, end in (await high_waters(consumer, tps)).items():
                ends[(topic, p)] = end
    finally:
        await consumer.stop()
    stored = {
        (t, p): o
        for t, p, o in query(
            url,
            "SELECT topic, partition, next_offset FROM usertrail_positions WHERE consumer = %s",
            (group,),
        )
    }
    return all(stored.get(k, 0) >= end for k, end in ends.items())


async def written_through(
    supervisor: Supervisor, settings: Settings, url: str, group: str, timeout: float = 60
) -> None:
    """Stops the stream workers (no profile is published after) and waits
    until the sinks of ``group`` have written both topics to their ends:
    ``verify`` compares ``user_vectors`` with every profile in the log, and a
    stream's table can be up to date before the sink has its last profiles."""
    streams = [name for name in supervisor.procs if name.startswith("stream")]
    for name in streams:
        supervisor.stop(name)
    for name in streams:
        await asyncio.to_thread(supervisor.procs[name][1].wait, 60)
    deadline = asyncio.get_running_loop().time() + timeout
    while not await sink_at_the_end(settings, url, group):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the sinks were not at both topics' ends {timeout:.0f} s on")
        await asyncio.sleep(0.2)
