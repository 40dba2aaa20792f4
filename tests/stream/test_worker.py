"""The faust worker on the real embedded broker equals the pure fold."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from usertrail.producers import TrackingClient, demo

from tests.conftest import create_topics, unique
from tests.workers import (
    events_by_user,
    expected_view,
    get,
    stream_process,
    wait_for_profile,
    worker_view,
)
from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.settings import Settings


async def test_worker_profiles_equal_the_pure_fold(
    settings_factory: Callable[..., Settings], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = settings_factory(broker, stream_app_id=unique("stream"))
    await create_topics(settings)
    web_port = free_port()
    log = tmp_path / "stream.log"
    proc = stream_process(
        settings, web_port, log, USERTRAIL_LOG_FORMAT="json", USERTRAIL_LOG_LEVEL="INFO"
    )
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
        # Prometheus metrics: every record read, nothing left behind
        metrics = await asyncio.to_thread(scrape, f"http://127.0.0.1:{web_port}/metrics")
        records = sum(len(e) for e in by_user.values())
        assert metrics["usertrail_stream_records_read_total"][()] == records
        assert metrics["usertrail_stream_profiles_published_total"][()] >= 25
        assert metrics["usertrail_stream_batch_seconds_count"][()] >= 1
        assert metrics["usertrail_stream_fold_seconds_count"][()] >= 1
        lags = metrics["usertrail_stream_lag"]
        assert len(lags) == settings.events_partitions and set(lags.values()) == {0}, lags
        if settings.stream_store_kind() == "memory":
            assert metrics["usertrail_stream_store_keys"][()] >= 25 + settings.events_partitions
        else:  # RocksDB: its files
            assert metrics["usertrail_stream_store_bytes"][()] > 0
        assert metrics["usertrail_stream_records_left_out_total"][()] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text
    # --log-format json: every line one object a log collector reads
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(d) for d in lines)
    assert any(d["logger"].startswith("usertrail") for d in lines)


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A Prometheus page: sample name -> labels -> value."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_a_worker_whose_group_never_forms_says_so_and_exits_to_be_restarted(
    settings_factory: Callable[..., Settings],
    broker_factory: Callable[..., EmbeddedBroker],
    tmp_path: Path,
) -> None:
    """A broker that takes connections and answers nothing (frozen) while a
    worker starts: no assignment ever comes; after USERTRAIL_STALL_SECONDS
    the worker says why, is unhealthy, and exits with code 6. Started again
    once the broker answers, it serves."""
    own = broker_factory()
    settings = settings_factory(own, stream_app_id=unique("stall"))
    await create_topics(settings)
    assert own.proc is not None
    own.proc.send_signal(signal.SIGSTOP)
    port, log = free_port(), tmp_path / "stream.log"
    # what the broker is and how many nodes it has: not asked of one that answers nothing
    proc = stream_process(
        settings,
        port,
        log,
        USERTRAIL_STALL_SECONDS="5",
        USERTRAIL_BROKER="tansu",
        USERTRAIL_REPLICATION_FACTOR="1",
    )
    try:
        code = await asyncio.to_thread(proc.wait, 90)
    finally:
        own.proc.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    said = log.read_text()
    assert code == 6, said
    assert "the stream worker stalled (no partitions assigned for" in said, said
    assert "Traceback" not in said
    proc = stream_process(settings, port, log)
    try:
        async with TrackingClient(source="demo", settings=settings) as client:
            sent = await demo.run(client, demo.plan(users=5, events=100, seed=2))
        by_user = await events_by_user(settings, sent)
        for user, events in by_user.items():
            body = await wait_for_profile(port, user, max(o for _, o in events))
            assert worker_view(body) == expected_view(events), user
        status, health = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/health")
        assert (status, health) == (200, {"ok": True, "state": "serving"})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
