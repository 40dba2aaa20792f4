"""``segments backfill``: seed 002's data migration for databases that
existed before the pipeline. Every ``"User"`` gets a ``user_vectors`` row
whose segments come from the interactions and preferences already in the
database, folded and segmented by the very functions the stream runs.

Idempotent: the same rows give the same profile, so a second run writes the
same values (``lastSegmentUpdate`` is the newest interaction's time, not the
wall clock). Rows the database holds but the event contract refuses (a
rating of 9, a service that is not a slug) are counted and left out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from usertrail.producers.events import UUID7_PATTERN, EventBase, build
from usertrail.producers.ids import uuid7_from
from usertrail.sink.writer import vectors_upsert
from usertrail.stream.fold import Profile, fold_all
from usertrail.stream.segments import Rules, segment

from usertrail.errors import EventValidationError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

INTERACTIONS_SQL = """
SELECT "userId", id, "createdAt", type, service, theme, rating
FROM "UserInteraction"
ORDER BY "userId", "createdAt", id
"""


@dataclass
class BackfillResult:
    users: int = 0
    created: int = 0  # user_vectors rows that did not exist
    interactions: int = 0
    refused: int = 0  # rows the event contract refuses, left out


def _utc(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _event_id(row_id: str, at: datetime) -> str:
    """The row's id when it is a UUIDv7 (rows the sink wrote); otherwise one
    derived from it, the same on every run (rows that predate the pipeline
    have ids of their own, cuid or UUIDv4)."""
    if re.match(UUID7_PATTERN, row_id):
        return row_id
    digest = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:10], "big")
    return uuid7_from(int(at.timestamp() * 1000), digest >> 68, digest & (1 << 62) - 1)


def _events(
    user: str, rows: list[tuple[Any, ...]], preferences: tuple[Any, ...] | None, out: BackfillResult
) -> list[tuple[EventBase, int | None]]:
    events: list[tuple[EventBase, int | None]] = []
    if preferences is not None:
        themes, services, created = preferences
        times = [u for t in [created, *(r[1] for r in rows)] if (u := _utc(t)) is not None]
        first = min(times, default=None)
        try:  # the answers the product keeps: preferred themes and services
            events.append(
                (
                    build(
                        "onboarding.completed",
                        event_id=_event_id(f"onboarding:{user}", first or EPOCH),
                        user_id=user,
                        source="backfill",
                        occurred_at=first or EPOCH,
                        interests=list(themes or []),
                        services=list(services or []),
                    ),
                    None,
                )
            )
        except EventValidationError:
            out.refused += 1
    for row_id, created, kind, service, theme, rating in rows:
        out.interactions += 1
        at = _utc(created) or EPOCH
        try:
            events.append(
                (
                    build(
                        "interaction",
                        event_id=_event_id(row_id, at),
                        user_id=user,
                        source="backfill",
                        occurred_at=at,
                        type=kind,
                        service=service,
                        theme=theme,
                        rating=rating,
                    ),
                    None,
                )
            )
        except EventValidationError:
            out.refused += 1
    return events


def _by_user(cur: psycopg.Cursor[Any]) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
    current: str | None = None
    rows: list[tuple[Any, ...]] = []
    for user, *rest in cur:
        if user != current:
            if current is not None:
                yield current, rows
            current, rows = user, []
        rows.append(tuple(rest))
    if current is not None:
        yield current, rows


def backfill(
    dsn: str, rules: Rules, *, progress: Callable[[int, int], None] | None = None
) -> BackfillResult:
    out = BackfillResult()
    config = rules.affinity_config()
    with psycopg.connect(dsn) as conn:
        users = [r[0] for r in conn.execute('SELECT id FROM "User" ORDER BY id')]
        known = set(users)
        existing = {r[0] for r in conn.execute('SELECT "userId" FROM user_vectors')}
        preferences = {
            r[0]: r[1:]
            for r in conn.execute(
                'SELECT "userId", "preferredThemes", "preferredServices", "createdAt" '
                'FROM "UserPreferences"'
            )
        }
        done: set[str] = set()
        rows: list[tuple[Any, ...]] = []
        with conn.cursor(name="usertrail_backfill") as cur:  # server-side: any size
            cur.execute(INTERACTIONS_SQL)
            for user, interactions in _by_user(cur):
                if user in known:
                    rows.append(_row(user, interactions, preferences.get(user), config, rules, out))
                    done.add(user)
                    if progress is not None:
                        progress(len(done), len(users))
        for user in users:
            if user not in done:
                rows.append(_row(user, [], preferences.get(user), config, rules, out))
                done.add(user)
        if progress is not None:
            progress(len(done), len(users))
        out.users = len(rows)
        out.created = sum(1 for r in rows if r[1] not in existing)
        with conn.cursor() as cur:
            cur.executemany(vectors_upsert(segments_only=True), rows)
        conn.commit()
    return out


def _row(
    user: str,
    interactions: list[tuple[Any, ...]],
    preferences: tuple[Any, ...] | None,
    config: Any,
    rules: Rules,
    out: BackfillResult,
) -> tuple[Any, ...]:
    events = _events(user, interactions, preferences, out)
    profile = fold_all(user, events, config=config) if events else Profile(user)
    seg = segment(profile, rules)
    at = None if profile.now is None else profile.now.astimezone(UTC).replace(tzinfo=None)
    now = datetime.now(UTC).replace(tzinfo=None)  # a new row's times, as the sink's are: UTC
    return (
        user,
        user,
        Jsonb({k: round(v, 9) for k, v in sorted(profile.affinity.items())}),
        now,
        now,
        Jsonb(
            [
                {"segment": a.segment, "score": round(a.score, 6), "reasons": a.reasons}
                for a in seg.assignments
            ]
        ),
        seg.primary_segment,
        seg.segment_confidence,
        at,
    )
