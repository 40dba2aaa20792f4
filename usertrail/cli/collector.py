"""The HTTP collector and its API keys: ``collector`` and ``keys``."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from usertrail.cli.common import at_least_one
from usertrail.errors import ConfigurationError
from usertrail.settings import Settings


def cmd_collector(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.collector.app import Collector, Limits, serve
    from usertrail.collector.keys import KeyRing

    updates = {
        name: value
        for name, value in (
            ("collector_host", args.host),
            ("collector_port", args.port),
            ("collector_max_body_bytes", args.max_body_bytes),
            ("collector_max_events", args.max_events),
        )
        if value is not None
    }
    if args.cors_origin:
        updates["collector_cors_origins"] = ",".join(args.cors_origin)
    settings = settings.model_copy(update=updates)
    if settings.collector_max_events > settings.collector_buffer_events:
        raise ConfigurationError(
            f"--max-events {settings.collector_max_events} is more than the buffer holds "
            f"(USERTRAIL_COLLECTOR_BUFFER_EVENTS={settings.collector_buffer_events})"
        )
    origins = frozenset(o.strip() for o in settings.collector_cors_origins.split(",") if o.strip())
    collector = Collector(
        settings,
        KeyRing(settings.database_dsn()),
        Limits(settings.collector_max_body_bytes, settings.collector_max_events),
        origins,
    )
    asyncio.run(serve(collector, settings.collector_host, settings.collector_port))
    return 0


def _row(key: Any) -> dict[str, Any]:
    return {
        "id": key.id,
        "source": key.source,
        "name": key.name,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.collector import keys

    dsn = settings.database_dsn()
    if args.keys_command == "create":
        key, secret = keys.create(dsn, args.source, args.name)
        if args.json:
            print(json.dumps({**_row(key), "key": secret}))
        else:
            print(secret)
            print(f"(key {key.id} for source {key.source!r}: shown once, store it now)")
        return 0
    if args.keys_command == "revoke":
        key = keys.revoke(dsn, args.id)
        print(json.dumps(_row(key)) if args.json else f"revoked {key.id} ({key.source})")
        return 0
    rows = keys.list_keys(dsn)
    if args.json:
        print(json.dumps([_row(k) for k in rows]))
        return 0
    if not rows:
        print("(no API keys: usertrail keys create --source APP)")
        return 0
    print(f"{'id':<12}  {'source':<24}  {'created':<20}  {'revoked':<20}  name")
    for k in rows:
        revoked = k.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if k.revoked_at else "-"
        print(
            f"{k.id:<12}  {k.source:<24}  {k.created_at.strftime('%Y-%m-%d %H:%M:%S'):<20}  "
            f"{revoked:<20}  {k.name or ''}"
        )
    return 0


def add(sub: Any, common: argparse.ArgumentParser) -> None:
    """The subcommands of this module, on ``sub``."""
    collector = sub.add_parser(
        "collector",
        parents=[common],
        help="HTTP collector: POST /v1/events for apps that cannot speak Kafka",
        description="Take batches of events over HTTP (POST /v1/events, a JSON array), "
        "validate each with the event contract, and publish the valid ones with the SDK's "
        "client (spooled under the data directory when the broker is away, delivered when it "
        "is back). The API key (usertrail keys) decides each event's source. GET /health, "
        "GET /openapi.json. SIGTERM finishes the requests in progress and delivers (or "
        "spools) everything accepted, then exits.",
    )
    collector.add_argument(
        "--host",
        metavar="ADDRESS",
        help="address to listen on; 0.0.0.0 for every one "
        "[env USERTRAIL_COLLECTOR_HOST; default 127.0.0.1]",
    )
    collector.add_argument(
        "--port", type=int, metavar="PORT", help="[env USERTRAIL_COLLECTOR_PORT; default 8787]"
    )
    collector.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="a browser origin allowed to send (https://app.example.com), repeatable; * for "
        "any [env USERTRAIL_COLLECTOR_CORS_ORIGINS, comma-separated; default none]",
    )
    collector.add_argument(
        "--max-body-bytes",
        type=at_least_one,
        metavar="N",
        help="largest request body; larger is 413 "
        "[env USERTRAIL_COLLECTOR_MAX_BODY_BYTES; default 1048576]",
    )
    collector.add_argument(
        "--max-events",
        type=at_least_one,
        metavar="N",
        help="most events per request; more is 413 "
        "[env USERTRAIL_COLLECTOR_MAX_EVENTS; default 1000]",
    )
    collector.set_defaults(func=cmd_collector)

    keys_parser = sub.add_parser(
        "keys",
        parents=[common],
        help="API keys of the collector: create, list, revoke",
        description="One key per emitting app: its events are stamped with the key's source. "
        "Only a hash of each key is stored; `create` shows the key once. A revoked key stops "
        "working within 5 seconds on every running collector.",
    )
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser(
        "create",
        parents=[common],
        help="make a key for a source",
        description="Make an API key whose events get SOURCE; print it once (only its hash "
        "is stored).",
    )
    create.add_argument("--source", required=True, help="the app the key's events come from")
    create.add_argument("--name", help="a note for people (who holds it, where it is used)")
    listing = keys_sub.add_parser(
        "list",
        parents=[common],
        help="every key, revoked ones too",
        description="Every key: id, source, when it was made and revoked, its note.",
    )
    revoke = keys_sub.add_parser(
        "revoke",
        parents=[common],
        help="stop a key from working",
        description="Revoke a key by its id; running collectors refuse it within 5 seconds.",
    )
    revoke.add_argument("id", help="the key's id (usertrail keys list)")
    for parser in (create, listing, revoke):
        parser.add_argument("--json", action="store_true", help="JSON for machines")
    keys_parser.set_defaults(func=cmd_keys)
