"""The one-off commands around the pipeline: schema, demo, dlq and db."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from usertrail.cli.common import print_validation
from usertrail.settings import Settings


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.producers.events import json_schemas

    schemas = json_schemas()
    if args.out is None:
        print(json.dumps(schemas, indent=2, sort_keys=True))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for kind, schema in schemas.items():
        path = args.out / f"{kind}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.producers import demo
    from usertrail.producers.client import TrackingClient

    async def go() -> tuple[int, Any]:
        # a tool run by hand: no broker is an error at once (exit code 4)
        async with TrackingClient(source="demo", settings=settings, offline_start=False) as client:
            started = time.perf_counter()
            sent = await demo.run(
                client, demo.plan(users=args.users, events=args.events, seed=args.seed)
            )
            report = await client.flush()
            elapsed = time.perf_counter() - started
            print(
                f"sent {sent} events for {args.users} users in {elapsed:.1f}s "
                f"({sent / max(elapsed, 1e-9):,.0f}/s); delivered {report.delivered}, "
                f"spooled {report.spooled}"
            )
            return sent, report

    _, report = asyncio.run(go())
    return 0 if report.spooled == 0 else 1


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.sink import dlq

    if args.dlq_command == "list":
        rows = dlq.list_dead_letters(
            settings, reason=args.reason, include_resolved=args.all, limit=args.limit
        )
        if args.json:
            print(json.dumps([r.as_json() for r in rows], indent=2))
            return 0
        for r in rows:
            state = f"resolved {r.resolved_at:%Y-%m-%d %H:%M}" if r.resolved_at else "open"
            print(
                f"#{r.id} {r.reason:<13} {r.topic}[{r.partition}]@{r.offset} "
                f"user={r.user_id or '-'} retries={r.retries} {state}\n    {r.error[:300]}"
            )
        print(f"{len(rows)} dead letter(s)")
        return 0
    resolved, failing = asyncio.run(
        dlq.retry(settings, reason=args.reason, unknown_users=args.unknown_users)
    )
    print(f"re-driven: {resolved} applied, {failing} still failing")
    return 0 if failing == 0 else 1


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.migrations import runner

    engine = runner.make_engine(settings)
    try:
        if args.db_command == "migrate":
            if args.adopt:
                stamped = runner.adopt(engine)
                if stamped:
                    print(f"adopted the existing tables as revision {stamped}")
            else:
                runner.upgrade(engine)
            print(f"database is at {runner.status(engine).current} (head)")
        elif args.db_command == "downgrade":
            runner.downgrade(engine, args.revision)
            print(f"database is at {runner.status(engine).current or 'base'}")
        elif args.db_command == "status":
            st = runner.status(engine)
            print(f"current revision: {st.current or '(none: empty database)'}")
            print(f"head revision:    {st.head}")
            for rev in st.applied:
                print(f"  applied  {rev}")
            for rev in st.pending:
                print(f"  pending  {rev}")
            print(
                "Database schema is up to date."
                if not st.pending
                else f"{len(st.pending)} migration(s) pending: run `usertrail db migrate`."
            )
        elif args.db_command == "check":
            differences = runner.check(engine)
            if differences:
                print("The database differs from the migrations:")
                for line in differences:
                    print(f"  - {line}")
                return 1
            print("No drift: the database matches the migrations.")
        elif args.db_command == "validate":
            report = runner.validate(engine)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print_validation(report)
        return 0
    except runner.SchemaDrift as exc:
        print(f"usertrail: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def add(sub: Any, common: argparse.ArgumentParser) -> None:
    """The subcommands of this module, on ``sub``."""
    schema = sub.add_parser(
        "schema",
        parents=[common],
        help="write the JSON Schema of every event kind",
        description="Write the JSON Schema of each event kind, for producers in other "
        "languages. Without --out, print them all as one JSON object.",
    )
    schema.add_argument(
        "--out", type=Path, metavar="DIR", help="write <kind>.schema.json files into DIR"
    )
    schema.set_defaults(func=cmd_schema)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="send realistic demo traffic through the SDK",
        description="Send demo traffic through the SDK: users with distinct habits (tarot and "
        "love, career saju, critics, heavy users, new users with only onboarding).",
    )
    demo.add_argument("--users", type=int, default=100, help="number of users (default 100)")
    demo.add_argument(
        "--events", type=int, default=5000, help="number of events in all (default 5000)"
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.set_defaults(func=cmd_demo)

    dlq_parser = sub.add_parser(
        "dlq",
        help="dead letters: list, retry",
        description="Events that failed validation or could not be applied, with their reason "
        "and original bytes (table usertrail_dead_letters).",
    )
    dlqsub = dlq_parser.add_subparsers(dest="dlq_command", required=True, metavar="DLQ_COMMAND")
    dlq_list = dlqsub.add_parser(
        "list",
        parents=[common],
        help="list dead letters",
        description="List open dead letters (--all: resolved too).",
    )
    dlq_list.add_argument(
        "--reason",
        help="only this reason (invalid, wrong_key, unknown_user, unapplicable, crashed)",
    )
    dlq_list.add_argument("--all", action="store_true", help="include resolved ones")
    dlq_list.add_argument("--limit", type=int, default=100, help="at most N (default 100)")
    dlq_list.add_argument("--json", action="store_true", help="print JSON")
    dlq_retry = dlqsub.add_parser(
        "retry",
        parents=[common],
        help="re-drive open dead letters through the sink",
        description="Re-drive open dead letters through the sink's writer, oldest first. Those "
        "that apply are marked resolved; the others stay open with one more retry.",
    )
    dlq_retry.add_argument("--reason", help="only this reason")
    dlq_retry.add_argument(
        "--unknown-users",
        choices=["create", "park"],
        default="park",
        help="for events of users still missing (default park: stay dead)",
    )
    dlq_parser.set_defaults(func=cmd_dlq)

    db = sub.add_parser(
        "db",
        help="the product's schema: migrate, downgrade, status, check, validate",
        description="Manage the PostgreSQL schema (the seeds' tables, exactly) with alembic.",
    )
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    migrate = dbsub.add_parser(
        "migrate",
        parents=[common],
        help="upgrade to the newest revision",
        description="Upgrade the database to the newest revision. With --adopt, tables that "
        "already exist (made by Prisma from the same seeds) are stamped instead "
        "of created when they match exactly; when they differ, nothing is changed "
        "and the differences are printed. Data is never dropped or rewritten.",
    )
    migrate.add_argument(
        "--adopt",
        action="store_true",
        help="adopt existing matching tables (the seed's 'Option B: baseline')",
    )
    down = dbsub.add_parser(
        "downgrade",
        parents=[common],
        help="downgrade to a revision (or 'base')",
        description="Downgrade to REV, running each revision's rollback (the seeds' rollback "
        "sections). Dropping the segment columns keeps every other column and row.",
    )
    down.add_argument("revision", metavar="REV", help="target revision id, 'base' or -N")
    dbsub.add_parser(
        "status",
        parents=[common],
        help="current revision and pending ones",
        description="Show the current revision, what is applied and what is pending "
        "(like `prisma migrate status`).",
    )
    dbsub.add_parser(
        "check",
        parents=[common],
        help="drift between the migrations and the live database",
        description="Compare the live tables (columns, types, defaults, nullability, indexes, "
        "constraints) with what the migrations define; exit code 1 and a list of "
        "differences when they differ.",
    )
    validate = dbsub.add_parser(
        "validate",
        parents=[common],
        help="seed 002 validation report (segment coverage)",
        description="Run the seed 002 validation queries: how many vectors have segments, the "
        "percentage, and the distribution of primary segments with their average "
        "confidence.",
    )
    validate.add_argument("--json", action="store_true", help="print JSON for machines")
    db.set_defaults(func=cmd_db)
