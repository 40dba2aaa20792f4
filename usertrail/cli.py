"""The ``usertrail`` command.

Every subcommand takes the connection options; a flag wins over the
environment (``USERTRAIL_*``, ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``),
which wins over the defaults (the embedded stack that ``usertrail up`` runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from usertrail.errors import UsertrailError
from usertrail.settings import Settings

log = logging.getLogger("usertrail")

# flag dest -> Settings field
_SETTING_FLAGS = {
    "bootstrap_servers": "kafka_bootstrap_servers",
    "database_url": "database_url",
    "data_dir": "data_dir",
    "partitions": "events_partitions",
    "kafka_port": "embedded_kafka_port",
    "postgres_port": "embedded_postgres_port",
    "log_level": "log_level",
}


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection (flag > environment > default)")
    g.add_argument("--bootstrap-servers", metavar="HOST:PORT",
                   help="Kafka brokers [env KAFKA_BOOTSTRAP_SERVERS; default: the embedded "
                        "broker on 127.0.0.1:19092]")
    g.add_argument("--database-url", metavar="URL",
                   help="PostgreSQL URL [env DATABASE_URL; default: the embedded PostgreSQL "
                        "on 127.0.0.1:55432/usertrail]")
    g.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="embedded data, spool files [env USERTRAIL_DATA_DIR; default .usertrail]")
    g.add_argument("--kafka-port", type=int, metavar="PORT",
                   help="embedded broker port [env USERTRAIL_EMBEDDED_KAFKA_PORT; default 19092]")
    g.add_argument("--postgres-port", type=int, metavar="PORT",
                   help="embedded PostgreSQL port [env USERTRAIL_EMBEDDED_POSTGRES_PORT; "
                        "default 55432]")
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="[env USERTRAIL_LOG_LEVEL; default INFO]")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    flags = {
        field: getattr(args, dest)
        for dest, field in _SETTING_FLAGS.items()
        if getattr(args, dest, None) is not None
    }
    return Settings(**flags)


# --- up ------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.embedded import EmbeddedStack
    from usertrail.topics import ensure_topics

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    stack = EmbeddedStack(
        data_dir=settings.data_dir,
        kafka_port=settings.embedded_kafka_port if settings.embedded_kafka else None,
        postgres_port=settings.embedded_postgres_port if settings.embedded_db else None,
        database=settings.embedded_database,
    )
    try:
        stack.start()
        created = asyncio.run(ensure_topics(settings))
        _check_database(settings)
        for name in created:
            log.info("created topic %s", name)
        print("usertrail is up", flush=True)
        print(f"  Kafka:      {settings.bootstrap_servers}"
              f"{'  (embedded tansu, memory only)' if settings.embedded_kafka else ''}")
        db = settings.embedded_database_url if settings.embedded_db else "(DATABASE_URL)"
        print(f"  PostgreSQL: {db}{'  (embedded)' if settings.embedded_db else ''}")
        print(f"  topics:     {settings.events_topic}, {settings.profiles_topic}, "
              f"{settings.dead_letter_topic}")
        if settings.embedded_kafka or settings.embedded_db:
            print("  connect other processes with:")
            print(f"    export KAFKA_BOOTSTRAP_SERVERS={settings.bootstrap_servers}")
            if settings.embedded_db:
                print(f"    export DATABASE_URL={settings.embedded_database_url}")
            print("  Ctrl-C stops everything started here.", flush=True)
            while True:
                time.sleep(3600)
        print("  real servers configured: nothing to run here yet.", flush=True)
        return 0
    except _Stop as stop:
        log.info("%s received; stopping", stop)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()


def _check_database(settings: Settings) -> None:
    import psycopg

    try:
        with psycopg.connect(settings.database_dsn(), connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        raise UsertrailError(f"cannot reach PostgreSQL: {exc}") from exc


# --- schema ----------------------------------------------------------------------
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


# --- demo ------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.producers import demo
    from usertrail.producers.client import TrackingClient

    async def go() -> tuple[int, Any]:
        async with TrackingClient(source="demo", settings=settings) as client:
            started = time.perf_counter()
            sent = await demo.run(
                client, demo.plan(users=args.users, events=args.events, seed=args.seed)
            )
            report = await client.flush()
            elapsed = time.perf_counter() - started
            print(f"sent {sent} events for {args.users} users in {elapsed:.1f}s "
                  f"({sent / max(elapsed, 1e-9):,.0f}/s); delivered {report.delivered}, "
                  f"spooled {report.spooled}")
            return sent, report

    _, report = asyncio.run(go())
    return 0 if report.spooled == 0 else 1


# --- parser ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="usertrail",
        description="Event-sourced user-interaction tracking: SDK -> Kafka -> stream "
                    "aggregates and segments -> PostgreSQL.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up", parents=[common], help="run the pipeline (embedded broker and database by default)",
        description="Start the embedded broker (tansu) and PostgreSQL unless real servers are "
                    "configured, create the topics, print how to connect, and run until "
                    "Ctrl-C or SIGTERM, which stop everything started here.")
    up.add_argument("--partitions", type=int, metavar="N",
                    help="partitions of usertrail.events when created "
                         "[env USERTRAIL_EVENTS_PARTITIONS; default 8]")
    up.set_defaults(func=cmd_up)

    schema = sub.add_parser(
        "schema", parents=[common], help="write the JSON Schema of every event kind",
        description="Write the JSON Schema of each event kind, for producers in other "
                    "languages. Without --out, print them all as one JSON object.")
    schema.add_argument("--out", type=Path, metavar="DIR",
                        help="write <kind>.schema.json files into DIR")
    schema.set_defaults(func=cmd_schema)

    demo = sub.add_parser(
        "demo", parents=[common], help="send realistic demo traffic through the SDK",
        description="Send demo traffic through the SDK: users with distinct habits (tarot and "
                    "love, career saju, critics, heavy users, new users with only onboarding).")
    demo.add_argument("--users", type=int, default=100, help="number of users (default 100)")
    demo.add_argument("--events", type=int, default=5000,
                      help="number of events in all (default 5000)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.root.level))
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, settings)
    except UsertrailError as exc:
        print(f"usertrail: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["main", "build_parser", "settings_from"]
