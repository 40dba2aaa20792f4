"""usertrail up (the embedded stack and its workers) and usertrail log restore."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

from usertrail.errors import UsertrailError
from usertrail.settings import Settings

log = logging.getLogger("usertrail")


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _worker_list(text: str) -> list[str]:
    names = [] if text.strip() == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - {"stream", "sink", "dashboard"})
    if unknown or not text.strip():
        raise argparse.ArgumentTypeError(
            f"unknown worker(s) {unknown}: give some of stream, sink, dashboard "
            "(comma-separated), or none"
        )
    return list(dict.fromkeys(names))


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.embedded import EmbeddedBroker, EmbeddedStack
    from usertrail.migrations import runner
    from usertrail.topics import ensure_topics

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    from usertrail.workers import Workers

    chosen = args.workers
    workers = Workers(settings, [[name] for name in chosen])
    stack = EmbeddedStack(
        data_dir=settings.data_dir,
        kafka_port=settings.embedded_kafka_port if settings.embedded_kafka else None,
        postgres_port=settings.embedded_postgres_port if settings.embedded_db else None,
        database=settings.embedded_database,
        broker=settings.embedded_broker,
        kafka_brokers=settings.embedded_kafka_brokers,
    )
    try:
        stack.start()
        created = asyncio.run(ensure_topics(settings))
        runner.prepare(settings, args.migrate)
        for name in created:
            log.info("created topic %s", name)
        restored = _restore_log(settings)
        print("usertrail is up", flush=True)
        print(
            f"  Kafka:      {settings.bootstrap_servers}"
            f"{_embedded_broker_label(settings) if settings.embedded_kafka else ''}"
        )
        db = settings.embedded_database_url if settings.embedded_db else "(DATABASE_URL)"
        print(f"  PostgreSQL: {db}{'  (embedded)' if settings.embedded_db else ''}")
        print(
            f"  topics:     {settings.events_topic}, {settings.profiles_topic}, "
            f"{settings.dead_letter_topic}"
        )
        if restored is not None:
            print(f"  log:        restored {restored.summary()} from the archive")
        if args.only_setup:
            print("  set-up done (--only-setup): topics and schema are ready.", flush=True)
            return 0
        if settings.embedded_kafka or settings.embedded_db:
            print("  connect other processes with:")
            print(f"    export KAFKA_BOOTSTRAP_SERVERS={settings.bootstrap_servers}")
            if settings.embedded_db:
                print(f"    export DATABASE_URL={settings.embedded_database_url}")
        described = {
            "stream": "stream (profiles and segments; GET "
            f"http://127.0.0.1:{settings.stream_web_port}/profiles/ID)",
            "sink": "sink (usertrail.events and usertrail.profiles -> PostgreSQL)",
            "dashboard": "dashboard (analytics: "
            f"http://{settings.dashboard_host}:{settings.dashboard_port}/)",
        }
        for i, name in enumerate(chosen):
            print(f"  {'workers:' if i == 0 else '':<12}{described[name]}")
        if not chosen:
            print("  workers:    none (--workers none)")
        print("  Ctrl-C stops everything started here.", flush=True)
        workers.start()
        while True:
            workers.watch()
            time.sleep(0.5)
    except _Stop as stop:
        log.info("%s received; stopping", stop)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        workers.stop()
        broker = stack.broker
        if isinstance(broker, EmbeddedBroker) and broker.pid:
            _archive_the_rest(settings)  # only from a broker that started
        stack.stop()


def _restore_log(settings: Settings) -> Any:
    """The embedded broker's log back from the archive (docs/log.md), before
    any worker starts or ``up`` says it is up."""
    if not settings.embedded_kafka:
        return None
    from usertrail.archive import restore

    restored = asyncio.run(restore(settings))
    return restored if any(restored.records.values()) else None


def _archive_the_rest(settings: Settings) -> None:
    """What the sink has not written yet, written (and archived) before the
    embedded tansu stops and its log with it."""
    from usertrail.sink.consumer import write_to_the_end

    log.info("reading every partition to its end before the embedded broker stops with its log")
    try:
        written = asyncio.run(write_to_the_end(settings))
    except (UsertrailError, TimeoutError, OSError) as exc:
        log.error("could not write the last records before stopping the broker: %s", exc)
        return
    if written:
        log.info("wrote the last %d records (and archived them) before stopping", written)


def cmd_log_restore(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.archive import restore

    restored = asyncio.run(restore(settings))
    print(f"restored {restored.summary()} from the archive")
    return 0


def _embedded_broker_label(settings: Settings) -> str:
    if settings.embedded_broker == "tansu":
        return "  (embedded tansu, memory only)"
    from usertrail.apache_kafka import KAFKA_VERSION

    n = settings.embedded_kafka_brokers
    return f"  (Apache Kafka {KAFKA_VERSION}, {n} broker{'s' if n > 1 else ''}, KRaft)"


def add(sub: Any, common: argparse.ArgumentParser) -> None:
    """The subcommands of this module, on ``sub``."""
    up = sub.add_parser(
        "up",
        parents=[common],
        help="run the pipeline (embedded broker and database by default)",
        description="Start the embedded broker (tansu) and PostgreSQL unless real servers are "
        "configured, create the topics, migrate the embedded database, run the "
        "pipeline's workers (the stream and the sink), print how to connect, and run "
        "until Ctrl-C or SIGTERM, which stop everything started here.",
    )
    up.add_argument(
        "--workers",
        type=_worker_list,
        default=["stream", "sink"],
        metavar="LIST",
        help="which workers to run: stream,sink (default), one of them, or none, and "
        "dashboard for the analytics page (stream,sink,dashboard); for example --workers "
        "sink while replaying the stream on the embedded broker, whose topics live only as "
        "long as `up` runs",
    )
    up.add_argument(
        "--broker",
        choices=["tansu", "kafka"],
        help="the broker to start when KAFKA_BOOTSTRAP_SERVERS is unset: tansu (memory "
        "only, starts at once) or kafka (Apache Kafka, KRaft; needs Java 17, fetches its "
        "jars with Maven the first time; its log is kept in the data directory) "
        "[env USERTRAIL_EMBEDDED_BROKER; default tansu]",
    )
    up.add_argument(
        "--brokers",
        type=int,
        choices=[1, 3],
        help="Apache Kafka nodes to run with --broker kafka, on --kafka-port and the ports "
        "after it (controllers on those + 100); 3 gives replication factor 3 and "
        "min.insync.replicas 2 [env USERTRAIL_EMBEDDED_KAFKA_BROKERS; default 1]",
    )
    up.add_argument(
        "--partitions",
        type=int,
        metavar="N",
        help="partitions of usertrail.events when created "
        "[env USERTRAIL_EVENTS_PARTITIONS; default 8]",
    )
    up.add_argument(
        "--only-setup",
        action="store_true",
        help="create the topics and prepare the database, then exit (a deployment's init step)",
    )
    up.add_argument(
        "--migrate",
        action="store_true",
        help="upgrade a real database (DATABASE_URL) to the newest schema first; "
        "the embedded one is always migrated",
    )
    up.set_defaults(func=cmd_up)

    log_parser = sub.add_parser(
        "log",
        parents=[common],
        help="the log archive: restore a broker that lost its log",
        description="The sink keeps every record it reads in the database (usertrail_archive; "
        "on by default on the embedded broker, USERTRAIL_ARCHIVE=on elsewhere). `usertrail up` "
        "restores it by itself; this does it for a broker you run.",
    )
    log_sub = log_parser.add_subparsers(dest="log_command", required=True, metavar="COMMAND")
    log_restore = log_sub.add_parser(
        "restore",
        parents=[common],
        help="put the archived records back into an empty broker",
        description="Put every archived record of usertrail.events and usertrail.profiles back "
        "at its partition and offset, with its key, value, timestamp and headers, and the "
        "dead letters back on their topic, into a broker whose topics are empty (create them "
        "first: `usertrail up --only-setup`). Topics that still hold their log are left alone; "
        "one that holds another log is refused (exit 3). Stop every worker first.",
    )
    log_restore.set_defaults(func=cmd_log_restore)
