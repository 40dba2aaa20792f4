"""``replay stream`` and ``verify`` against the real broker: a replay gives
the live profiles back, ``verify`` names what differs, ``--from`` folds only
what happened since, and workers carry on after the replayed point."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiokafka import AIOKafkaProducer
from usertrail.producers import TrackingClient, demo
from usertrail.producers.profiles import decode_profile
from usertrail.replay.stream import live_states
from usertrail.stream.fold import fold_all
from usertrail.stream.segments import load_rules, segment
from usertrail.stream.state import dump_state

from tests.conftest import create_topics, read_all, unique
from tests.workers import (
    CONFIG,
    RULES,
    caught_up,
    changelog_states,
    cli,
    events_by_user,
    kill,
    stream_process,
    want,
)
from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.settings import Settings


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill(proc)


async def test_replay_gives_the_live_profiles_back_and_verify_names_differences(
    settings_factory: Callable[..., Settings], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = settings_factory(broker, stream_app_id=unique("replay"))
    await create_topics(settings)
    log = tmp_path / "stream.log"
    proc = stream_process(settings, free_port(), log)
    try:
        async with TrackingClient(source="demo", settings=settings) as client:
            sent = await demo.run(client, demo.plan(users=30, events=3000, seed=4))
        by_user = await events_by_user(settings, sent)
        expected = want(by_user)
        assert await caught_up(settings, expected) == expected
        refused = cli(settings, tmp_path, "replay", "stream")
        assert refused.returncode == 2, refused
        assert "stop them" in refused.stderr
    finally:
        stop(proc)

    checked = cli(settings, tmp_path, "verify", "--only", "profiles")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "30 live, 30 from the log, 0 differ" in checked.stdout

    # a profile altered by hand (one count off) and one removed
    live = await live_states(settings)
    victim, gone = sorted(live.states)[:2]
    state = live.states[victim]
    counts = dict(state.profile.counts_by_type)
    counts["reading"] = counts.get("reading", 0) + 1
    altered = type(state)(
        type(state.profile)(**{**state.profile.__dict__, "counts_by_type": counts}),
        state.segments_changed_at,
        state.segment_key,
    )
    topic = settings.changelog_topic
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, max_batch_size=1)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, dump_state(altered), key=victim, partition=live.partition_of[victim]
        )
        await producer.send_and_wait(topic, None, key=gone, partition=live.partition_of[gone])
    finally:
        await producer.stop()
    checked = cli(settings, tmp_path, "verify", "--only", "profiles")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"{victim.decode()}: differs: counts_by_type" in checked.stdout
    assert f"{gone.decode()}: in the log, missing from the live table" in checked.stdout

    replayed = cli(settings, tmp_path, "replay", "stream")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 3,0" in replayed.stdout and "into 30 profiles" in replayed.stdout
    assert await changelog_states(settings) == expected
    assert cli(settings, tmp_path, "verify", "--only", "profiles").returncode == 0
    # each partition's applied offset is the replayed point: every record, no more
    applied = (await live_states(settings)).applied
    assert sum(offset + 1 for offset in applied.values()) == sent

    # workers started now carry on after the replayed point, counting nothing twice
    proc = stream_process(settings, free_port(), log)
    try:
        async with TrackingClient(source="demo", settings=settings) as client:
            more = await demo.run(client, demo.plan(users=30, events=1000, seed=6))
        by_user = await events_by_user(settings, sent + more)
        expected = want(by_user)
        assert await caught_up(settings, expected) == expected
    finally:
        stop(proc)
    assert "Traceback" not in log.read_text()


async def test_replay_from_a_time_folds_only_what_happened_since(
    settings_factory: Callable[..., Settings], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = settings_factory(broker, stream_app_id=unique("since"))
    await create_topics(settings)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    async with TrackingClient(source="demo", settings=settings) as client:
        for i in range(1200):  # in event-time order, as live apps send
            await client.track_interaction(
                user_id=f"u{i % 40}",
                type="reading",
                service=("saju", "tarot")[i % 2],
                theme=("love", "career", "health")[i % 3],
                rating=1 + i % 5,
                occurred_at=t0 + timedelta(minutes=i),
            )
    by_user = await events_by_user(settings, 1200)
    since = t0 + timedelta(minutes=777, seconds=30)
    replayed = cli(settings, tmp_path, "replay", "stream", "--from", since.isoformat())
    assert replayed.returncode == 0, replayed.stderr
    recent = {
        u: [(e, o) for e, o in events if e.occurred_at >= since] for u, events in by_user.items()
    }
    expected = {u: fold_all(u, ev, config=CONFIG) for u, ev in recent.items() if ev}
    assert 0 < sum(len(ev) for ev in recent.values()) < 1200
    assert await changelog_states(settings) == expected
    # a second replay from the start brings every user back
    assert cli(settings, tmp_path, "replay", "stream").returncode == 0
    assert await changelog_states(settings) == want(by_user)


async def test_a_changed_rule_replayed_moves_exactly_the_users_it_selects(
    settings_factory: Callable[..., Settings], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = settings_factory(broker, stream_app_id=unique("rule"))
    await create_topics(settings)
    async with TrackingClient(source="demo", settings=settings) as client:
        sent = await demo.run(client, demo.plan(users=60, events=3000, seed=12))
    profiles = want(await events_by_user(settings, sent))
    assert cli(settings, tmp_path, "replay", "stream").returncode == 0
    # power users: 20 interactions in 30 days are enough now, instead of 60
    text = (Path(__file__).parents[2] / "stream" / "rules.toml").read_text()
    assert text.count("min_interactions = 60") == 1
    changed = tmp_path / "rules.toml"
    changed.write_text(text.replace("min_interactions = 60", "min_interactions = 20"))
    new_rules = load_rules(changed)
    moved = {
        u
        for u, p in profiles.items()
        if segment(p, RULES).primary_segment != segment(p, new_rules).primary_segment
    }
    assert moved and len(moved) < len(profiles)
    before = await last_primaries(settings, len(profiles))
    replayed = cli(settings, tmp_path, "replay", "stream", "--rules", str(changed))
    assert replayed.returncode == 0, replayed.stderr
    after = await last_primaries(settings, 2 * len(profiles))
    assert {u for u in profiles if before[u] != after[u]} == moved
    assert all(after[u] == segment(p, new_rules).primary_segment for u, p in profiles.items())
    assert (
        cli(settings, tmp_path, "verify", "--only", "profiles", "--rules", str(changed)).returncode
        == 0
    )


async def last_primaries(settings: Settings, expected: int) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for _, key, value in await read_all(settings, settings.profiles_topic, expected):
        assert key is not None and value is not None
        out[key.decode()] = decode_profile(value).primary_segment
    return out


async def test_replay_refuses_to_remove_profiles_a_reset_log_lacks(
    settings_factory: Callable[..., Settings], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The state holds users the log does not (here: the same app on a new,
    empty events topic, as after a reset): `replay stream` names them and
    changes nothing; with --allow-shrink it removes them."""
    settings = settings_factory(broker, stream_app_id=unique("shrink"))
    await create_topics(settings)
    async with TrackingClient(source="demo", settings=settings) as client:
        for i in range(200):
            await client.track_interaction(user_id=f"u{i % 12}", type="chat", service="saju")
    assert cli(settings, tmp_path, "replay", "stream").returncode == 0
    before = await changelog_states(settings)
    assert len(before) == 12
    reset = settings.model_copy(update={"events_topic": f"{settings.events_topic}-new"})
    await create_topics(reset)
    refused = cli(reset, tmp_path, "replay", "stream")
    assert refused.returncode == 2, refused.stderr
    assert "12 would be removed (u0, u1, u10" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert await changelog_states(settings) == before
    done = cli(reset, tmp_path, "replay", "stream", "--allow-shrink")
    assert done.returncode == 0, done.stderr
    assert await changelog_states(settings) == {}
