"""The analytics at scale: each report from the rollups next to the seeds'
SQL over the rows, and the rollups' cost on the sink, in one run.

1. Latency: "UserInteraction" filled with ``--rows`` rows (default 10
   million: 100,000 users over a year, three services, four types and
   themes, ratings on most) and "user_vectors" with a profile per user, the
   rollups added up as migration 0009 adds up rows already there. Each
   report is timed ``--rounds`` times from the rollups (what ``usertrail
   analytics``, the API and the dashboard read) and by the seeds' own SQL
   over the rows; medians side by side, and the results checked equal.
   Target: every report under 50 ms.
2. Sink cost: the real sink writes the same topic of ``--sink-rows``
   events into a fresh database with the rollup triggers and into one
   without (disabled), alternating which goes first; the median ratio
   with/without. Target: a cost under 10% (ratio >= 0.9).

    ./dev bench analytics [--rows 10000000] [--rounds 5] [--sink-rows 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any

import brokers
import psycopg
import sink_rate
from pydantic import SecretStr
from usertrail.analytics import reports

from usertrail.embedded import EmbeddedPostgres, free_port
from usertrail.runtime import tune_gc

USERS = 100_000
# seed 000's queries as Prisma runs them (the reports add users and ratings
# beside them; those are checked equal with reports.from_rows)
SEED_POPULAR = (
    'SELECT service, count(id) FROM "UserInteraction" GROUP BY service ORDER BY count(id) DESC'
)
SEED_RATINGS = (
    'SELECT service, avg(rating) FROM "UserInteraction" WHERE rating IS NOT NULL GROUP BY service'
)
VERSIONS = Path(reports.__file__).resolve().parent.parent / "migrations" / "versions"
SEGMENTS = ["career-focused", "tarot-devotee", "saju-regular", "romance-focused", "advocate"]


def migration(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, VERSIONS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backfill() -> list[str]:
    """What the migrations add up for rows already there: 0009's sums, and
    the (service, user) pairs as 0010 keeps them."""
    sums = [
        statement
        for statement in migration("0009_rollups").BACKFILL.split(";")
        if statement.strip() and "usertrail_rollup_service_users" not in statement
    ]
    return [*sums, migration("0010_service_user_pairs").PAIRS_BACKFILL]


def fill(url: str, rows: int) -> float:
    """``rows`` interactions and a profile per user, written without the
    triggers (as rows that were there before the rollups), then added up
    as the migration does. Returns the seconds it took."""
    started = time.perf_counter()
    chunk = 1_000_000
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO \"User\" (id) SELECT 'user-' || g FROM generate_series(0, %s) g",
            (USERS - 1,),
        )
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'UserInteraction' "
            "AND indexname <> 'UserInteraction_pkey'"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.execute("SET session_replication_role = replica")  # no trigger, no FK check
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk) - 1
            conn.execute(
                """INSERT INTO "UserInteraction"
                     (id, "userId", "createdAt", type, service, theme, rating, metadata)
                   SELECT 'i-' || g, 'user-' || (g %% %(users)s),
                          TIMESTAMP '2026-01-01'
                            + make_interval(secs => g * 31536000.0 / %(rows)s),
                          (ARRAY['reading','chat','feedback','share'])[1 + g %% 4],
                          (ARRAY['saju','tarot','astrology'])[1 + (g / 7) %% 3],
                          (ARRAY[NULL,'love','career','health'])[1 + (g / 3) %% 4],
                          CASE WHEN g %% 5 = 0 THEN NULL ELSE 1 + (g / 11) %% 5 END,
                          '{"duration": 120}'::jsonb
                   FROM generate_series(%(lo)s, %(hi)s) g""",
                {"users": USERS, "rows": rows, "lo": lo, "hi": hi},
            )
            print(f"  {hi + 1:,} rows", flush=True)
        conn.execute(
            'INSERT INTO user_vectors (id, "userId", "updatedAt", segments, "primarySegment", '
            '"segmentConfidence", "lastSegmentUpdate") '
            "SELECT 'user-' || g, 'user-' || g, TIMESTAMP '2026-12-01', '[]'::jsonb, "
            "(ARRAY[NULL, %(segments)s])[1 + g %% 6], "
            "CASE WHEN g %% 6 = 0 THEN NULL ELSE 0.3 + (g %% 70) / 100.0 END, "
            "TIMESTAMP '2026-12-01' FROM generate_series(0, %(last)s) g",
            {"segments": SEGMENTS, "last": USERS - 1},
        )
        conn.execute("SET session_replication_role = DEFAULT")
        for _, definition in indexes:
            conn.execute(definition)
        for statement in backfill():
            conn.execute(statement)
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - started


async def timed(work: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await work()
    return (time.perf_counter() - started) * 1000, result


async def latency(url: str, rounds: int) -> list[tuple[str, float, float]]:
    window = reports.Window.of("Asia/Seoul", days=30, until=date(2026, 12, 31))
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        seed = await reports.from_rows(conn, window)
        rolled = await reports.from_rollups(conn, window)
        differ = [name for name in seed if seed[name] != rolled[name]]
        assert not differ, f"rollups differ from the seeds' SQL: {differ}"
        lo, hi = window.bounds()
        params = {"tz": window.tz, "lo": lo, "hi": hi}

        async def raw(sql: str, p: Any = None) -> Any:
            return await (await conn.execute(sql, p)).fetchall()

        async def raw_segments() -> Any:
            return (await raw(reports.SEED_COVERAGE), await raw(reports.SEED_DISTRIBUTION))

        pairs: dict[str, tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]]]] = {
            "services": (lambda: reports.services(conn), lambda: raw(SEED_POPULAR)),
            "ratings": (lambda: reports.ratings(conn), lambda: raw(SEED_RATINGS)),
            "engagement (30 days)": (
                lambda: reports.engagement(conn, window),
                lambda: raw(reports.SEED_ENGAGEMENT, params),
            ),
            "themes": (lambda: reports.themes(conn), lambda: raw(reports.SEED_THEMES)),
            "segments": (lambda: reports.segments(conn), raw_segments),
        }
        out = []
        for name, (ours, theirs) in pairs.items():
            fast, slow = [], []
            for r in range(rounds):
                # alternate which goes first: neither always finds the cache warmed
                order = [(fast, ours), (slow, theirs)]
                for times, work in order if r % 2 == 0 else reversed(order):
                    times.append((await timed(work))[0])
            out.append((name, statistics.median(fast), statistics.median(slow)))
            print(
                f"  {name:<22} rollups {statistics.median(fast):8.2f} ms (max {max(fast):.2f})"
                f"   seed SQL over the rows {statistics.median(slow):10.1f} ms",
                flush=True,
            )
        return out


def without_rollups(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("UserInteraction", "user_vectors"):
            for op in ("insert", "update", "delete"):
                conn.execute(f'ALTER TABLE "{table}" DISABLE TRIGGER usertrail_rollup_{op}')


async def sink_cost(pg: EmbeddedPostgres, broker: Any, tmp: Path, rows: int, rounds: int) -> float:
    events = sink_rate.make_events(rows)
    base = await sink_rate.filled_topic(broker.bootstrap_servers, tmp, events)
    del events
    tune_gc()
    ratios = []
    for r in range(rounds):
        rates = {}
        for rollups in (True, False) if r % 2 == 0 else (False, True):
            url = sink_rate.fresh_database(pg, "bench_sink")
            if not rollups:
                without_rollups(url)
            settings = base.model_copy(update={"database_url": SecretStr(url)})
            rates[rollups], _ = await sink_rate.sink_round(settings, rows, 5000, base.archiving)
            with psycopg.connect(url) as conn:
                got = conn.execute(
                    "SELECT coalesce(sum(interactions), 0) FROM usertrail_rollup_services"
                ).fetchone()
            assert got is not None and got[0] == (rows if rollups else 0), got
        ratios.append(rates[True] / rates[False])
        print(
            f"  round {r + 1}: sink with rollups {rates[True]:,.0f} rows/s, without "
            f"{rates[False]:,.0f} rows/s, ratio {ratios[-1]:.2f}",
            flush=True,
        )
    return statistics.median(ratios)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sink-rows", type=int, default=100_000)
    parser.add_argument("--skip-sink", action="store_true", help="only the latencies")
    brokers.add_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(data_dir=Path(tmp) / "pg", port=free_port(), database="bench")
        pg.start()
        try:
            url = brokers.migrated_database(pg, "bench_rollups")
            print(f'filling "UserInteraction" with {args.rows:,} rows ...', flush=True)
            seconds = fill(url, args.rows)
            print(f"filled and added up in {seconds:.0f} s", flush=True)
            print(f"report latency, median of {args.rounds} (results checked equal):")
            results = await latency(url, args.rounds)
            with psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", autocommit=True
            ) as conn:
                conn.execute('DROP DATABASE "bench_rollups" WITH (FORCE)')
            ratio = None
            if not args.skip_sink:
                print(f"sink with and without the rollups, {args.sink_rows:,} events:")
                with brokers.started(args.broker, Path(tmp)) as broker:
                    ratio = await sink_cost(pg, broker, Path(tmp), args.sink_rows, args.rounds)
        finally:
            pg.stop()
    worst = max(fast for _, fast, _ in results)
    print(
        f"\nslowest report from the rollups: {worst:.2f} ms (target < 50 ms) at "
        f"{args.rows:,} rows; speed-up over the seeds' SQL: "
        + ", ".join(f"{name} {slow / fast:,.0f}x" for name, fast, slow in results)
    )
    if ratio is not None:
        print(f"sink rows/s with the rollups / without, median: {ratio:.2f} (target >= 0.90)")


if __name__ == "__main__":
    asyncio.run(main())
