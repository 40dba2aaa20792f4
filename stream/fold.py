"""The fold: ``fold(profile, event, offset) -> profile``, pure, no faust.

A profile is everything the stream knows of one user, folded from their
events in log order. Time is event time only: "now" is the newest
``occurredAt`` folded so far, so a replay gives identical profiles.

Exactly-once in effect (docs/architecture.md, rule 2): the profile keeps the source
offset of the last event folded (a user's events are folded from one
partition, their home: docs/architecture.md, so offsets only grow) and the
id of every event it ever folded; a redelivered record (offset not above
the last) or an event an app sent again, however late (id seen before),
leaves the profile unchanged. The newest ids are in the profile itself;
older ones are sealed, SEEN_CHUNK at a time, into chunks stored beside it
(``seen_key``), and the profile keeps each chunk's lowest and highest id.
Event ids are UUIDv7 (time-ordered), so a new event's id is above every
sealed chunk and costs no lookup; a late resend loads the one chunk whose
range holds it (``NeedChunks`` asks for it).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Container, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator
from usertrail.producers.events import (
    EventBase,
    Interaction,
    OnboardingCompleted,
    PreferencesUpdated,
    UserErased,
)


def in_utc(value: datetime) -> datetime:
    """The same instant with the standard library's ``UTC`` as its tzinfo.

    pydantic gives a parsed time its own tzinfo object, and comparing or
    subtracting two such datetimes calls that object twice (0.5 us here);
    datetimes sharing one tzinfo object compare field by field (0.05 us).
    The fold compares event times constantly (a sorted window of 200 of
    them), so every time a profile holds is in ``UTC``: event times as they
    are folded, stored profiles as they are loaded."""
    if value.tzinfo is UTC or value.tzinfo is None:  # naive: never in a profile
        return value
    return value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(in_utc)]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros(at: datetime) -> int:
    """``at`` (aware) as whole microseconds since the epoch: how a profile
    keeps the times it holds many of (interactions, top readings). The same
    order and the same instants as the datetimes, exactly (a datetime's
    resolution is the microsecond), at a fraction of the cost to store and
    load: as datetimes, the 200 interaction times were two thirds of a full
    state's serializing and four fifths of its loading."""
    return (in_utc(at) - _EPOCH) // _MICROSECOND


# States written before 2026-12-02 hold these times as RFC 3339 text: read
# as the same instants.
def _from_text(text: str) -> int:
    at = datetime.fromisoformat(text)
    if at.tzinfo is None:  # never written so: event times carry their offset
        raise ValueError(f"a stored time without its offset: {text!r}")
    return micros(at)


def _stored_times(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_from_text(x) if isinstance(x, str) else x for x in value)
    return value


def _stored_readings(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(
            (_from_text(r[0]), *r[1:])
            if isinstance(r, list | tuple) and r and isinstance(r[0], str)
            else r
            for r in value
        )
    return value


Micros = Annotated[tuple[int, ...], BeforeValidator(_stored_times)]
Readings = Annotated[tuple[tuple[int, str, str | None], ...], BeforeValidator(_stored_readings)]

RECENT_IDS = 256
"""Event ids held in the profile itself; past that, the SEEN_CHUNK lowest
are sealed into a chunk."""
SEEN_CHUNK = 128
"""Event ids per sealed chunk (about 4.7 KiB stored)."""


class NeedChunks(Exception):  # noqa: N818  # a request, not an error
    """The fold needs sealed chunks it was not given (by index)."""

    def __init__(self, indices: set[int]) -> None:
        super().__init__(sorted(indices))
        self.indices = frozenset(indices)


def encode_chunk(ids: frozenset[str]) -> bytes:
    return ",".join(sorted(ids)).encode()


def decode_chunk(value: bytes) -> frozenset[str]:
    return frozenset(value.decode().split(","))


def chunks_needed(
    sealed: Sequence[tuple[str, str]], event_ids: Iterable[str], have: Container[int]
) -> set[int]:
    """The sealed chunks whose id range holds one of ``event_ids``, but for
    those in ``have``."""
    if not sealed:
        return set()
    top = max(hi for _, hi in sealed)
    return {
        i
        for x in event_ids
        if x <= top
        for i, (lo, hi) in enumerate(sealed)
        if lo <= x <= hi and i not in have
    }


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
    first_activity: UtcDatetime | None = None
    last_activity: UtcDatetime | None = None
    # (occurredAt in ``micros``, eventId, theme) of the latest readings
    # rated >= 4, oldest first
    top_readings: Readings = ()
    recent_activity: Micros = ()  # interaction times (``micros``), oldest first
    affinity: dict[str, float] = field(default_factory=dict)  # decayed to `now`
    preferences: dict[str, Any] = field(default_factory=dict)
    preferences_at: UtcDatetime | None = None
    onboarding: dict[str, Any] | None = None
    now: UtcDatetime | None = None  # the newest event time folded
    last_offset: int | None = None
    recent_ids: tuple[str, ...] = ()
    # (lowest, highest) id of each sealed chunk of older ids, by index
    sealed: tuple[tuple[str, str], ...] = ()
    erased_at: UtcDatetime | None = None  # a tombstone: the user was erased

    @property
    def interactions(self) -> int:
        return sum(self.counts_by_type.values())

    def totals(self) -> tuple[int, int, int, int]:
        """(interactions, interactions with a theme, ratings, sum of ratings)."""
        return (
            sum(self.counts_by_type.values()),
            sum(self.counts_by_theme.values()),
            sum(self.rating_count_by_service.values()),
            sum(self.rating_sum_by_service.values()),
        )

    def favourite_themes(self) -> dict[str, int]:
        """Exactly the seed's query: theme counts over the latest 20 readings
        rated 4 or more (readings without a theme count for nothing)."""
        counts: dict[str, int] = {}
        for _, _, theme in self.top_readings:
            if theme is not None:
                counts[theme] = counts.get(theme, 0) + 1
        return counts


def fold(
    profile: Profile,
    event: EventBase,
    offset: int | None = None,
    *,
    config: AffinityConfig,
    chunks: MutableMapping[int, frozenset[str]] | None = None,
) -> Profile:
    """The profile after ``event`` (read at ``offset`` of the user's partition);
    ``profile`` itself when the event changes nothing. ``chunks``: the
    profile's sealed chunks, to which a chunk sealed here is added."""
    folding = Folding(profile, config, chunks)
    if not folding.apply(event, offset):
        return profile
    if chunks is not None:
        chunks.update(folding.new_chunks)
    return folding.freeze()


@functools.cache
def _dimensions(config: AffinityConfig) -> dict[tuple[str, str], str]:
    """("theme" or "service", slug) -> the vector's dimension, for known ones."""
    return {tuple(d.split(":", 1)): d for d in config.dimensions()}  # type: ignore[misc]


class Folding:
    """A profile being folded in place: the one implementation of the fold.
    ``fold`` is one ``apply`` between a copy and a freeze; the stream worker
    and replay ``apply`` a user's whole batch of events to one ``Folding``,
    which costs the same as one event's copy instead of one per event.
    Besides the profile's fields it answers what segment rules read
    (``interactions`` and the rest), so rules can be evaluated after every
    event without freezing."""

    __slots__ = (
        "_config",
        "_dims",
        "_chunks",
        "_half_life",
        "_ids",
        "_sealed_top",
        "_totals",
        "affinity",
        "counts_by_service",
        "counts_by_theme",
        "counts_by_type",
        "erased_at",
        "first_activity",
        "last_activity",
        "last_offset",
        "now",
        "onboarding",
        "preferences",
        "preferences_at",
        "rating_count_by_service",
        "rating_sum_by_service",
        "recent_activity",
        "new_chunks",
        "recent_ids",
        "sealed",
        "top_readings",
        "user_id",
    )

    def __init__(
        self,
        p: Profile,
        config: AffinityConfig,
        chunks: Mapping[int, frozenset[str]] | None = None,
    ) -> None:
        """``chunks``: those of the profile's sealed chunks at hand; a
        resend whose id falls in another one's range raises NeedChunks."""
        self._config = config
        self._dims = _dimensions(config)
        self._half_life = config.half_life_days * 86400.0
        self.user_id = p.user_id
        self.counts_by_type = dict(p.counts_by_type)
        self.counts_by_service = dict(p.counts_by_service)
        self.counts_by_theme = dict(p.counts_by_theme)
        self.rating_sum_by_service = dict(p.rating_sum_by_service)
        self.rating_count_by_service = dict(p.rating_count_by_service)
        self.first_activity = p.first_activity
        self.last_activity = p.last_activity
        self.top_readings = list(p.top_readings)
        self.recent_activity = list(p.recent_activity)
        self.affinity = dict(p.affinity)
        self.preferences = dict(p.preferences)
        self.preferences_at = p.preferences_at
        self.onboarding = None if p.onboarding is None else dict(p.onboarding)
        self.now = p.now
        self.last_offset = p.last_offset
        self.recent_ids = list(p.recent_ids)
        self._ids = set(p.recent_ids)
        self.sealed = list(p.sealed)
        self._sealed_top = max((hi for _, hi in p.sealed), default="")
        self._chunks = dict(chunks or {})
        self.new_chunks: dict[int, frozenset[str]] = {}  # sealed here
        self.erased_at = p.erased_at
        self._totals = list(p.totals())  # kept as events come: rules read them each time

    @property
    def interactions(self) -> int:
        return self._totals[0]

    def totals(self) -> Sequence[int]:
        """As ``Profile.totals``: the running sums themselves (read, never
        written: the rules read them after every event)."""
        return self._totals

    def freeze(self) -> Profile:
        return Profile(
            self.user_id,
            counts_by_type=dict(self.counts_by_type),
            counts_by_service=dict(self.counts_by_service),
            counts_by_theme=dict(self.counts_by_theme),
            rating_sum_by_service=dict(self.rating_sum_by_service),
            rating_count_by_service=dict(self.rating_count_by_service),
            first_activity=self.first_activity,
            last_activity=self.last_activity,
            top_readings=tuple(self.top_readings),
            recent_activity=tuple(self.recent_activity),
            affinity=dict(self.affinity),
            preferences=dict(self.preferences),
            preferences_at=self.preferences_at,
            onboarding=None if self.onboarding is None else dict(self.onboarding),
            now=self.now,
            last_offset=self.last_offset,
            recent_ids=tuple(self.recent_ids),
            sealed=tuple(self.sealed),
            erased_at=self.erased_at,
        )

    def apply(self, event: EventBase, offset: int | None = None) -> bool:
        """Fold ``event`` in; whether the profile changed. A redelivered
        record (offset not above the last) changes nothing; a resent event
        (id among the recent ones) moves only the offset."""
        if event.user_id != self.user_id:
            raise ValueError(f"event of {event.user_id!r} folded into {self.user_id!r}")
        if offset is not None and self.last_offset is not None and offset <= self.last_offset:
            return False  # redelivered after a crash
        event_id = event.event_id
        if event_id in self._ids or (event_id <= self._sealed_top and self._sealed_has(event_id)):
            if offset is None:
                return False
            self.last_offset = offset
            return True
        ids = self.recent_ids
        ids.append(event_id)
        self._ids.add(event_id)
        if len(ids) > RECENT_IDS:
            self._seal()
        before = self.now
        at = in_utc(event.occurred_at)
        self.now = at if before is None else max(before, at)
        if isinstance(event, UserErased):
            self.last_offset = offset
            self._forget(at)
            return True
        if offset is not None:
            self.last_offset = offset
        self.erased_at = None
        if isinstance(event, Interaction):
            self._interaction(before, event, at)
        elif isinstance(event, PreferencesUpdated):
            if self.preferences_at is None or at >= self.preferences_at:
                # newer over older, as the sink writes "UserPreferences"
                self.preferences.update(event.carried())
                self.preferences_at = at
        elif isinstance(event, OnboardingCompleted):
            self.onboarding = {
                "interests": list(event.interests),
                "services": list(event.services),
                "experience": event.experience,
            }
        return True

    def _sealed_has(self, event_id: str) -> bool:
        for i, (lo, hi) in enumerate(self.sealed):
            if lo <= event_id <= hi:
                chunk = self._chunks.get(i)
                if chunk is None:
                    raise NeedChunks({i})
                if event_id in chunk:
                    return True
        return False

    def _seal(self) -> None:
        """The SEEN_CHUNK lowest recent ids into a new sealed chunk."""
        chunk = sorted(self.recent_ids)[:SEEN_CHUNK]
        gone = frozenset(chunk)
        self.recent_ids = [x for x in self.recent_ids if x not in gone]
        self._ids -= gone
        i = len(self.sealed)
        self.sealed.append((chunk[0], chunk[-1]))
        self._sealed_top = max(self._sealed_top, chunk[-1])
        self._chunks[i] = self.new_chunks[i] = gone

    def _forget(self, at: datetime) -> None:
        """Erasure: nothing of the user is kept but what dedup needs (every
        event id: a resend of an event from before the erasure stays a resend)."""
        for counts in (
            self.counts_by_type,
            self.counts_by_service,
            self.counts_by_theme,
            self.rating_sum_by_service,
            self.rating_count_by_service,
            self.affinity,
            self.preferences,
        ):
            counts.clear()
        self.top_readings.clear()
        self.recent_activity.clear()
        self._totals = [0, 0, 0, 0]
        self.first_activity = self.last_activity = self.preferences_at = None
        self.onboarding = None
        self.erased_at = at

    def _interaction(self, before: datetime | None, e: Interaction, at: datetime) -> None:
        service, theme, rating = e.service, e.theme, e.rating
        at_us = micros(at)
        totals = self._totals
        totals[0] += 1
        counts = self.counts_by_type
        counts[e.type] = counts.get(e.type, 0) + 1
        counts = self.counts_by_service
        counts[service] = counts.get(service, 0) + 1
        if self.first_activity is None or at < self.first_activity:
            self.first_activity = at
        if self.last_activity is None or at > self.last_activity:
            self.last_activity = at
        if theme is not None:
            totals[1] += 1
            counts = self.counts_by_theme
            counts[theme] = counts.get(theme, 0) + 1
        if rating is not None:
            totals[2] += 1
            totals[3] += rating
            counts = self.rating_sum_by_service
            counts[service] = counts.get(service, 0) + rating
            counts = self.rating_count_by_service
            counts[service] = counts.get(service, 0) + 1
            if e.type == "reading" and rating >= 4:
                readings = self.top_readings
                bisect.insort(readings, (at_us, e.event_id, theme), key=_reading_order)
                if len(readings) > FAVOURITE_WINDOW:
                    del readings[0]
        activity = self.recent_activity
        bisect.insort(activity, at_us)
        if len(activity) > RECENT_ACTIVITY:
            del activity[0]
        # the vector stays decayed to `now` (the newest event time)
        now = self.now
        assert now is not None
        vector = self.affinity
        if before is not None and now > before:  # time moved on: decay everything
            factor = math.pow(0.5, (now - before).total_seconds() / self._half_life)
            for k in vector:
                vector[k] *= factor
        config = self._config
        weight = config.unrated if rating is None else config.rating_weights[rating - 1]
        if at != now:  # an event older than the newest: decayed to now
            weight *= math.pow(0.5, (now - at).total_seconds() / self._half_life)
        dims = self._dims
        for dim in (dims.get(("service", service)), theme and dims.get(("theme", theme))):
            if dim:
                vector[dim] = vector.get(dim, 0.0) + weight


def _reading_order(r: tuple[int, str, str | None]) -> tuple[int, str]:
    return r[0], r[1]


def fold_all(
    user_id: str, events: list[tuple[EventBase, int | None]], *, config: AffinityConfig
) -> Profile:
    """Fold a user's events (with their offsets) from an empty profile."""
    folding = Folding(Profile(user_id), config)
    for event, offset in events:
        folding.apply(event, offset)
    return folding.freeze()
