"""What every ``usertrail`` command shares: the connection options and the
settings they make (a flag wins over the environment, which wins over the
defaults), and the small helpers more than one command uses."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from usertrail.settings import Settings

if TYPE_CHECKING:
    from usertrail.stream.segments import Rules

# flag dest -> Settings field
_SETTING_FLAGS = {
    "bootstrap_servers": "kafka_bootstrap_servers",
    "database_url": "database_url",
    "data_dir": "data_dir",
    "partitions": "events_partitions",
    "kafka_port": "embedded_kafka_port",
    "broker": "embedded_broker",
    "brokers": "embedded_kafka_brokers",
    "postgres_port": "embedded_postgres_port",
    "log_level": "log_level",
    "log_format": "log_format",
    "instance_id": "group_instance_id",
}


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection (flag > environment > default)")
    g.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        help="Kafka brokers [env KAFKA_BOOTSTRAP_SERVERS; default: the embedded "
        "broker on 127.0.0.1:19092]",
    )
    g.add_argument(
        "--database-url",
        metavar="URL",
        help="PostgreSQL URL [env DATABASE_URL; default: the embedded PostgreSQL "
        "on 127.0.0.1:55432/usertrail]",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="embedded data and worker state [env USERTRAIL_DATA_DIR; default .usertrail]",
    )
    g.add_argument(
        "--kafka-port",
        type=int,
        metavar="PORT",
        help="embedded broker port [env USERTRAIL_EMBEDDED_KAFKA_PORT; default 19092]",
    )
    g.add_argument(
        "--postgres-port",
        type=int,
        metavar="PORT",
        help="embedded PostgreSQL port [env USERTRAIL_EMBEDDED_POSTGRES_PORT; default 55432]",
    )
    g.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="[env USERTRAIL_LOG_LEVEL; default INFO]",
    )
    g.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text: a line of prose per record; json: one JSON object per line (time, "
        "level, logger, message, pid, exception) for log collectors "
        "[env USERTRAIL_LOG_FORMAT; default text]",
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    flags = {
        field: getattr(args, dest)
        for dest, field in _SETTING_FLAGS.items()
        if getattr(args, dest, None) is not None
    }
    return Settings(**flags)


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


class Progress:
    """One stderr line, rewritten at most twice a second: done of total,
    rate and time left. Called with (done, total); shows nothing until the
    first call."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = self.shown = time.monotonic()
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.drawn and now - self.shown < 0.5 and done < total:
            return
        self.shown, self.drawn = now, True
        elapsed = now - self.started
        rate = done / elapsed if elapsed >= 0.5 else 0.0  # too early to tell
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}  "
            + (f"{rate:,.0f}/s  {(total - done) / rate:,.0f}s left " if rate else "")
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def rules_from(args: argparse.Namespace, settings: Settings) -> Rules:
    """The segment rules: --rules, else USERTRAIL_RULES, else the shipped ones."""
    from usertrail.stream.segments import load_rules

    return load_rules(args.rules or settings.rules)


def add_rules_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rules",
        type=Path,
        metavar="PATH",
        help="segment rules (TOML), the same the stream workers run with "
        "[env USERTRAIL_RULES; default: the shipped stream/rules.toml]",
    )


def timestamp(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (for example 2026-11-01T00:00:00Z)"
        ) from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +09:00)")
    return at


def quiet_sink() -> None:
    """A one-off rebuild reports at its end: the sink's partition assignments
    and seeks (INFO) are a running worker's log, not this command's output."""
    logging.getLogger("usertrail.sink").setLevel(max(logging.WARNING, logging.root.level))


def print_validation(report: dict[str, Any]) -> None:
    pct = "-" if report["percentage"] is None else f"{report['percentage']:.2f}"
    print(" total | with_segments | percentage")
    print(f" {report['total']:>5} | {report['with_segments']:>13} | {pct:>10}")
    print()
    rows = report["distribution"]
    width = max([len("primarySegment"), *(len(r["primarySegment"]) for r in rows)])
    print(f" {'primarySegment':<{width}} | count | avg_confidence")
    for r in rows:
        avg = "-" if r["avg_confidence"] is None else f"{r['avg_confidence']:.2f}"
        print(f" {r['primarySegment']:<{width}} | {r['count']:>5} | {avg:>14}")
    if not rows:
        print(" (no user has a primary segment yet)")
