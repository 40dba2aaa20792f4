"""The HTTP collector (``usertrail collector``) as a process of its own,
against real brokers and PostgreSQL: events in over HTTP become rows, the
key decides the source, every refusal is the documented status in JSON,
nothing accepted is lost through a frozen broker and a stop, and requests
generated from its OpenAPI description never get a 5xx."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from usertrail.collector.app import Collector, admit, build_app
from usertrail.collector.keys import KeyRing, split
from usertrail.collector.openapi import document
from usertrail.producers import decode
from usertrail.producers.ids import uuid7

from tests.conftest import Broker, kafka_cluster, read_all, unique
from tests.sink.conftest import query
from tests.workers import count_rows, sink_process, wait_for
from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.errors import EventValidationError
from usertrail.settings import Settings
from usertrail.topics import ensure_topics


def _env(settings: Settings, database_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "DATABASE_URL": database_url,
        "USERTRAIL_EVENTS_TOPIC": settings.events_topic,
        "USERTRAIL_PROFILES_TOPIC": settings.profiles_topic,
        "USERTRAIL_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "USERTRAIL_DATA_DIR": str(settings.data_dir),
        **extra,
    }


def usertrail(
    settings: Settings, database_url: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "usertrail.cli", *args],
        env=_env(settings, database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )


def new_key(settings: Settings, database_url: str, source: str) -> dict[str, Any]:
    done = usertrail(settings, database_url, "keys", "create", "--source", source, "--json")
    assert done.returncode == 0, done.stderr
    made: dict[str, Any] = json.loads(done.stdout)
    return made


class CollectorProcess:
    def __init__(
        self, settings: Settings, database_url: str, log: Path, *args: str, **env: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "usertrail.cli",
                    "collector",
                    "--port",
                    str(self.port),
                    *args,
                ],
                env=_env(settings, database_url, **env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture
def collector_factory(
    tmp_path: Path,
) -> Iterator[Callable[..., CollectorProcess]]:
    made: list[CollectorProcess] = []

    def make(settings: Settings, database_url: str, *args: str, **env: str) -> CollectorProcess:
        c = CollectorProcess(
            settings, database_url, tmp_path / f"collector{len(made)}.log", *args, **env
        )
        made.append(c)
        return c

    yield make
    for c in made:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


def interaction(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "interaction",
        "userId": f"web-user-{i % 7}",
        "type": ["reading", "chat", "feedback"][i % 3],
        "service": ["saju", "tarot"][i % 2],
        "rating": 1 + i % 5,
        **extra,
    }


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    key: str | None,
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    sent = {"Content-Type": content_type, **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{url}/v1/events", data=data, headers=sent) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


# --- pure: what one event of a request becomes ---------------------------------------


def test_admit_fills_in_and_takes_the_source_from_the_key() -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    event = admit(interaction(1, source="someone-else"), "web-app", now)
    assert event.source == "web-app"
    assert event.occurred_at == now
    given = uuid7()
    assert admit(interaction(2, eventId=given), "web-app", now).event_id == given
    with pytest.raises(EventValidationError) as bad:
        admit({"kind": "interaction", "userId": "u", "type": "dance", "service": "saju"}, "a", now)
    assert bad.value.fields == ["type"]
    with pytest.raises(EventValidationError):
        admit([1, 2], "a", now)
    with pytest.raises(EventValidationError) as late:
        admit(interaction(3, occurredAt="2000-01-01T00:00:00Z"), "a", now)
    assert "occurredAt" in str(late.value)


def test_openapi_document_names_every_kind_and_the_limits() -> None:
    spec = document(max_events=7, max_body_bytes=2048)
    batch = spec["components"]["schemas"]["EventBatch"]
    assert batch["maxItems"] == 7
    names = {ref["$ref"].rsplit("/", 1)[1] for ref in batch["items"]["oneOf"]}
    assert names == {"Interaction", "PreferencesUpdated", "OnboardingCompleted", "UserErased"}
    interaction_schema = spec["components"]["schemas"]["Interaction"]
    assert "source" not in interaction_schema["required"]
    assert "eventId" not in interaction_schema["required"]
    assert "#/$defs/" not in json.dumps(spec)


# --- against real brokers -----------------------------------------------------------


async def test_every_accepted_event_becomes_a_row(
    broker: Broker,
    settings_factory: Callable[..., Settings],
    database_url: str,
    collector_factory: Callable[..., CollectorProcess],
    tmp_path: Path,
) -> None:
    settings = settings_factory(broker)
    await ensure_topics(settings)
    key = new_key(settings, database_url, "web-app")
    collector = collector_factory(settings, database_url)
    batches = [[interaction(b * 40 + i) for i in range(40)] for b in range(5)]
    batches[0][3] = {"kind": "interaction", "userId": "u", "type": "dance", "service": "saju"}
    batches[1][0] = {"kind": "nope"}
    batches[2][5] = "not an object"
    batches[3][1] = interaction(999, source="spoofed")  # accepted: the key decides
    batches[4][7] = {  # a kind of its own table: "UserPreferences"
        "kind": "preferences.updated",
        "userId": "web-prefs",
        "preferredLanguage": "ko",
        "preferredThemes": ["love", "career"],
    }
    accepted: list[str] = []
    async with aiohttp.ClientSession() as session:
        for batch in batches:
            status, _, body = await post(session, collector.url, batch, key["key"])
            assert status == 202, body
            assert body["accepted"] + body["rejected"] == len(batch)
            assert len(body["results"]) == len(batch)
            accepted += [r["eventId"] for r in body["results"] if r["status"] == "accepted"]
        assert body["results"][1]["status"] == "accepted"
        prefs_id = body["results"][7]["eventId"]  # the last batch's preferences event
        status, _, body = await post(session, collector.url, batches[0][:5], key["key"])
        verdict = body["results"][3]
        assert verdict["status"] == "rejected" and verdict["errors"][0]["field"] == "type"
        accepted += [r["eventId"] for r in body["results"] if r["status"] == "accepted"]
    assert len(accepted) == 200 - 3 + 4
    assert collector.stop() == 0
    records = await read_all(settings, settings.events_topic, expected=len(accepted))
    sent = [decode(v or b"") for _, _, v in records]
    assert sorted(e.event_id for e in sent) == sorted(accepted)
    assert {e.source for e in sent} == {"web-app"}

    sink = sink_process(settings, database_url, tmp_path / "sink.log", unique("sink"))
    try:
        await wait_for(lambda: count_rows(database_url) >= len(accepted) - 1, 60, "the rows")
        await wait_for(
            lambda: bool(query(database_url, 'SELECT 1 FROM "UserPreferences"')), 60, "prefs"
        )
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=30)
    rows = {r[0] for r in query(database_url, 'SELECT id FROM "UserInteraction"')}
    prefs = query(
        database_url,
        'SELECT "userId", "preferredLanguage", "preferredThemes" FROM "UserPreferences"',
    )
    assert prefs == [("web-prefs", "ko", ["love", "career"])]
    assert rows == set(accepted) - {prefs_id}


async def test_every_refusal_is_json_with_its_status(
    broker: Broker,
    settings_factory: Callable[..., Settings],
    database_url: str,
    collector_factory: Callable[..., CollectorProcess],
) -> None:
    settings = settings_factory(broker)
    await ensure_topics(settings)
    key = new_key(settings, database_url, "web-app")["key"]
    revoked = new_key(settings, database_url, "old-app")
    collector = collector_factory(
        settings,
        database_url,
        "--max-body-bytes",
        "4096",
        "--max-events",
        "10",
        "--cors-origin",
        "https://app.example.com",
    )
    url = collector.url
    async with aiohttp.ClientSession() as session:
        # no key, a made-up key, a key of the right shape but the wrong secret
        for given in (None, "nonsense", revoked["key"][:-4] + "AAAA"):
            status, headers, body = await post(session, url, [interaction(1)], given)
            assert status == 401 and body["error"]["code"] == "unauthorized"
            assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = await post(session, url, [interaction(1)], revoked["key"])
        assert status == 202
        done = usertrail(settings, database_url, "keys", "revoke", revoked["id"])
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 15
        while status != 401:
            assert time.monotonic() < deadline, "a revoked key still works after 15 s"
            await asyncio.sleep(0.5)
            status, _, _ = await post(session, url, [interaction(1)], revoked["key"])
        # limits
        status, _, body = await post(session, url, [interaction(i) for i in range(11)], key)
        assert status == 413 and body["error"]["code"] == "too_many_events"
        big = [interaction(1, metadata={"pad": "x" * 5000})]
        status, _, body = await post(session, url, big, key)
        assert status == 413 and body["error"]["code"] == "body_too_large"
        # the body itself
        status, _, body = await post(session, url, b"{not json", key)
        assert status == 400 and body["error"]["code"] == "invalid_json"
        status, _, body = await post(session, url, {"kind": "interaction"}, key)
        assert status == 400 and body["error"]["code"] == "not_an_array"
        status, _, body = await post(session, url, b"[NaN]", key)
        assert status == 400
        status, _, body = await post(session, url, b"<xml/>", key, content_type="text/xml")
        assert status == 415 and "error" in body
        # unknown path and method: JSON too
        async with session.get(f"{url}/v1/nothing") as r:
            assert r.status == 404 and "error" in await r.json()
        async with session.get(f"{url}/v1/events") as r:
            assert r.status == 405 and "error" in await r.json()
        # CORS: the configured origin only
        origin = {"Origin": "https://app.example.com"}
        async with session.options(
            f"{url}/v1/events",
            headers={**origin, "Access-Control-Request-Method": "POST"},
        ) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
            assert "authorization" in r.headers["Access-Control-Allow-Headers"]
        async with session.options(
            f"{url}/v1/events", headers={"Origin": "https://evil.example.com"}
        ) as r:
            assert r.status == 403
            assert "Access-Control-Allow-Origin" not in r.headers
        status, headers, body = await post(session, url, [interaction(2)], key, headers=origin)
        assert status == 202
        assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        # navigator.sendBeacon: text/plain, the key in the query
        async with session.post(
            f"{url}/v1/events?key={key}",
            data=json.dumps([interaction(3)]),
            headers={"Content-Type": "text/plain;charset=UTF-8", **origin},
        ) as r:
            assert r.status == 202
            assert (await r.json())["accepted"] == 1
    assert collector.stop() == 0


@pytest.fixture(params=["tansu", "kafka"])
def freezable(
    request: pytest.FixtureRequest,
    broker_factory: Callable[..., EmbeddedBroker],
    tmp_path: Path,
) -> Iterator[tuple[Broker, Callable[[], None], Callable[[], None]]]:
    """A broker of the test's own (frozen, it would stall every other test
    on a shared one), with what freezes and thaws it (SIGSTOP, SIGCONT)."""
    if request.param == "tansu":
        tansu = broker_factory()
        assert tansu.pid is not None
        pid = tansu.pid
        yield tansu, lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT)
        return
    cluster = kafka_cluster(tmp_path / "kafka", brokers=1)
    cluster.start()
    try:
        node = cluster.nodes[0]
        yield cluster, node.pause, node.resume
    finally:
        cluster.kill()


@pytest.mark.xdist_group("heavy-b")
async def test_frozen_broker_means_429_then_a_stop_delivers_everything(
    freezable: tuple[Broker, Callable[[], None], Callable[[], None]],
    settings_factory: Callable[..., Settings],
    database_url: str,
    collector_factory: Callable[..., CollectorProcess],
) -> None:
    """A broker that stops answering fills the source's buffer: the next
    request is 429 with Retry-After, nothing waits. Once the broker is back,
    SIGTERM delivers everything the collector accepted."""
    broker, freeze, thaw = freezable
    settings = settings_factory(broker)
    await ensure_topics(settings)
    key = new_key(settings, database_url, "web-app")["key"]
    collector = collector_factory(
        settings,
        database_url,
        "--max-events",
        "50",
        USERTRAIL_COLLECTOR_BUFFER_EVENTS="100",
    )
    accepted: list[str] = []
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, collector.url, [interaction(0)], key)
        assert status == 202  # the source's client is up
        accepted += [r["eventId"] for r in body["results"]]
        await asyncio.sleep(1)
        freeze()
        try:
            refused = None
            for b in range(10):
                batch = [interaction(b * 50 + i) for i in range(50)]
                t = time.monotonic()
                status, headers, body = await post(session, collector.url, batch, key)
                assert time.monotonic() - t < 2, "a request waited for the frozen broker"
                if status == 429:
                    refused = headers
                    break
                assert status == 202, body
                accepted += [r["eventId"] for r in body["results"]]
            assert refused is not None, "the buffer of 100 took 500 events"
            assert int(refused["Retry-After"]) >= 1
            assert body["error"]["code"] == "buffer_full"
        finally:
            thaw()
    assert collector.stop() == 0
    records = await read_all(settings, settings.events_topic, expected=len(accepted))
    assert {decode(v or b"").event_id for _, _, v in records} == set(accepted)


async def test_a_source_whose_client_cannot_start_is_503_until_it_can(
    broker_factory: Callable[..., EmbeddedBroker],
    settings_factory: Callable[..., Settings],
    database_url: str,
    collector_factory: Callable[..., CollectorProcess],
) -> None:
    """A source's client that fails to start (its spool cannot be read: a
    directory where the file should be) is a JSON 503 with Retry-After, not
    a 500, and not for ever: once the spool is readable the next request
    starts the client and is accepted, and its events reach the topic."""
    settings = settings_factory(broker_factory())
    await ensure_topics(settings)
    key = new_key(settings, database_url, "web-app")["key"]
    spool = settings.data_dir / "spool" / "web-app.jsonl"
    spool.mkdir(parents=True)
    collector = collector_factory(settings, database_url, USERTRAIL_SPOOL_DIR=str(spool.parent))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # not cached: each request tries again
            status, headers, body = await post(session, collector.url, [interaction(0)], key)
            assert status == 503, body
            assert body["error"]["code"] == "unavailable" and int(headers["Retry-After"]) >= 1
        spool.rmdir()
        status, _, body = await post(
            session, collector.url, [interaction(i) for i in range(5)], key
        )
        assert status == 202, body
    accepted = [r["eventId"] for r in body["results"]]
    assert collector.stop() == 0
    assert "did not start" in collector.log.read_text()
    records = await read_all(settings, settings.events_topic, expected=5)
    assert {decode(v or b"").event_id for _, _, v in records} == set(accepted)


async def test_a_stop_finishes_the_request_in_flight_and_delivers_it(
    broker: Broker,
    settings_factory: Callable[..., Settings],
    database_url: str,
    collector_factory: Callable[..., CollectorProcess],
) -> None:
    """SIGTERM while a batch of the largest size is on its way: the collector
    stops listening at once (a new connection is refused), answers 503 on
    the keep-alive connections it has (``/health`` too), finishes the
    request in flight (202, every event accepted) and delivers everything
    it accepted before it exits. The request is known to be in its handler
    when the signal goes: it asked for ``100 Continue``, which aiohttp sends
    right before the handler runs (and the handler looks at ``stopping``
    before it waits for the body), and its body is sent only once the
    collector says it is stopping."""
    settings = settings_factory(broker)
    await ensure_topics(settings)
    key = new_key(settings, database_url, "web-app")["key"]
    collector = collector_factory(settings, database_url)
    pad = "x" * 500
    batch = json.dumps([interaction(i, metadata={"pad": pad}) for i in range(1000)]).encode()
    assert 512 * 1024 < len(batch) < 1024 * 1024  # under --max-body-bytes' 1 MiB
    # one connection, kept alive: the same one before and during the stop
    kept = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
    try:
        status, _, body = await post(kept, collector.url, [interaction(0)], key)
        assert status == 202  # the source's client is up
        accepted = [r["eventId"] for r in body["results"]]
        writer.write(
            f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{collector.port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(batch)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        await writer.drain()
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        collector.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: "stopping:" in collector.log.read_text(), 30, "the stop to begin")
        assert "finishing the requests in progress (1)" in collector.log.read_text()
        # a new connection is refused; a kept-alive one gets 503 "stopping"
        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(aiohttp.ClientConnectorError):
                await post(fresh, collector.url, [interaction(1)], key)
        status, headers, refused = await post(kept, collector.url, [interaction(1)], key)
        assert (status, refused["error"]["code"]) == (503, "stopping"), refused
        assert int(headers["Retry-After"]) >= 1
        async with kept.get(f"{collector.url}/health") as r:
            health = await r.json()
            assert (r.status, health["status"]) == (503, "stopping"), health
        assert collector.proc.poll() is None, "it exited with a request in flight"
        for start in range(0, len(batch), 64 * 1024):  # the body, at last
            writer.write(batch[start : start + 64 * 1024])
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 202 "), head
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        assert length is not None, head
        answer = json.loads(await reader.readexactly(int(length.group(1))))
    finally:
        writer.close()
        await kept.close()
    assert answer["accepted"] == 1000 and answer["rejected"] == 0, answer
    accepted += [r["eventId"] for r in answer["results"]]
    assert collector.proc.wait(timeout=60) == 0, collector.log.read_text()
    log = collector.log.read_text()
    assert "Traceback" not in log and "cut off" not in log, log
    assert "collector stopped: 1001 accepted, 0 rejected" in log, log
    records = await read_all(settings, settings.events_topic, expected=len(accepted))
    assert {decode(v or b"").event_id for _, _, v in records} == set(accepted)


async def test_while_stopping_health_and_new_requests_are_503() -> None:
    """What a request that reaches the collector once it is stopping gets
    (between the signal and the listening socket's close, or on a connection
    it already had): 503 with Retry-After, and /health 503 ``stopping`` for
    a load balancer. In-process: nothing here reaches a key or a broker."""
    collector = Collector(settings=Settings(), keys=KeyRing("postgresql://nowhere/unused"))
    async with TestClient(TestServer(build_app(collector))) as client:
        r = await client.get("/health")
        assert r.status == 200 and (await r.json())["status"] == "serving"
        collector.stopping = True
        r = await client.get("/health")
        assert r.status == 503
        assert (await r.json())["status"] == "stopping"
        r = await client.post("/v1/events", json=[interaction(1)])
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["code"] == "stopping"
    assert collector.clients == {} and collector.accepted == 0


def test_generated_requests_never_get_a_server_error(
    broker: Broker,
    settings_factory: Callable[..., Settings],
    database_url: str,
    collector_factory: Callable[..., CollectorProcess],
) -> None:
    """schemathesis sends what the OpenAPI description allows, and what it
    does not (its coverage phase), with a valid key: never a 5xx."""
    settings = settings_factory(broker)
    asyncio.run(ensure_topics(settings))
    key = new_key(settings, database_url, "fuzz")["key"]
    collector = collector_factory(settings, database_url, "--max-events", "20")
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{collector.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {key}",
            "--max-examples",
            "40",
            "--workers",
            "1",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=collector.log.parent,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    tested = re.search(r"Tested: (\d+)", done.stdout)
    cases = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert tested and tested.group(1) == "2", done.stdout[-2000:]  # both operations
    assert cases and int(cases.group(1)) >= 100 and cases.group(1) == cases.group(2)
    with urllib.request.urlopen(f"{collector.url}/health", timeout=5) as r:
        health = json.load(r)
    # its valid batches got through, its invalid events got verdicts
    assert health["accepted"] > 0 and health["rejected"] > 0, health
    assert collector.stop() == 0
    assert "Traceback" not in collector.log.read_text()


def test_keys_command(
    settings_factory: Callable[..., Settings], database_url: str, kafka1: Broker
) -> None:
    settings = settings_factory(kafka1)
    made = new_key(settings, database_url, "ios-app")
    assert made["key"].startswith(f"ut_{made['id']}_")
    listed = usertrail(settings, database_url, "keys", "list", "--json")
    assert [k["id"] for k in json.loads(listed.stdout)] == [made["id"]]
    stored = query(database_url, "SELECT secret_sha256 FROM usertrail_api_keys")[0][0]
    parts = split(made["key"])  # the secret may hold "_" itself (token_urlsafe)
    assert parts is not None and parts[0] == made["id"]
    assert made["key"] not in stored and parts[1] not in stored
    done = usertrail(settings, database_url, "keys", "revoke", "nosuchkey")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no API key 'nosuchkey'" in done.stderr
    done = usertrail(settings, database_url, "keys", "create", "--source", "bad\x01")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    text = usertrail(settings, database_url, "keys", "list")
    assert "ios-app" in text.stdout and made["key"] not in text.stdout
