"""The analytics reports: read from the rollups (migration 0009), and the
same reports computed by the seeds' own SQL over the rows, which ``verify``
and the tests compare them with.

Every report is a plain JSON value (lists of dicts with the API's names),
the same for the command line, the HTTP API and the dashboard:

- ``services``: seed 000's "Most Popular Services" (interactions per
  service, most first) with distinct users and ratings;
- ``ratings``: seed 000's "Average Rating by Service";
- ``engagement``: seed 000's "User Engagement Over Time", per day (in a time
  zone) and type over a range of days;
- ``themes``: interactions and ratings per theme;
- ``segments``: seed 002's validation report, coverage and distribution.

Averages are rounded to 4 places (ratings) and, as seed 002 asks, 2 places
(segment confidence); counts and sums are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg

from usertrail.errors import ConfigurationError

Json = Any


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"unknown time zone {name!r} (an IANA name such as UTC or Asia/Seoul)"
        ) from None


@dataclass(frozen=True)
class Window:
    """Whole days ``first`` to ``last`` (both included) in time zone ``tz``."""

    first: date
    last: date
    tz: str

    @classmethod
    def of(
        cls,
        tz: str,
        days: int = 30,
        since: date | None = None,
        until: date | None = None,
        now: datetime | None = None,
    ) -> Window:
        zone_ = zone(tz)
        if days < 1:
            raise ConfigurationError("--days must be at least 1")
        today = (now or datetime.now(UTC)).astimezone(zone_).date()
        last = until or (since + timedelta(days=days - 1) if since else today)
        first = since or last - timedelta(days=days - 1)
        if first > last:
            raise ConfigurationError(f"--since {first} is after --until {last}")
        return cls(first, last, tz)

    def days(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range((self.last - self.first).days + 1)]

    def starts(self) -> list[datetime]:
        """The first instant of every day and of the day after the last, in
        UTC (naive, as "createdAt" holds them)."""
        zone_ = zone(self.tz)
        out = []
        for d in [*self.days(), self.last + timedelta(days=1)]:
            local = datetime(d.year, d.month, d.day, tzinfo=zone_)
            out.append(local.astimezone(UTC).replace(tzinfo=None))
        return out

    def bounds(self) -> tuple[datetime, datetime]:
        """The window as UTC instants, the end excluded."""
        starts = self.starts()
        return starts[0], starts[-1]


def _avg(total: int | Decimal, n: int, places: int) -> float | None:
    if not n:
        return None
    return float(round(Decimal(total) / Decimal(n), places))


def _pct(part: int, whole: int) -> float | None:
    if not whole:
        return None
    return float(round(Decimal(part) / Decimal(whole) * 100, 2))


# --- from the rollups -------------------------------------------------------

# the rollups hold rows to add up per key (one each after a compaction)
SERVICES = (
    "SELECT service, sum(interactions), sum(users), sum(ratings), sum(rating_sum) "
    "FROM usertrail_rollup_services GROUP BY service HAVING sum(interactions) > 0 "
    "ORDER BY 2 DESC, 1"
)
THEMES = (
    "SELECT theme, sum(interactions), sum(ratings), sum(rating_sum) FROM usertrail_rollup_themes "
    "GROUP BY theme HAVING sum(interactions) > 0 ORDER BY 2 DESC, 1"
)
ENGAGEMENT = (
    # the day of a bucket by a binary search among the days' first instants
    # (no time zone arithmetic per row)
    "SELECT width_bucket(bucket, %(starts)s::timestamp[]) AS day, type, sum(interactions) "
    "FROM usertrail_rollup_engagement WHERE bucket >= %(lo)s AND bucket < %(hi)s "
    "GROUP BY 1, 2 HAVING sum(interactions) > 0 ORDER BY 1, 2"
)
SEGMENTS = (
    "SELECT segment, sum(users), sum(confidences), sum(confidence_sum) "
    "FROM usertrail_rollup_segments GROUP BY segment HAVING sum(users) > 0"
)


def _services(rows: list[tuple[Any, ...]]) -> Json:
    return [
        {
            "service": s,
            "interactions": int(n),
            "users": int(u),
            "ratings": int(r),
            "averageRating": _avg(total, int(r), 4),
        }
        for s, n, u, r, total in rows
    ]


def _ratings(services: Json) -> Json:
    rated = [s for s in services if s["ratings"]]
    rated.sort(key=lambda s: (-s["averageRating"], s["service"]))
    return [
        {"service": s["service"], "ratings": s["ratings"], "averageRating": s["averageRating"]}
        for s in rated
    ]


def _themes(rows: list[tuple[Any, ...]]) -> Json:
    return [
        {
            "theme": t,
            "interactions": int(n),
            "ratings": int(r),
            "averageRating": _avg(total, int(r), 4),
        }
        for t, n, r, total in rows
    ]


def _engagement(window: Window, rows: list[tuple[Any, ...]]) -> Json:
    by_day: dict[date, dict[str, int]] = {}
    for day, type_, n in rows:
        by_day.setdefault(day, {})[type_] = int(n)
    days = []
    for d in window.days():
        types = by_day.get(d, {})
        days.append({"day": d.isoformat(), "total": sum(types.values()), "types": types})
    return {
        "timeZone": window.tz,
        "since": window.first.isoformat(),
        "until": window.last.isoformat(),
        "days": days,
    }


def _segments(rows: list[tuple[Any, ...]]) -> Json:
    total = sum(int(r[1]) for r in rows)
    assigned = [r for r in rows if r[0] is not None]
    with_segments = sum(int(r[1]) for r in assigned)
    distribution = [
        {"segment": s, "count": int(n), "avgConfidence": _avg(csum, int(c), 2)}
        for s, n, c, csum in assigned
    ]
    distribution.sort(key=lambda d: (-d["count"], d["segment"]))
    return {
        "total": total,
        "withSegments": with_segments,
        "percentage": _pct(with_segments, total),
        "distribution": distribution,
    }


async def _all(conn: psycopg.AsyncConnection[Any], query: str, params: Any = None) -> Any:
    return await (await conn.execute(query, params)).fetchall()


async def services(conn: psycopg.AsyncConnection[Any]) -> Json:
    return _services(await _all(conn, SERVICES))


async def ratings(conn: psycopg.AsyncConnection[Any]) -> Json:
    return _ratings(await services(conn))


async def themes(conn: psycopg.AsyncConnection[Any]) -> Json:
    return _themes(await _all(conn, THEMES))


async def engagement(conn: psycopg.AsyncConnection[Any], window: Window) -> Json:
    starts = window.starts()
    days = window.days()
    rows = await _all(conn, ENGAGEMENT, {"starts": starts, "lo": starts[0], "hi": starts[-1]})
    return _engagement(window, [(days[i - 1], t, n) for i, t, n in rows])


async def segments(conn: psycopg.AsyncConnection[Any]) -> Json:
    return _segments(await _all(conn, SEGMENTS))


# --- the seeds' SQL over the rows (what the rollups must equal) ------------

SEED_SERVICES = (
    # seed 000, "Most Popular Services", with the users and ratings beside
    'SELECT service, count(id), count(DISTINCT "userId"), count(rating), '
    'coalesce(sum(rating), 0) FROM "UserInteraction" GROUP BY service '
    "ORDER BY count(id) DESC, service"
)
SEED_THEMES = (
    'SELECT theme, count(id), count(rating), coalesce(sum(rating), 0) FROM "UserInteraction" '
    "WHERE theme IS NOT NULL GROUP BY theme ORDER BY count(id) DESC, theme"
)
SEED_ENGAGEMENT = (
    # seed 000, "User Engagement Over Time", by day (in the time zone) and type
    "SELECT ((\"createdAt\" AT TIME ZONE 'UTC') AT TIME ZONE %(tz)s)::date, type, count(id) "
    'FROM "UserInteraction" WHERE "createdAt" >= %(lo)s AND "createdAt" < %(hi)s '
    "GROUP BY 1, 2 ORDER BY 1, 2"
)
SEED_COVERAGE = (
    # seed 002, "Count records with segments assigned"
    'SELECT COUNT(*) as total, COUNT("primarySegment") as with_segments FROM user_vectors'
)
SEED_DISTRIBUTION = (
    # seed 002, "Distribution of primary segments" (the seed's ROUND needs a
    # numeric: PostgreSQL has no round(double precision, integer))
    'SELECT "primarySegment", COUNT(*) as count, '
    'ROUND(AVG("segmentConfidence")::numeric, 2) as avg_confidence FROM user_vectors '
    'WHERE "primarySegment" IS NOT NULL GROUP BY "primarySegment" ORDER BY count DESC, 1'
)


async def from_rows(conn: psycopg.AsyncConnection[Any], window: Window) -> dict[str, Json]:
    """Every report, computed by the seeds' SQL over the rows."""
    svc = _services(await _all(conn, SEED_SERVICES))
    lo, hi = window.bounds()
    total, with_segments = (await _all(conn, SEED_COVERAGE))[0]
    distribution = [
        {"segment": s, "count": int(n), "avgConfidence": None if a is None else float(a)}
        for s, n, a in await _all(conn, SEED_DISTRIBUTION)
    ]
    return {
        "services": svc,
        "ratings": _ratings(svc),
        "engagement": _engagement(
            window, await _all(conn, SEED_ENGAGEMENT, {"tz": window.tz, "lo": lo, "hi": hi})
        ),
        "themes": _themes(await _all(conn, SEED_THEMES)),
        "segments": {
            "total": int(total),
            "withSegments": int(with_segments),
            "percentage": _pct(int(with_segments), int(total)),
            "distribution": distribution,
        },
    }


async def from_rollups(conn: psycopg.AsyncConnection[Any], window: Window) -> dict[str, Json]:
    svc = await services(conn)
    return {
        "services": svc,
        "ratings": _ratings(svc),
        "engagement": await engagement(conn, window),
        "themes": await themes(conn),
        "segments": await segments(conn),
    }


# every rollup row against the rows, beyond what one report's window shows
EXACT = {
    "engagement buckets": (
        "SELECT bucket, type, sum(interactions) FROM usertrail_rollup_engagement "
        "GROUP BY 1, 2 HAVING sum(interactions) <> 0",
        "SELECT date_bin('15 minutes', \"createdAt\", TIMESTAMP '2000-01-01'), type, count(*) "
        'FROM "UserInteraction" WHERE "createdAt" IS NOT NULL GROUP BY 1, 2',
    ),
    "users per service": (
        'SELECT service, "userId" FROM usertrail_rollup_service_users',
        'SELECT DISTINCT service, "userId" FROM "UserInteraction"',
    ),
}


async def compare(conn: psycopg.AsyncConnection[Any], window: Window) -> list[str]:
    """What differs between the rollups and the seeds' SQL over the rows:
    the reports (engagement over ``window``), every engagement bucket and
    every (service, user) pair. Empty: nothing. ``conn``: autocommit."""
    async with conn.transaction():  # one snapshot for both sides
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        rolled = await from_rollups(conn, window)
        seed = await from_rows(conn, window)
        differ = [name for name in rolled if rolled[name] != seed[name]]
        for name, (ours, theirs) in EXACT.items():
            query = f"SELECT count(*) FROM (({ours}) EXCEPT ({theirs})) a"
            query += f" UNION ALL SELECT count(*) FROM (({theirs}) EXCEPT ({ours})) b"
            if any(n for (n,) in await _all(conn, query)):
                differ.append(name)
    return differ


REPORTS = ("services", "engagement", "ratings", "themes", "segments")
