"""The analytics: ``analytics`` (the reports, in a table or JSON) and
``dashboard`` (the JSON API and the page)."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import date
from typing import Any

import psycopg

from usertrail.errors import ConfigurationError
from usertrail.settings import Settings


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (YYYY-MM-DD)") from None


def _days(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 3660:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days from 1 to 3660")
    return n


async def _report(settings: Settings, name: str, window: Any) -> Any:
    from usertrail.analytics import reports

    try:
        async with await psycopg.AsyncConnection.connect(
            settings.database_dsn(), autocommit=True
        ) as conn:
            if name == "engagement":
                return await reports.engagement(conn, window)
            return await getattr(reports, name)(conn)
    except psycopg.errors.UndefinedTable:
        raise ConfigurationError(
            "the database has no analytics rollups: run `usertrail db migrate`"
        ) from None


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in cells:
        line = "  ".join(
            v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))
        )
        print(line.rstrip())


def _avg(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}"


def cmd_analytics(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.analytics.reports import Window

    name = args.report
    window = None
    if name == "engagement":
        tz = args.tz or settings.analytics_timezone
        window = Window.of(tz, args.days, args.since, args.until)
    body = asyncio.run(_report(settings, name, window))
    if args.json:
        print(json.dumps(body))
        return 0
    if name == "services":
        _table(
            ["service", "interactions", "users", "ratings", "avg rating"],
            [
                [s["service"], s["interactions"], s["users"], s["ratings"]]
                + [_avg(s["averageRating"])]
                for s in body
            ],
        )
    elif name == "ratings":
        _table(
            ["service", "ratings", "avg rating"],
            [[s["service"], s["ratings"], f"{s['averageRating']:.4f}"] for s in body],
        )
    elif name == "themes":
        _table(
            ["theme", "interactions", "ratings", "avg rating"],
            [[t["theme"], t["interactions"], t["ratings"], _avg(t["averageRating"])] for t in body],
        )
    elif name == "segments":
        pct = "-" if body["percentage"] is None else f"{body['percentage']:.2f}%"
        print(f"{body['withSegments']:,} of {body['total']:,} users have a segment ({pct})")
        _table(
            ["segment", "count", "avg confidence"],
            [[d["segment"], d["count"], _avg(d["avgConfidence"])] for d in body["distribution"]],
        )
    else:
        types = sorted({t for d in body["days"] for t in d["types"]})
        print(f"{body['since']} to {body['until']}, days in {body['timeZone']}")
        _table(
            ["day", *types, "total"],
            [[d["day"], *(d["types"].get(t, 0) for t in types), d["total"]] for d in body["days"]],
        )
    return 0


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.analytics import reports
    from usertrail.analytics.api import serve

    host = args.host or settings.dashboard_host
    port = args.port or settings.dashboard_port
    tz = args.tz or settings.analytics_timezone
    reports.zone(tz)
    try:
        asyncio.run(serve(settings.database_dsn(), host, port, tz))
    except psycopg.errors.UndefinedTable:
        raise ConfigurationError(
            "the database has no analytics rollups: run `usertrail db migrate`"
        ) from None
    except OSError as exc:
        if isinstance(exc, psycopg.Error):
            raise
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return 0


def add(sub: Any, common: argparse.ArgumentParser) -> None:
    """The subcommands of this module, on ``sub``."""
    analytics = sub.add_parser(
        "analytics",
        parents=[common],
        help="the seeds' analytics reports, from the rollups",
        description="Reports read from rollups the database keeps in the same transaction as "
        "the rows (docs/analytics.md): a few rows each, whatever the number of interactions. "
        "`usertrail verify` checks them against the seeds' SQL over the rows.",
    )
    reports_sub = analytics.add_subparsers(dest="report", required=True, metavar="REPORT")
    helps = {
        "services": "interactions, distinct users and ratings per service, most used first",
        "engagement": "interactions per day and type",
        "ratings": "average rating by service, best first",
        "themes": "interactions and ratings per theme",
        "segments": "segment coverage and distribution (seed 002's validation report)",
    }
    for name, text in helps.items():
        p = reports_sub.add_parser(name, parents=[common], help=text, description=text + ".")
        p.add_argument("--json", action="store_true", help="JSON for machines (as the API)")
        if name == "engagement":
            p.add_argument(
                "--days", type=_days, default=30, help="how many days, ending today [30]"
            )
            p.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="the first day")
            p.add_argument("--until", type=_day, metavar="YYYY-MM-DD", help="the last day [today]")
            p.add_argument(
                "--tz",
                metavar="ZONE",
                help="the time zone of the days, an IANA name "
                "[env USERTRAIL_ANALYTICS_TIMEZONE; default UTC]",
            )
    analytics.set_defaults(func=cmd_analytics)

    dashboard = sub.add_parser(
        "dashboard",
        parents=[common],
        help="the analytics dashboard and its JSON API",
        description="Serve the dashboard (GET /) and the reports as JSON (GET /api/v1/services, "
        "engagement, ratings, themes, segments, users/ID; GET /openapi.json, GET /health). "
        "The page refreshes itself every 5 seconds (?refresh=N) and requests nothing from "
        "outside this server.",
    )
    dashboard.add_argument(
        "--host",
        metavar="ADDRESS",
        help="address to listen on [env USERTRAIL_DASHBOARD_HOST; default 127.0.0.1]",
    )
    dashboard.add_argument(
        "--port", type=int, metavar="PORT", help="[env USERTRAIL_DASHBOARD_PORT; default 8788]"
    )
    dashboard.add_argument(
        "--tz",
        metavar="ZONE",
        help="the engagement chart's time zone [env USERTRAIL_ANALYTICS_TIMEZONE; default UTC]",
    )
    dashboard.set_defaults(func=cmd_dashboard)
