"""The fold: ``fold(profile, event, offset) -> profile``, pure, no faust.

A profile is everything the stream knows of one user, folded from their
events in log order. Time is event time only: "now" is the newest
``occurredAt`` folded so far, so a replay gives identical profiles.

Exactly-once in effect (DESIGN.md rule 2): the profile keeps the source
offset of the last event folded (one user lives in one partition, so offsets
only grow) and the ids of its most recent events; a redelivered record
(offset not above the last) or an event an app sent twice (id among the
recent ones) leaves the profile unchanged.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter
from usertrail.producers.events import (
    EventBase,
    Interaction,
    OnboardingCompleted,
    PreferencesUpdated,
    UserErased,
)

RECENT_IDS = 256
"""Event ids remembered per user for deduplication of resends."""
FAVOURITE_WINDOW = 20
"""The seed's query: themes of the latest 20 readings rated 4 or more."""
RECENT_ACTIVITY = 200
"""Interaction times kept for engagement windows."""


@dataclass(frozen=True)
class AffinityConfig:
    """The affinity vector's dimensions and decay (from the rules file)."""

    themes: tuple[str, ...] = ("love", "career", "health", "money", "family", "growth")
    services: tuple[str, ...] = ("saju", "tarot", "astrology", "dream")
    half_life_days: float = 30.0
    # weight of an interaction by rating; unrated ones weigh `unrated`
    rating_weights: tuple[float, float, float, float, float] = (0.25, 0.5, 1.0, 1.5, 2.0)
    unrated: float = 1.0

    def dimensions(self) -> tuple[str, ...]:
        return tuple(f"theme:{t}" for t in self.themes) + tuple(
            f"service:{s}" for s in self.services
        )


@dataclass(frozen=True)
class Profile:
    user_id: str
    counts_by_type: dict[str, int] = field(default_factory=dict)
    counts_by_service: dict[str, int] = field(default_factory=dict)
    counts_by_theme: dict[str, int] = field(default_factory=dict)
    rating_sum_by_service: dict[str, int] = field(default_factory=dict)
    rating_count_by_service: dict[str, int] = field(default_factory=dict)
    first_activity: datetime | None = None
    last_activity: datetime | None = None
    # (occurredAt, eventId, theme) of the latest readings rated >= 4, oldest first
    top_readings: tuple[tuple[datetime, str, str | None], ...] = ()
    recent_activity: tuple[datetime, ...] = ()  # interaction times, oldest first
    affinity: dict[str, float] = field(default_factory=dict)  # decayed to `now`
    preferences: dict[str, Any] = field(default_factory=dict)
    preferences_at: datetime | None = None
    onboarding: dict[str, Any] | None = None
    now: datetime | None = None  # the newest event time folded
    last_offset: int | None = None
    recent_ids: tuple[str, ...] = ()
    erased_at: datetime | None = None  # a tombstone: the user was erased

    @property
    def interactions(self) -> int:
        return sum(self.counts_by_type.values())

    def favourite_themes(self) -> dict[str, int]:
        """Exactly the seed's query: theme counts over the latest 20 readings
        rated 4 or more (readings without a theme count for nothing)."""
        counts: dict[str, int] = {}
        for _, _, theme in self.top_readings:
            if theme is not None:
                counts[theme] = counts.get(theme, 0) + 1
        return counts


def fold(
    profile: Profile, event: EventBase, offset: int | None = None, *, config: AffinityConfig
) -> Profile:
    """The profile after ``event`` (read at ``offset`` of the user's partition)."""
    if event.user_id != profile.user_id:
        raise ValueError(f"event of {event.user_id!r} folded into {profile.user_id!r}")
    if offset is not None and profile.last_offset is not None and offset <= profile.last_offset:
        return profile  # redelivered after a crash
    if event.event_id in profile.recent_ids:
        return profile if offset is None else replace(profile, last_offset=offset)
    seen = (*profile.recent_ids, event.event_id)[-RECENT_IDS:]
    now = event.occurred_at if profile.now is None else max(profile.now, event.occurred_at)
    if isinstance(event, UserErased):
        return Profile(
            profile.user_id,
            now=now,
            last_offset=offset,
            recent_ids=seen,
            erased_at=event.occurred_at,
        )
    base = replace(
        profile,
        now=now,
        last_offset=offset if offset is not None else profile.last_offset,
        recent_ids=seen,
        erased_at=None,
    )
    if isinstance(event, Interaction):
        return _interaction(base, profile.now, event, config)
    if isinstance(event, PreferencesUpdated):
        if base.preferences_at is not None and event.occurred_at < base.preferences_at:
            return base  # newer over older, as the sink writes "UserPreferences"
        return replace(
            base,
            preferences={**base.preferences, **event.carried()},
            preferences_at=event.occurred_at,
        )
    if isinstance(event, OnboardingCompleted):
        return replace(
            base,
            onboarding={
                "interests": list(event.interests),
                "services": list(event.services),
                "experience": event.experience,
            },
        )
    return base


def _inc(counts: dict[str, int], key: str, by: int = 1) -> dict[str, int]:
    out = dict(counts)
    out[key] = out.get(key, 0) + by
    return out


def _interaction(
    p: Profile, before: datetime | None, e: Interaction, config: AffinityConfig
) -> Profile:
    changes: dict[str, Any] = {
        "counts_by_type": _inc(p.counts_by_type, e.type),
        "counts_by_service": _inc(p.counts_by_service, e.service),
        "first_activity": e.occurred_at
        if p.first_activity is None
        else min(p.first_activity, e.occurred_at),
        "last_activity": e.occurred_at
        if p.last_activity is None
        else max(p.last_activity, e.occurred_at),
    }
    if e.theme is not None:
        changes["counts_by_theme"] = _inc(p.counts_by_theme, e.theme)
    if e.rating is not None:
        changes["rating_sum_by_service"] = _inc(p.rating_sum_by_service, e.service, e.rating)
        changes["rating_count_by_service"] = _inc(p.rating_count_by_service, e.service)
    if e.type == "reading" and e.rating is not None and e.rating >= 4:
        readings = list(p.top_readings)
        bisect.insort(readings, (e.occurred_at, e.event_id, e.theme), key=lambda r: (r[0], r[1]))
        changes["top_readings"] = tuple(readings[-FAVOURITE_WINDOW:])
    activity = list(p.recent_activity)
    bisect.insort(activity, e.occurred_at)
    changes["recent_activity"] = tuple(activity[-RECENT_ACTIVITY:])
    changes["affinity"] = _affinity(p, before, e, config)
    return replace(p, **changes)


def _affinity(
    p: Profile, before: datetime | None, e: Interaction, config: AffinityConfig
) -> dict[str, float]:
    """The vector stays decayed to ``p.now`` (the newest event time)."""
    assert p.now is not None
    half_life = config.half_life_days * 86400.0
    vector = dict(p.affinity)
    if before is not None and p.now > before:  # time moved on: decay everything
        factor = math.pow(0.5, (p.now - before).total_seconds() / half_life)
        vector = {k: v * factor for k, v in vector.items()}
    weight = config.unrated if e.rating is None else config.rating_weights[e.rating - 1]
    weight *= math.pow(0.5, (p.now - e.occurred_at).total_seconds() / half_life)
    for dim in (f"service:{e.service}", f"theme:{e.theme}" if e.theme else None):
        if dim is not None and dim in config.dimensions():
            vector[dim] = vector.get(dim, 0.0) + weight
    return vector


_PROFILE_ADAPTER: TypeAdapter[Profile] = TypeAdapter(Profile)


def to_json(profile: Profile) -> bytes:
    """The profile as the changelog (and usertrail.profiles) stores it."""
    return _PROFILE_ADAPTER.dump_json(profile)


def from_json(data: bytes | str) -> Profile:
    return _PROFILE_ADAPTER.validate_json(data)


def fold_all(
    user_id: str, events: list[tuple[EventBase, int | None]], *, config: AffinityConfig
) -> Profile:
    """Fold a user's events (with their offsets) from an empty profile."""
    profile = Profile(user_id)
    for event, offset in events:
        profile = fold(profile, event, offset, config=config)
    return profile
