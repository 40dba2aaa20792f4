"""The faust worker on the real embedded broker equals the pure fold."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from usertrail.producers import TrackingClient, decode, demo
from usertrail.producers.events import EventBase
from usertrail.stream.fold import fold_all
from usertrail.stream.segments import load_rules, segment

from tests.conftest import create_topics, unique
from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.kafka import stop_within
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
                os.environ.get("USERTRAIL_TEST_LOG_LEVEL", "WARNING"),
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


async def wait_for_profile(web_port: int, user: str, offset: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{web_port}/profiles/{user}"
    for _ in range(600):
        try:
            status, body = await asyncio.to_thread(get, url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            status, body = 0, {}
        if status == 200 and body.get("sourceOffset") == offset:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"worker never reached offset {offset} of {user}: {status} {body}")


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


async def test_worker_profiles_equal_the_pure_fold(
    settings_factory: Callable[..., Settings], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = settings_factory(broker, stream_app_id=unique("stream"))
    await create_topics(settings)
    web_port = free_port()
    proc = stream_process(settings, web_port, tmp_path / "stream.log")
    try:
        async with TrackingClient(source="demo", settings=settings) as client:
            sent = await demo.run(client, demo.plan(users=25, events=1500, seed=5))
        by_user = await events_by_user(settings, sent)
        assert len(by_user) == 25
        for user, events in by_user.items():
            body = await wait_for_profile(web_port, user, max(o for _, o in events))
            assert worker_view(body) == expected_view(events), user
        status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{web_port}/profiles/nobody")
        assert status == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (tmp_path / "stream.log").read_text()
