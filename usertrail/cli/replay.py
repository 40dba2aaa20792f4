"""Commands that rebuild or check projections from the log: replay stream,
replay db, verify and segments backfill."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import psycopg

from usertrail.cli.common import (
    Progress,
    add_rules_argument,
    print_validation,
    quiet_sink,
    rules_from,
    timestamp,
)
from usertrail.settings import Settings


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.replay.stream import replay_stream

    bar = Progress("replay")
    started = time.monotonic()
    written = asyncio.run(
        replay_stream(
            settings,
            rules_from(args, settings),
            since=args.since,
            allow_shrink=args.allow_shrink,
            progress=bar,
        )
    )
    bar.close()
    print(
        f"replayed {written['records']:,} events into {written['users']:,} profiles "
        f"({written['removed']:,} removed) in {time.monotonic() - started:.1f}s; "
        f"workers of {settings.stream_app_id!r} carry on after them"
        + ("" if written["committed"] else " (from the applied offsets; see the warning)")
        + (
            f"; {written['copied_home']:,} records a producer put away from their user's "
            "home partition were copied there, for the workers to fold"
            if written["copied_home"]
            else ""
        )
    )
    return 0


def cmd_replay_db(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.replay.db import replay_db

    progress = Progress("replay db")
    started = time.monotonic()
    quiet_sink()
    counts = replay_db(
        settings,
        group=args.group,
        in_place=args.in_place,
        allow_shrink=args.allow_shrink,
        progress=progress,
    )
    progress.close()
    print(
        f"rebuilt {', '.join(f'{t} ({n:,} rows)' for t, n in counts.items())} "
        f"{'in place' if args.in_place else 'and swapped them in'} in "
        f"{time.monotonic() - started:.1f}s; sink group {args.group!r} carries on after them"
    )
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.replay import stream as replay

    different = False
    current = None  # the live table, read once for the checks against the log and the rows
    if args.only in (None, "profiles"):
        current, folded, differences = asyncio.run(
            replay.verify_profiles(settings, rules_from(args, settings))
        )
        live = len(current.states)
        print(f"profiles: {live:,} live, {folded:,} from the log, {len(differences):,} differ")
        for d in differences[: args.limit]:
            print(f"  {d.key}: {d.what}")
        if len(differences) > args.limit:
            print(f"  ... and {len(differences) - args.limit:,} more")
        different |= bool(differences)
    if args.only in (None, "database"):
        from usertrail.replay.db import verify_db

        quiet_sink()
        for t in verify_db(settings, limit=args.limit):
            print(f"{t.table}: {t.live:,} live, {t.rebuilt:,} from the log, {t.differing:,} differ")
            for label, kind, keys in (
                ("differs", "differ", t.differ),
                ("live only", "only_live", t.only_live),
                ("missing from the live table", "only_rebuilt", t.only_rebuilt),
            ):
                for key in keys[: args.limit]:
                    print(f"  {key}: {label}")
                if t.totals[kind] > len(keys[: args.limit]):
                    print(f"  ... and {t.totals[kind] - len(keys[: args.limit]):,} more {label}")
            different |= t.differing > 0
    if args.only in (None, "rows"):
        from usertrail.replay.crosscheck import cross_check

        current = current or asyncio.run(replay.live_states(settings))
        profiles = {key.decode(): state.profile for key, state in current.states.items()}
        disagree = cross_check(settings, profiles)
        print(
            f"rows: {len(profiles):,} profiles against SQL over the rows, "
            f"{len(disagree):,} users differ"
        )
        for user in disagree[: args.limit]:
            n = user.open_dead_letters
            pending = f" ({n:,} dead letters open)" if n else ""
            print(f"  {user.user_id}: differs: {', '.join(user.fields)}{pending}")
        if len(disagree) > args.limit:
            print(f"  ... and {len(disagree) - args.limit:,} more")
        different |= bool(disagree)
    if args.only in (None, "analytics"):
        from usertrail.analytics.reports import EXACT, REPORTS, Window, compare

        async def analytics() -> list[str]:
            async with await psycopg.AsyncConnection.connect(
                settings.database_dsn(), autocommit=True
            ) as conn:
                return await compare(conn, Window.of(settings.analytics_timezone))

        wrong = asyncio.run(analytics())
        print(
            f"analytics: {len(REPORTS) + len(EXACT)} rollup checks against the seeds' SQL over "
            f"the rows, {len(wrong)} differ"
        )
        for name in wrong:
            print(f"  {name}: differs")
        different |= bool(wrong)
    return 1 if different else 0


def cmd_segments(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.migrations import runner
    from usertrail.replay.backfill import backfill

    rules = rules_from(args, settings)
    progress = Progress("backfill")
    result = backfill(settings.database_dsn(), rules, progress=progress)
    progress.close()
    print(
        f"segments computed for {result.users:,} users ({result.created:,} vectors created) "
        f"from {result.interactions:,} interactions"
        + (
            f"; {result.refused:,} rows the event contract refuses left out"
            if result.refused
            else ""
        )
    )
    print()
    engine = runner.make_engine(settings)
    try:
        print_validation(runner.validate(engine))
    finally:
        engine.dispose()
    return 0


def add(sub: Any, common: argparse.ArgumentParser) -> None:
    """The subcommands of this module, on ``sub``."""
    replay_parser = sub.add_parser(
        "replay",
        help="rebuild projections from the log",
        description="Rebuild what is derived from usertrail.events by reading the log again.",
    )
    replay_sub = replay_parser.add_subparsers(dest="replay_command", required=True)
    replay_stream = replay_sub.add_parser(
        "stream",
        parents=[common],
        help="rebuild every profile (stop the stream workers first)",
        description="Read usertrail.events with plain aiokafka up to its current end, fold it "
        "with the worker's own functions, write each user's final profile once to the "
        "table's changelog and to usertrail.profiles, and set the worker group's offsets "
        "so workers started afterwards carry on exactly after the rebuilt point. Users "
        "the rebuild does not have are removed (with --allow-shrink only). Refuses while "
        "workers of the group run. "
        "To roll out a changed segment rule: stop the workers, replay with --rules, "
        "start the workers with the same --rules, then verify.",
    )
    replay_stream.add_argument(
        "--from",
        dest="since",
        type=timestamp,
        metavar="TIME",
        help="fold only events that happened at or after TIME (ISO 8601 with a zone); "
        "found per partition by a binary search over occurredAt",
    )
    replay_stream.add_argument(
        "--allow-shrink",
        action="store_true",
        help="remove live profiles the log does not hold (refused by default: a log that "
        "was reset or emptied would remove them all; the refusal lists them). A --from "
        "replay removes the users with no event since TIME anyway",
    )
    add_rules_argument(replay_stream)
    replay_stream.set_defaults(func=cmd_replay)
    replay_db = replay_sub.add_parser(
        "db",
        parents=[common],
        help="rebuild the database projections from the topics (stop the sinks first)",
        description='Rebuild "UserInteraction", "UserPreferences" and user_vectors from '
        "usertrail.events and usertrail.profiles, up to their current ends, with the sink "
        "itself, into shadow tables the migrations make (same columns, defaults, indexes, "
        "constraints and names), then swap them in within one transaction: readers see the "
        "old tables or the new ones, never a half-built one. The sink group's positions "
        "come along, so sinks started afterwards carry on after the rebuilt point. Refuses "
        "while sinks of the group run, and to swap in fewer rows than the live tables hold "
        "unless --allow-shrink.",
    )
    replay_db.add_argument(
        "--in-place",
        action="store_true",
        help="write straight into the live tables (they must be empty: a new database)",
    )
    replay_db.add_argument(
        "--group",
        default="usertrail-sink",
        metavar="NAME",
        help="the sink group whose positions the rebuilt tables carry (default usertrail-sink)",
    )
    replay_db.add_argument(
        "--allow-shrink",
        action="store_true",
        help="swap in rebuilt tables with fewer rows than the live ones (refused by default: "
        "a log that was reset or emptied would empty the tables; the refusal prints the "
        "counts and the first keys that would go)",
    )
    replay_db.set_defaults(func=cmd_replay_db)

    segments_parser = sub.add_parser(
        "segments",
        help="segments in the database: backfill",
        description="Segments of users already in the database.",
    )
    segments_sub = segments_parser.add_subparsers(dest="segments_command", required=True)
    backfill_parser = segments_sub.add_parser(
        "backfill",
        parents=[common],
        help="seed 002's data migration: segments for every user from the database",
        description="For databases that existed before the pipeline: fold each user's "
        '"UserInteraction" rows and "UserPreferences" (preferred themes and services as '
        "onboarding answers) with the stream's own functions, write segments, "
        "primarySegment, segmentConfidence and lastSegmentUpdate to user_vectors (creating "
        "missing rows), then print seed 002's validation report. Idempotent: a second run "
        "writes the same values.",
    )
    add_rules_argument(backfill_parser)
    backfill_parser.set_defaults(func=cmd_segments)

    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="compare the live profiles and tables with what the log implies",
        description="Fold usertrail.events afresh and compare every user's state with the "
        "stream table's changelog (what workers recover); rebuild the database "
        "projections into scratch shadow tables and compare them with the live tables; "
        "compare every live profile with SQL over the rows (counts by type, service and "
        "theme, ratings, first and last activity, preferences, and favourite themes by the "
        "seed's query), which shares nothing with the fold; compare the analytics rollups "
        "with the seeds' own SQL over the rows. "
        "Prints per table the counts and each differing key; exit code 1 on any difference. "
        "Nothing live is written.",
    )
    add_rules_argument(verify)
    verify.add_argument(
        "--only",
        choices=["profiles", "database", "rows", "analytics"],
        help="check only the stream's profiles against the log, only the database against "
        "the log, only the profiles against the rows, or only the analytics rollups against "
        "the seeds' SQL over the rows (default: all four)",
    )
    verify.add_argument(
        "--limit", type=int, default=50, metavar="N", help="differences listed (default 50)"
    )
    verify.set_defaults(func=cmd_verify)
