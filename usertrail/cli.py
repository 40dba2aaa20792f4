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
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import psycopg
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from usertrail import liveness

if TYPE_CHECKING:
    from usertrail.stream.segments import Rules
from usertrail import __version__
from usertrail.errors import BrokerUnavailableError, DatabaseUnavailableError, UsertrailError
from usertrail.settings import Settings

log = logging.getLogger("usertrail")

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
}


def _common() -> argparse.ArgumentParser:
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
        help="embedded data, spool files [env USERTRAIL_DATA_DIR; default .usertrail]",
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


def _worker_list(text: str) -> list[str]:
    names = [] if text.strip() == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - {"stream", "sink"})
    if unknown or not text.strip():
        raise argparse.ArgumentTypeError(
            f"unknown worker(s) {unknown}: give stream, sink, stream,sink or none"
        )
    return list(dict.fromkeys(names))


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.embedded import EmbeddedBroker, EmbeddedStack
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
        _prepare_database(settings, args.migrate)
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
    """Before the embedded tansu stops and its log with it: what the sink
    has not written yet (events sent a moment ago; a sink stopped while it
    was starting; `up` run without one), written now, archive included."""
    from usertrail.sink.consumer import Sink, SinkOptions

    async def drain() -> int:
        sink = Sink(settings, SinkOptions(assign_all=True))
        sink.stop()  # read to the end of every partition, then return
        await asyncio.wait_for(sink.run(), 60)
        return sink.written.records

    try:
        written = asyncio.run(drain())
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


def _prepare_database(settings: Settings, migrate: bool) -> None:
    """The embedded database is always migrated; a real one only when asked."""
    from usertrail.migrations import runner

    engine = runner.make_engine(settings)
    try:
        if migrate or settings.embedded_db:
            runner.upgrade(engine)
        st = runner.status(engine)
        if st.pending:
            raise UsertrailError(
                f"the database is at {st.current or 'base'} with {len(st.pending)} migration(s) "
                "pending: run `usertrail db migrate` (or `up --migrate`)"
            )
    finally:
        engine.dispose()


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
            print(
                f"sent {sent} events for {args.users} users in {elapsed:.1f}s "
                f"({sent / max(elapsed, 1e-9):,.0f}/s); delivered {report.delivered}, "
                f"spooled {report.spooled}"
            )
            return sent, report

    _, report = asyncio.run(go())
    return 0 if report.spooled == 0 else 1


# --- sink ------------------------------------------------------------------------
def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def cmd_sink(args: argparse.Namespace, settings: Settings) -> int:
    lock = liveness.hold_worker_lock(settings, args.group)  # `replay db` sees this sink
    from usertrail.sink.consumer import SinkOptions, run_sink

    options = SinkOptions(
        group=args.group,
        unknown_users=args.unknown_users,
        batch_max_records=args.batch_max,
        batch_max_wait_ms=args.batch_wait_ms,
        on_log_reset=args.on_log_reset,
    )
    asyncio.run(run_sink(settings, options, metrics_port=args.metrics_port))
    lock.close()
    return 0


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    # first of all: from here on `replay stream` sees this worker
    lock = liveness.hold_worker_lock(settings, settings.stream_app_id)
    import faust

    from usertrail.runtime import tune_gc
    from usertrail.stream.app import create_app

    rules = _rules(args, settings)
    flags = {"stream_fold_process": args.fold_process, "stream_batch_max": args.batch_max}
    settings = settings.model_copy(update={k: v for k, v in flags.items() if v is not None})
    app = create_app(settings, rules, web_port=args.web_port or settings.stream_web_port)
    tune_gc()
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    # faust's terminal spinner sets the root logger to DEBUG at levels of
    # WARNING and above, so every debug line of aiokafka and faust is built
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit:
        if app.usertrail_log_reset is not None:
            raise app.usertrail_log_reset from None  # one line, exit code 3
        raise
    finally:
        lock.close()
    return 0


class _Progress:
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


def _rules(args: argparse.Namespace, settings: Settings) -> Rules:
    """The segment rules: --rules, else USERTRAIL_RULES, else the shipped ones."""
    from usertrail.stream.segments import load_rules

    return load_rules(args.rules or settings.rules)


def _add_rules_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rules",
        type=Path,
        metavar="PATH",
        help="segment rules (TOML), the same the stream workers run with "
        "[env USERTRAIL_RULES; default: the shipped stream/rules.toml]",
    )


def _timestamp(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (for example 2026-11-01T00:00:00Z)"
        ) from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +09:00)")
    return at


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.replay import stream as replay

    rules = _rules(args, settings)

    async def run() -> dict[str, int]:
        await replay.refuse_if_live(settings)
        bar = _Progress("replay")
        rebuilt = await replay.rebuild(settings, rules, since=args.since, progress=bar)
        bar.close()
        await replay.refuse_if_live(settings)  # none started meanwhile
        # a --from replay leaves out, by design, users with nothing since TIME
        shrink = args.allow_shrink or args.since is not None
        return await replay.publish(settings, rules, rebuilt, allow_shrink=shrink)

    started = time.monotonic()
    written = asyncio.run(run())
    print(
        f"replayed {written['records']:,} events into {written['users']:,} profiles "
        f"({written['removed']:,} removed) in {time.monotonic() - started:.1f}s; "
        f"workers of {settings.stream_app_id!r} carry on after them"
        + ("" if written["committed"] else " (from the applied offsets; see the warning)")
    )
    return 0


def _quiet_sink() -> None:
    """A one-off rebuild reports at its end: the sink's partition assignments
    and seeks (INFO) are a running worker's log, not this command's output."""
    logging.getLogger("usertrail.sink").setLevel(max(logging.WARNING, logging.root.level))


def cmd_replay_db(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.replay import db as rebuild

    async def refuse() -> None:
        await liveness.refuse_if_live(settings, args.group, "sink", "usertrail sink")

    progress = _Progress("replay db")
    started = time.monotonic()
    _quiet_sink()
    asyncio.run(refuse())
    if args.in_place:
        rebuild.refuse_unless_empty(settings)
        group = asyncio.run(rebuild.build(settings, schema="public", progress=progress))
        rebuild.hand_over(settings, group, args.group)
    else:
        rebuild.make_shadow(settings)
        try:
            group = asyncio.run(rebuild.build(settings, progress=progress))
            if not args.allow_shrink:
                rebuild.refuse_to_shrink(settings)
            asyncio.run(refuse())  # none started meanwhile
            rebuild.swap(settings, group, args.group)
        except BaseException:
            rebuild.drop_shadow(settings)
            raise
    progress.close()
    counts = rebuild.live_rows(settings)
    print(
        f"rebuilt {', '.join(f'{t} ({n:,} rows)' for t, n in counts.items())} "
        f"{'in place' if args.in_place else 'and swapped them in'} in "
        f"{time.monotonic() - started:.1f}s; sink group {args.group!r} carries on after them"
    )
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.replay import stream as replay

    different = False
    if args.only in (None, "profiles"):
        live, folded, differences = asyncio.run(
            replay.verify_profiles(settings, _rules(args, settings))
        )
        print(f"profiles: {live:,} live, {folded:,} from the log, {len(differences):,} differ")
        for d in differences[: args.limit]:
            print(f"  {d.key}: {d.what}")
        if len(differences) > args.limit:
            print(f"  ... and {len(differences) - args.limit:,} more")
        different |= bool(differences)
    if args.only in (None, "database"):
        from usertrail.replay import db as rebuild

        _quiet_sink()
        rebuild.make_shadow(settings)
        try:
            asyncio.run(rebuild.build(settings))
            tables = rebuild.compare(settings, limit=args.limit)
        finally:
            rebuild.drop_shadow(settings)
        for t in tables:
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
    return 1 if different else 0


def cmd_segments(args: argparse.Namespace, settings: Settings) -> int:
    from usertrail.migrations import runner
    from usertrail.replay.backfill import backfill

    rules = _rules(args, settings)
    progress = _Progress("backfill")
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
        _print_validation(runner.validate(engine))
    finally:
        engine.dispose()
    return 0


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


# --- db --------------------------------------------------------------------------
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
                _print_validation(report)
        return 0
    except runner.SchemaDrift as exc:
        print(f"usertrail: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def _print_validation(report: dict[str, Any]) -> None:
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


# --- parser ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="usertrail",
        description="Event-sourced user-interaction tracking: SDK -> Kafka -> stream "
        "aggregates and segments -> PostgreSQL.",
        epilog="Exit codes: 0 done; 1 differences found (verify, db check); 2 a usage, "
        "configuration or runtime error (one line on stderr); 3 the broker's log is not the "
        "one the stored positions belong to (docs/log.md); 4 the broker cannot be reached; "
        "5 the database cannot be reached; 6 a sink stalled (no partitions, or behind and "
        "reading nothing, for USERTRAIL_STALL_SECONDS): start it again; 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"usertrail {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        help="which workers to run: stream,sink (default), one of them, or none; for "
        "example --workers sink while replaying the stream on the embedded broker, whose "
        "topics live only as long as `up` runs",
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

    sink = sub.add_parser(
        "sink",
        parents=[common],
        help="write usertrail.events to PostgreSQL (a group member)",
        description="Consume usertrail.events and write the product's rows: interactions, "
        "preferences, erasures. Members of one group share the partitions; the "
        "position of each partition is stored with the rows, in one transaction. "
        "SIGTERM writes what the log holds (up to 10 s more) and exits.",
    )
    sink.add_argument(
        "--group", default="usertrail-sink", help="consumer group (default usertrail-sink)"
    )
    sink.add_argument(
        "--unknown-users",
        choices=["create", "park"],
        default="create",
        help='an event for a user missing from "User": create a minimal row '
        "(default) or park it as a dead letter (reason unknown_user)",
    )
    sink.add_argument(
        "--batch-max",
        type=_at_least_one,
        default=5000,
        metavar="N",
        help="records per transaction at most (default 5000)",
    )
    sink.add_argument(
        "--batch-wait-ms",
        type=int,
        default=200,
        metavar="MS",
        help="how long to wait to fill a batch (default 200)",
    )
    sink.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT/metrics",
    )
    sink.add_argument(
        "--on-log-reset",
        choices=["stop", "start-over"],
        default="stop",
        help="the broker's log is not the one the stored positions were read from (a "
        "recreated topic, a wiped broker): stop with exit code 3 and say so (default), or "
        "forget the positions and read the new log from its start (writes are idempotent)",
    )
    sink.set_defaults(func=cmd_sink)

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

    stream = sub.add_parser(
        "stream",
        parents=[common],
        help="the faust worker: per-user profiles and segments",
        description="Fold usertrail.events into per-user profiles (a faust table, changelog-"
        "backed), evaluate the segment rules and publish changed profiles to "
        "usertrail.profiles. Workers of one group share the partitions. "
        "GET /profiles/{userId} on the web port answers from whichever worker "
        "owns the user.",
    )
    _add_rules_argument(stream)
    stream.add_argument(
        "--web-port",
        type=int,
        metavar="PORT",
        help="port of the worker's web server on 127.0.0.1 "
        "[env USERTRAIL_STREAM_WEB_PORT; default 6066]",
    )
    stream.add_argument(
        "--fold-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode and fold each batch in a helper process, on another core than "
        "faust's own work, or (--no-fold-process) in the worker's process "
        "[env USERTRAIL_STREAM_FOLD_PROCESS; default: a helper process]",
    )
    stream.add_argument(
        "--batch-max",
        type=_at_least_one,
        metavar="N",
        help="fold at most N events per batch; a changed user's state is written once "
        "per batch [env USERTRAIL_STREAM_BATCH_MAX; default 4000]",
    )
    stream.set_defaults(func=cmd_stream)

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
        type=_timestamp,
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
    _add_rules_argument(replay_stream)
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
    _add_rules_argument(backfill_parser)
    backfill_parser.set_defaults(func=cmd_segments)

    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="compare the live profiles and tables with what the log implies",
        description="Fold usertrail.events afresh and compare every user's state with the "
        "stream table's changelog (what workers recover); rebuild the database "
        "projections into scratch shadow tables and compare them with the live tables. "
        "Prints per table the counts and each differing key; exit code 1 on any difference. "
        "Nothing live is written.",
    )
    _add_rules_argument(verify)
    verify.add_argument(
        "--only",
        choices=["profiles", "database"],
        help="check only the stream's profiles or only the database (default: both)",
    )
    verify.add_argument(
        "--limit", type=int, default=50, metavar="N", help="differences listed (default 50)"
    )
    verify.set_defaults(func=cmd_verify)

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
        "--reason", help="only this reason (invalid, wrong_key, unknown_user, unapplicable)"
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
    return parser


def _fail(exc: UsertrailError) -> int:
    """One line on stderr; the error's exit code (README, "Exit codes")."""
    print(f"usertrail: error: {exc}", file=sys.stderr, flush=True)
    # clients left open by the failed command are not worth a report each
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return exc.exit_code


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
    if logging.root.level > logging.DEBUG:  # DEBUG: theirs too
        for noisy in ("aiokafka", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command not in ("up", "sink", "stream"):
        # a one-off command says what went wrong in one line, below; aiokafka's
        # own reports of a broker that is down would repeat it (workers keep
        # them: they retry and log each outage)
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return func(args, settings)
    except UsertrailError as exc:
        return _fail(exc)
    except KafkaError as exc:
        return _fail(
            BrokerUnavailableError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}")
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(DatabaseUnavailableError(f"cannot reach PostgreSQL: {first}"))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["main", "build_parser", "settings_from"]
