"""The third half of ``verify``: every live profile against SQL over the rows.

``verify``'s other checks compare the live state with a fresh fold of the
log, which shares the workers' decoding and fold: a fault in either is in
both sides and goes unseen. This check shares nothing with the fold. It
reads what the sink wrote (``"UserInteraction"`` and ``"UserPreferences"``)
and asks of each user the aggregates their profile holds: interactions by
type, service and theme, ratings by service, first and last activity,
preferences with their time, and favourite themes by seed 000's own query
(the themes of the latest 20 readings rated 4 or more).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from usertrail.stream.fold import Profile

from usertrail.settings import Settings

# Seed 000, "Get User's Favorite Themes", for every user at once: readings
# rated 4 or more, the latest 20 by createdAt (ties by id, as the fold keeps
# them), counted by theme.
FAVOURITES_SQL = """
SELECT "userId", theme, count(*) FROM (
    SELECT "userId", theme, row_number() OVER (
        PARTITION BY "userId" ORDER BY "createdAt" DESC, id COLLATE "C" DESC
    ) AS n
    FROM "UserInteraction" WHERE type = 'reading' AND rating >= 4
) latest WHERE n <= 20 AND theme IS NOT NULL GROUP BY 1, 2
"""
COUNTS_SQL = """
SELECT "userId", type, service, theme, count(*), count(rating), coalesce(sum(rating), 0),
       min("createdAt"), max("createdAt")
FROM "UserInteraction" GROUP BY 1, 2, 3, 4
"""
PREFERENCE_COLUMNS = (
    "preferredLanguage",
    "preferredThemes",
    "preferredServices",
    "notificationSettings",
    "readingLength",
    "tonePreference",
)
PREFERENCES_SQL = (
    'SELECT "userId", "updatedAt", '
    + ", ".join(f'"{c}"' for c in PREFERENCE_COLUMNS)
    + ' FROM "UserPreferences"'
)


@dataclass
class FromRows:
    """One user's aggregates as SQL over the rows gives them."""

    counts_by_type: Counter[str] = field(default_factory=Counter)
    counts_by_service: Counter[str] = field(default_factory=Counter)
    counts_by_theme: Counter[str] = field(default_factory=Counter)
    rating_sum_by_service: Counter[str] = field(default_factory=Counter)
    rating_count_by_service: Counter[str] = field(default_factory=Counter)
    first_activity: datetime | None = None
    last_activity: datetime | None = None
    favourite_themes: dict[str, int] = field(default_factory=dict)
    preferences: dict[str, Any] | None = None
    preferences_at: datetime | None = None


def _utc(at: datetime | None) -> datetime | None:
    """A ``timestamp without time zone`` column's value as the UTC instant it holds."""
    return None if at is None else at.replace(tzinfo=UTC)


def from_rows(settings: Settings) -> dict[str, FromRows]:
    """Every user with rows, and what SQL says of them."""
    users: dict[str, FromRows] = {}
    with psycopg.connect(settings.database_dsn()) as conn:
        for user, type_, service, theme, n, rated, rating_sum, first, last in conn.execute(
            COUNTS_SQL
        ):
            u = users.setdefault(user, FromRows())
            u.counts_by_type[type_] += n
            u.counts_by_service[service] += n
            if theme is not None:
                u.counts_by_theme[theme] += n
            if rated:
                u.rating_count_by_service[service] += rated
                u.rating_sum_by_service[service] += int(rating_sum)
            first, last = _utc(first), _utc(last)
            if first is not None and (u.first_activity is None or first < u.first_activity):
                u.first_activity = first
            if last is not None and (u.last_activity is None or last > u.last_activity):
                u.last_activity = last
        for user, theme, n in conn.execute(FAVOURITES_SQL):
            users.setdefault(user, FromRows()).favourite_themes[theme] = n
        for user, updated_at, *values in conn.execute(PREFERENCES_SQL):
            u = users.setdefault(user, FromRows())
            u.preferences = dict(zip(PREFERENCE_COLUMNS, values, strict=True))
            u.preferences_at = _utc(updated_at)
    return users


def differences(profile: Profile | None, rows: FromRows | None) -> list[str]:
    """What a profile and the rows disagree on, by the profile's field names."""
    p = profile or Profile("")
    r = rows or FromRows()
    out = [
        name
        for name in (
            "counts_by_type",
            "counts_by_service",
            "counts_by_theme",
            "rating_sum_by_service",
            "rating_count_by_service",
            "first_activity",
            "last_activity",
        )
        if dict_or_value(getattr(p, name)) != dict_or_value(getattr(r, name))
    ]
    if p.favourite_themes() != r.favourite_themes:
        out.append("favourite_themes")
    if p.preferences:
        stored = r.preferences or {}
        # the columns the profile does not carry keep the table's defaults
        if any(stored.get(k) != v for k, v in p.preferences.items()):
            out.append("preferences")
        if p.preferences_at != r.preferences_at:
            out.append("preferences_at")
    elif r.preferences is not None and p.erased_at is None:
        out.append("preferences")
    return out


def dict_or_value(value: Any) -> Any:
    """Counters and dicts compare by their non-zero entries."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v}
    return value


@dataclass
class Disagreement:
    user_id: str
    fields: list[str]
    open_dead_letters: int = 0


def cross_check(settings: Settings, profiles: dict[str, Profile]) -> list[Disagreement]:
    """Every user whose live profile and rows disagree, with the fields and
    the dead letters still open for them (rows that may yet come)."""
    rows = from_rows(settings)
    out = []
    for user in sorted(set(profiles) | set(rows)):
        fields = differences(profiles.get(user), rows.get(user))
        if fields:
            out.append(Disagreement(user, fields))
    if out:
        with psycopg.connect(settings.database_dsn()) as conn:
            open_letters: dict[str, int] = dict(
                conn.execute(
                    "SELECT user_id, count(*) FROM usertrail_dead_letters "
                    "WHERE resolved_at IS NULL AND user_id = ANY(%s) GROUP BY 1",
                    ([d.user_id for d in out],),
                ).fetchall()
            )
        for d in out:
            d.open_dead_letters = int(open_letters.get(d.user_id, 0))
    return out
