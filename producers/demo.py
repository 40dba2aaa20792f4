"""Demo traffic: users with distinct habits, sent through the SDK.

Personas are chosen so segments later mean something: a tarot-and-love
devotee, a career-focused saju user, a low-rating critic, a heavy user of
everything, an astrology dabbler, and new users with only onboarding.
Event times are spread over the ``days`` before ``end`` (default: now) in
per-user order; the same ``seed`` gives the same users and events.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from usertrail.producers.client import TrackingClient

THEMES = ("love", "career", "health", "money", "family", "growth")
SERVICES = ("saju", "tarot", "astrology", "dream")


@dataclass(frozen=True)
class Persona:
    name: str
    weight: float  # share of users
    activity: float  # relative events per user
    services: dict[str, float]
    themes: dict[str, float]
    ratings: dict[int, float]
    types: dict[str, float]
    interests: tuple[str, ...]


PERSONAS = (
    Persona(
        "tarot-love",
        0.25,
        1.0,
        {"tarot": 0.85, "astrology": 0.15},
        {"love": 0.8, "family": 0.2},
        {5: 0.6, 4: 0.3, 3: 0.1},
        {"reading": 0.7, "chat": 0.2, "feedback": 0.05, "share": 0.05},
        ("love",),
    ),
    Persona(
        "career-saju",
        0.25,
        1.0,
        {"saju": 0.9, "tarot": 0.1},
        {"career": 0.75, "money": 0.25},
        {5: 0.3, 4: 0.5, 3: 0.2},
        {"reading": 0.75, "chat": 0.15, "feedback": 0.1},
        ("career", "money"),
    ),
    Persona(
        "critic",
        0.15,
        0.8,
        {"saju": 0.4, "tarot": 0.3, "astrology": 0.3},
        {"love": 0.3, "career": 0.3, "health": 0.4},
        {1: 0.45, 2: 0.4, 3: 0.15},
        {"reading": 0.6, "feedback": 0.4},
        (),
    ),
    Persona(
        "heavy",
        0.1,
        5.0,
        {s: 1.0 for s in SERVICES},
        {t: 1.0 for t in THEMES},
        {5: 0.4, 4: 0.4, 3: 0.2},
        {"reading": 0.6, "chat": 0.3, "share": 0.1},
        ("growth",),
    ),
    Persona(
        "astro-dabbler",
        0.1,
        0.4,
        {"astrology": 0.8, "dream": 0.2},
        {"health": 0.5, "growth": 0.5},
        {4: 0.5, 3: 0.5},
        {"reading": 0.8, "share": 0.2},
        ("health",),
    ),
    Persona("new", 0.15, 0.0, {}, {}, {}, {}, ("love", "career")),
)


def _pick(rng: random.Random, weights: dict[Any, float]) -> Any:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


@dataclass(frozen=True)
class DemoCall:
    method: str
    fields: dict[str, Any]


def plan(
    *, users: int, events: int, seed: int = 7, end: datetime | None = None, days: int = 30
) -> Iterator[DemoCall]:
    """The SDK calls of a demo run, in send order (per-user time order)."""
    rng = random.Random(seed)
    end = end or datetime.now(UTC)
    start = end - timedelta(days=days)
    people = [
        (f"demo-{i:05d}", rng.choices(PERSONAS, weights=[p.weight for p in PERSONAS])[0])
        for i in range(users)
    ]
    for user_id, persona in people:  # everyone onboards first
        yield DemoCall(
            "track_onboarding",
            {
                "user_id": user_id,
                "interests": list(persona.interests),
                "services": [s for s, w in persona.services.items() if w >= 0.5],
                "experience": "new" if persona.name == "new" else "regular",
                "occurred_at": start,
            },
        )
    active = [(u, p) for u, p in people if p.activity > 0]
    if not active:
        return
    budget = max(events - users, 0)
    total_weight = sum(p.activity for _, p in active)
    span = (end - start).total_seconds()
    for user_id, persona in active:
        count = round(budget * persona.activity / total_weight)
        times = sorted(start + timedelta(seconds=rng.uniform(1, span)) for _ in range(count))
        if count and rng.random() < 0.3:
            yield DemoCall(
                "track_preferences",
                {
                    "user_id": user_id,
                    "preferred_themes": list(persona.themes)[:2],
                    "reading_length": rng.choice(["short", "medium", "long"]),
                    "tone_preference": rng.choice(["casual", "formal", "mystical"]),
                    "occurred_at": times[0],
                },
            )
        for at in times:
            kind = _pick(rng, persona.types)
            fields: dict[str, Any] = {
                "user_id": user_id,
                "type": kind,
                "service": _pick(rng, persona.services),
                "occurred_at": at,
            }
            if kind == "reading":
                fields["theme"] = _pick(rng, persona.themes)
                fields["metadata"] = {"duration": rng.randint(30, 600)}
            if kind in ("reading", "feedback") and rng.random() < 0.8:
                fields["rating"] = _pick(rng, persona.ratings)
            yield DemoCall("track_interaction", fields)


async def run(client: TrackingClient, calls: Iterator[DemoCall]) -> int:
    sent = 0
    for call in calls:
        await getattr(client, call.method)(**call.fields)
        sent += 1
    return sent
