"""`usertrail demo` and `usertrail schema`."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from usertrail.producers import decode
from usertrail.producers.demo import plan
from usertrail.producers.events import Interaction, OnboardingCompleted, json_schemas

from tests.conftest import create_topics, read_all
from usertrail.cli import main
from usertrail.settings import Settings


def test_demo_plan_is_deterministic_and_has_distinct_habits() -> None:
    from datetime import UTC, datetime

    end = datetime(2026, 6, 1, tzinfo=UTC)
    calls = list(plan(users=60, events=3000, seed=3, end=end))
    assert calls == list(plan(users=60, events=3000, seed=3, end=end))
    services: dict[str, Counter[str]] = {}
    for call in calls:
        if call.method == "track_interaction":
            services.setdefault(call.fields["user_id"], Counter())[call.fields["service"]] += 1
    onboarded = {c.fields["user_id"] for c in calls if c.method == "track_onboarding"}
    assert len(onboarded) == 60
    assert onboarded - set(services), "some users only onboard"
    tarot_fans = [u for u, c in services.items() if c["tarot"] / sum(c.values()) > 0.7]
    saju_fans = [u for u, c in services.items() if c["saju"] / sum(c.values()) > 0.7]
    assert tarot_fans and saju_fans
    assert 2700 <= len(calls) <= 3300


async def test_demo_command_sends_through_the_sdk(settings: Settings, tmp_path: Path) -> None:
    await create_topics(settings)
    argv = [
        "demo",
        "--users",
        "20",
        "--events",
        "400",
        "--bootstrap-servers",
        settings.bootstrap_servers,
        "--data-dir",
        str(tmp_path),
    ]
    import os

    os.environ["USERTRAIL_EVENTS_TOPIC"] = settings.events_topic
    try:
        code = await asyncio.to_thread(main, argv)
    finally:
        del os.environ["USERTRAIL_EVENTS_TOPIC"]
    assert code == 0
    expected = len(list(plan(users=20, events=400)))
    records = await read_all(settings, settings.events_topic, expected=expected)
    events = [decode(v or b"") for _, _, v in records]
    assert len(events) == expected
    assert sum(isinstance(e, OnboardingCompleted) for e in events) == 20
    assert any(isinstance(e, Interaction) and e.rating == 1 for e in events), "critics exist"


def test_schema_command_writes_one_file_per_kind(tmp_path: Path) -> None:
    assert main(["schema", "--out", str(tmp_path)]) == 0
    written = {p.name: json.loads(p.read_text()) for p in tmp_path.iterdir()}
    assert set(written) == {f"{kind}.schema.json" for kind in json_schemas()}
    assert written["interaction.schema.json"]["properties"]["kind"]["const"] == "interaction"
