"""The worker under SIGKILL: killed at random moments and restarted, it still
ends with every profile equal to the pure fold, no event lost or counted
twice (docs/architecture.md, rule 2)."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from usertrail.producers import TrackingClient, demo
from usertrail.stream.fold import fold_all

from tests.conftest import create_topics, unique
from tests.workers import (
    RULES,
    changelog_states,
    cli,
    events_by_user,
    kill,
    stream_process,
)
from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.kafka import partitions_of, stop_within
from usertrail.settings import Settings


async def kill_while_folding(
    settings: Settings, proc: subprocess.Popen[bytes], rng: random.Random
) -> None:
    """SIGKILL at a random moment within 0.05 s of this life's first write
    (start-up and recovery take seconds, more as the changelog grows). The
    first write is looked for every 20 ms: a worker folds 10,000 to 50,000
    events a second, depending on the machine, and the tenth kill must still
    fall before the last of the 50,000 events (with 0.15 s and 0.1 s polls,
    a fast machine's tenth life folded them all)."""
    # one client for the whole wait: a new one per look took tens of ms
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None)
    try:
        await consumer.start()
        tps = await partitions_of(consumer, settings.changelog_topic)
        before = await consumer.end_offsets(tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await consumer.end_offsets(tps) == before and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(rng.uniform(0.0, 0.05))
    finally:
        kill(proc)
        await stop_within(consumer, 10)


BATCH_MAX = "500"
"""Smaller batches than the default 4000: a life's first write, after which
the kill falls, comes early (on Apache Kafka, whose worker writes in larger
batches, lives of 1000 folded every event before the tenth kill)."""


@pytest.mark.xdist_group("heavy-a")
async def test_sigkill_ten_times_loses_and_doubles_nothing(
    settings_factory: Callable[..., Settings], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = settings_factory(broker, stream_app_id=unique("restart"))
    await create_topics(settings)
    async with TrackingClient(source="demo", settings=settings) as client:
        sent = await demo.run(client, demo.plan(users=200, events=50_000, seed=21))
    by_user = await events_by_user(settings, sent)
    want = {
        user: fold_all(user, events, config=RULES.affinity_config())
        for user, events in by_user.items()
    }
    last = {user: max(o for _, o in events) for user, events in by_user.items()}
    log = tmp_path / "stream.log"
    rng = random.Random(5)
    progress = []
    for _ in range(10):
        proc = stream_process(settings, free_port(), log, USERTRAIL_STREAM_BATCH_MAX=BATCH_MAX)
        await kill_while_folding(settings, proc, rng)
        states = await changelog_states(settings)
        progress.append(
            sum(
                sum(1 for _, o in by_user[u] if o <= (p.last_offset or -1))
                for u, p in states.items()
            )
        )
    # the kills fell while the worker was folding, not before or after it
    steps = [b - a for a, b in zip([0, *progress], progress, strict=False)]
    assert sum(1 for s in steps if s > 0) >= 7 and progress[-1] < sent, progress
    proc = stream_process(settings, free_port(), log)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 180
        while True:
            states = await changelog_states(settings)
            done = [u for u in want if u in states and states[u].last_offset == last[u]]
            if len(done) == len(want) or loop.time() > deadline:
                break
            await asyncio.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill(proc)
    assert len(done) == len(want), f"{len(want) - len(done)} users never caught up"

    def missing(user: str) -> list[int]:
        ids = set(want[user].recent_ids) - set(states[user].recent_ids)
        return [o for e, o in by_user[user] if e.event_id in ids]

    wrong = [u for u in want if states[u] != want[u]]
    detail = [(u, states[u].interactions - want[u].interactions, missing(u)) for u in wrong[:10]]
    assert not wrong, f"{len(wrong)} of {len(want)} profiles differ from the fold: {detail}"
    assert "Traceback" not in log.read_text()
    # what the crashes left is what a rebuild from the log gives
    checked = cli(settings, tmp_path, "verify", "--only", "profiles")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    replayed = cli(settings, tmp_path, "replay", "stream")
    assert replayed.returncode == 0, replayed.stderr
    assert await changelog_states(settings) == want
