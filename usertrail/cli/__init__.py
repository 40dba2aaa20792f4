"""The ``usertrail`` command: one module per group of subcommands, each
adding its parsers (``add``) and holding its commands (``cmd_*``).

Every subcommand takes the connection options (``common.py``); a flag wins
over the environment (``USERTRAIL_*``, ``KAFKA_BOOTSTRAP_SERVERS``,
``DATABASE_URL``), which wins over the defaults (the embedded stack that
``usertrail up`` runs).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import psycopg
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from usertrail import __version__, logs
from usertrail.cli import admin, analytics, collector, replay, up, workers
from usertrail.cli.common import common_options, settings_from
from usertrail.errors import BrokerUnavailableError, DatabaseUnavailableError, UsertrailError
from usertrail.kafka import never_create_topics
from usertrail.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="usertrail",
        description="Event-sourced user-interaction tracking: SDK -> Kafka -> stream "
        "aggregates and segments -> PostgreSQL.",
        epilog="Exit codes: 0 done; 1 differences found (verify, db check); 2 a usage, "
        "configuration or runtime error (one line on stderr); 3 the broker's log is not the "
        "one the stored positions belong to (docs/log.md); 4 the broker cannot be reached; "
        "5 the database cannot be reached; 6 a sink or stream worker stalled (no partitions, or "
        "behind and reading nothing, for USERTRAIL_STALL_SECONDS): start it again; "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"usertrail {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (up, workers, collector, analytics, replay, admin):
        group.add(sub, common)
    return parser


def _fail(exc: UsertrailError, log_format: str = "text") -> int:
    """One line on stderr (in JSON, one object, as every log line is then);
    the error's exit code (README, "Exit codes")."""
    if log_format == "json":
        print(logs.error_line(str(exc), exc.exit_code), file=sys.stderr, flush=True)
    else:
        print(f"usertrail: error: {exc}", file=sys.stderr, flush=True)
    # clients left open by the failed command are not worth a report each
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return exc.exit_code


WORKER_COMMANDS = ("up", "sink", "stream", "collector", "dashboard")
"""The long-running commands: they log what the broker's outages do to them."""

SDK_COMMANDS = ("demo", "collector")
"""Apps of the SDK: they leave aiokafka as an app's is (``never_create_topics``)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        parser.error(str(exc))
    logs.configure(settings.log_level, settings.log_format)
    if logging.root.level > logging.DEBUG:  # DEBUG: theirs too
        for noisy in ("aiokafka", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if args.command in WORKER_COMMANDS and logging.root.level <= logging.INFO:
            # a worker's group joins, revocations and coordinator moves: one
            # line each per rebalance, what an operator reads a stall by
            logging.getLogger("aiokafka.consumer.group_coordinator").setLevel(logging.INFO)
    if args.command not in WORKER_COMMANDS:
        # a one-off command says what went wrong in one line, below; aiokafka's
        # own reports of a broker that is down would repeat it (workers keep
        # them: they retry and log each outage)
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.command not in SDK_COMMANDS:
        never_create_topics()  # topics are made by ensure_topics alone (usertrail/kafka.py)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, settings)
    except UsertrailError as exc:
        return _fail(exc, settings.log_format)
    except KafkaError as exc:
        return _fail(
            BrokerUnavailableError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}"),
            settings.log_format,
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(
            DatabaseUnavailableError(f"cannot reach PostgreSQL: {first}"), settings.log_format
        )
    except KeyboardInterrupt:
        return 130


__all__ = ["main", "build_parser", "settings_from"]
