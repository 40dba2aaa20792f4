"""usertrail against its Python peer, quix-streams, in the same run, on one
pre-filled events topic (issue #21).

The demo's traffic (``--users`` 2,000 users, about ``--events`` events: 60,000
give 60,338) is sent once into an 8-partition topic; then per round, each
reading the whole topic from the start under a new consumer group, in an
order reversed every other round:

stream part (events/s, each from its first processed event or batch to the
last, as bench/stream_rate.py's Clock times it; each app its own process):
  quix stateful   a quix-streams Application with quix's defaults (RocksDB
                  state with its changelog topic, at-least-once, a checkpoint
                  every 5 s); per event it decodes with our contract
                  (``decode``), loads the user's profile from its state, folds
                  the event in with our fold (``fold``, the rules' affinity
                  configuration, the record's offset: as the raw loop does),
                  stores the profile (JSON, as our table does) and produces
                  it, as stored, to an output topic: one profile message an
                  event;
  worker          our stream worker (bench/stream_rate.py ``--child worker``):
                  fold, segments, table and changelog, published profiles;
  faust ceiling   a faust agent that only decodes (stream_rate's ceiling);
  quix decode     a quix-streams Application that only decodes;
  raw fold        a plain aiokafka loop that decodes and folds into a dict
                  (stream_rate's raw loop, in this process).
After each round the last profile quix produced for every user is checked
equal to the raw fold's profile of that user (every aggregate it holds:
counts, ratings, activity times, the favourite readings, the affinity vector
to 9 digits, preferences, onboarding, last offset, events seen); a
difference, or a user missing, fails the run (exit 1).

sink part ("UserInteraction" rows/s):
  usertrail sink  our sink as ``up`` runs it on that broker (bench/sink_rate.py's
                  round; it also writes the preferences), timed from its first
                  written batch to its last;
  quix sink       quix-streams' PostgreSQLSink (quixstreams.sinks.community)
                  fed by an Application that decodes each record with our
                  contract and keeps the interactions, committing every
                  ``--batch`` records as our sink does, with the columns named
                  explicitly: the stock sink takes a batch's columns from its
                  first row, which leaves out the NULL ones, so a batch whose
                  first interaction has no theme (or rating) would lose every
                  theme in it; no schema changes (the table is the seed's),
                  no metadata columns; timed from its first written batch to
                  its last;
  raw COPY        the same rows as pre-built COPY text (sink_rate's baseline).
Each writes into a freshly migrated database with the users in "User"; the
three tables are then checked to hold the same rows.

Prints each round, then the medians and the ratios against our worker (and
sink): the target is usertrail >= 1.2x quix stateful.

On tansu: quix gives its changelog topics the source topic's retention,
read with DescribeConfigs, and fails (KeyError 'retention.ms') on a topic
whose configuration does not name it; tansu describes only what a topic was
created with, so the events topic is created here as ``up`` creates it
(kept forever: retention.ms and retention.bytes -1). On Apache Kafka that
changes nothing.

quix-streams is a bench-only extra (pyproject.toml's ``bench``), installed by
``./dev bench peers`` and by nothing else. Its own pins (confluent-kafka
<2.13, pydantic <2.14, pydantic-settings <2.16) exclude requirements.lock's
versions, so it is installed without them and runs here on the lock's
(printed first): both sides decode with the same pydantic.

    ./dev bench peers [--rounds 5] [--events 60000] [--broker tansu|kafka]
                      [--part stream|sink|both]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import brokers
import psycopg
import sink_rate
import stream_rate
from pydantic import SecretStr, TypeAdapter
from stream_rate import PARTITIONS, TOPIC, Clock
from usertrail.producers.events import EventBase, Interaction, decode
from usertrail.producers.ids import uuid7
from usertrail.sink.rows import interaction_copy_rows
from usertrail.stream.fold import SEEN_CHUNK, Profile, fold
from usertrail.stream.segments import load_rules

from usertrail.embedded import EmbeddedPostgres, free_port
from usertrail.runtime import tune_gc
from usertrail.settings import Settings
from usertrail.topics import ensure_topics, topic_specs

STREAM = ("quix-stateful", "worker", "ceiling", "quix-decode", "raw")
SINK = ("raw-copy", "usertrail-sink", "quix-sink")
NAMES = {
    "quix-stateful": "quix stateful",
    "worker": "usertrail worker",
    "ceiling": "faust decode-only ceiling",
    "quix-decode": "quix decode-only",
    "raw": "raw aiokafka fold",
    "raw-copy": "raw COPY",
    "usertrail-sink": "usertrail sink",
    "quix-sink": "quix PostgreSQLSink",
}
COLUMNS = ("id", "userId", "createdAt", "type", "service", "theme", "rating", "metadata")
PROFILE: TypeAdapter[Profile] = TypeAdapter(Profile)


def aggregates(p: Profile) -> dict[str, Any]:
    """What a profile holds, as compared: everything but the ids kept to
    spot resent events (their number instead), the vector to 9 digits as the
    published profiles have it."""
    return {
        "counts_by_type": p.counts_by_type,
        "counts_by_service": p.counts_by_service,
        "counts_by_theme": p.counts_by_theme,
        "rating_sum_by_service": p.rating_sum_by_service,
        "rating_count_by_service": p.rating_count_by_service,
        "first_activity": p.first_activity,
        "last_activity": p.last_activity,
        "top_readings": p.top_readings,
        "favourite_themes": p.favourite_themes(),
        "recent_activity": p.recent_activity,
        "vector": {k: round(v, 9) for k, v in sorted(p.affinity.items())},
        "preferences": p.preferences,
        "preferences_at": p.preferences_at,
        "onboarding": p.onboarding,
        "now": p.now,
        "last_offset": p.last_offset,
        "events_seen": len(p.recent_ids) + SEEN_CHUNK * len(p.sealed),
        "erased_at": p.erased_at,
    }


# --- the quix-streams children ----------------------------------------------


def quix_child(role: str, expected: int, result: Path) -> None:
    """One quix-streams Application (``role``) over TOPIC, in its own process;
    its rate in ``result`` once it stopped (the output flushed)."""
    from quixstreams import Application, message_context
    from quixstreams.models import TopicConfig

    settings = Settings()
    pending = result.with_suffix(".pending")
    clock = Clock(expected, pending)
    app: Any = None

    def counted(n: int) -> None:
        clock.add(n)
        if clock.count >= expected:
            app.stop()  # the loop ends after this message, with a last checkpoint

    # The sink's rows are written at checkpoints: once the topic's last record
    # is processed it stops, so the last checkpoint writes the rest at once
    # (a stream would go on; waiting here for the next checkpoint is not
    # throughput).
    records, processed = int(os.environ.get("BENCH_RECORDS", "0")), 0

    def seen(*_: Any) -> None:
        nonlocal processed
        processed += 1
        if processed >= records:
            app.stop()

    app = Application(
        broker_address=settings.bootstrap_servers,
        consumer_group=os.environ["BENCH_GROUP"],
        auto_offset_reset="earliest",
        state_dir=settings.data_dir / "quix",
        loglevel="WARNING",
        on_message_processed=seen if role == "quix-sink" else lambda *_: counted(1),
        commit_every=int(os.environ.get("BENCH_COMMIT_EVERY", "0")),
    )
    source = app.topic(TOPIC, key_deserializer="bytes", value_deserializer="bytes")
    sdf = app.dataframe(source)
    if role == "quix-decode":
        sdf = sdf.update(decode)
    elif role == "quix-stateful":
        config = load_rules().affinity_config()
        # the profile decoded from what the state holds, kept beside it (our
        # worker keeps such a memo too, stream/batch.py): a user's next event
        # need not parse the stored JSON again
        decoded: dict[str, tuple[str, Profile]] = {}

        def fold_event(value: bytes, state: Any) -> bytes:
            event = decode(value)
            stored = state.get("profile")
            hit = decoded.get(event.user_id)
            if stored is None:
                profile = Profile(event.user_id)
            elif hit is not None and hit[0] == stored:
                profile = hit[1]
            else:
                profile = PROFILE.validate_json(stored)
            profile = fold(profile, event, message_context().offset, config=config)
            data = PROFILE.dump_json(profile)
            text = data.decode()
            state.set("profile", text)  # a str: quix's state is JSON
            if len(decoded) >= 20_000 and event.user_id not in decoded:
                del decoded[next(iter(decoded))]
            decoded[event.user_id] = (text, profile)
            return data  # the profile message: the profile as stored

        output = app.topic(
            os.environ["BENCH_OUT"],
            key_serializer="bytes",
            value_serializer="bytes",
            config=TopicConfig(num_partitions=PARTITIONS, replication_factor=1),
        )
        sdf = sdf.apply(fold_event, stateful=True)
        sdf = sdf.to_topic(output)
    else:
        sdf = sdf.apply(interaction_row).filter(lambda row: row is not None)
        sdf.sink(quix_sink(settings, counted))
    tune_gc()  # as stream_rate's children (and `usertrail stream`) do
    app.run()
    if not pending.exists():
        raise SystemExit(f"{role} stopped after {clock.count:,} of {expected:,}")
    pending.rename(result)


def interaction_row(value: bytes) -> dict[str, Any] | None:
    """A record's "UserInteraction" row, the columns by name; None for the
    other kinds of event."""
    event = decode(value)
    if not isinstance(event, Interaction):
        return None
    return {
        "id": event.event_id,
        "userId": event.user_id,
        # a timestamp without time zone: the event time in UTC, as ours writes it
        "createdAt": event.occurred_at.astimezone(UTC).replace(tzinfo=None),
        "type": event.type,
        "service": event.service,
        "theme": event.theme,
        "rating": event.rating,
        "metadata": event.metadata,
    }


def quix_sink(settings: Settings, written: Any) -> Any:
    """quix-streams' PostgreSQLSink into our "UserInteraction", its INSERT
    naming the table's columns; ``written(rows)`` after each checkpoint's
    writes (one transaction a partition, as quix writes them)."""
    from psycopg.conninfo import conninfo_to_dict
    from psycopg2 import sql
    from psycopg2.extras import execute_values
    from quixstreams.sinks.community.postgresql import PostgreSQLSink

    class NamedColumns(PostgreSQLSink):  # type: ignore[misc]
        def _insert_rows(
            self, table_name: str, rows: list[dict[str, Any]], pks: Any = None
        ) -> None:
            # the stock method with COLUMNS instead of the first row's keys
            if not rows:
                return
            query = sql.SQL("INSERT INTO {table} ({columns}) VALUES %s").format(
                table=sql.Identifier(self._schema_name, table_name),
                columns=sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            )
            values = [[row.get(col) for col in COLUMNS] for row in rows]
            with self._client.cursor() as cursor:
                execute_values(cursor, query, values)

        def flush(self) -> None:
            # a checkpoint's batches (one a partition), as one written batch
            rows = sum(batch.size for batch in self._batches.values())
            super().flush()
            if rows:
                written(rows)

    url = settings.database_url
    assert url is not None
    db = conninfo_to_dict(url.get_secret_value())
    return NamedColumns(
        host=str(db.get("host", "127.0.0.1")),
        port=int(db.get("port", 5432)),
        dbname=str(db["dbname"]),
        user=str(db.get("user", "postgres")),
        password=str(db.get("password", "")),
        table_name="UserInteraction",
        schema_auto_update=False,  # the seed's table as it is: no ALTER TABLE
        include_metadata=False,  # no "__key" and "timestamp" columns
    )


# --- the stream part --------------------------------------------------------


async def last_values(bootstrap: str, topic: str, expected: int) -> dict[bytes, bytes]:
    """The last value of every key in ``topic``, which holds at least
    ``expected`` records (counted, not asked for: tansu's end offsets fall
    short after a batch of several records), read to the first empty fetch
    past them."""
    consumer = brokers.reader(bootstrap, topic)
    await consumer.start()
    last: dict[bytes, bytes] = {}
    count, deadline = 0, time.monotonic() + 300
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if not batch and count >= expected:
                return last
            if time.monotonic() > deadline:
                raise SystemExit(f"{topic}: {count:,} records, {expected:,} expected")
            for records in batch.values():
                count += len(records)
                for r in records:
                    if r.key is not None and r.value is not None:
                        last[r.key] = r.value
    finally:
        await consumer.stop()


async def check_equal(bootstrap: str, topic: str, expected: int, ours: dict[str, Profile]) -> int:
    """Every user's last profile message in ``topic`` (``expected`` of them
    at least) against our fold's profile; the users checked, or exit 1 on
    the first difference."""
    last = await last_values(bootstrap, topic, expected)
    got = {k.decode(): aggregates(PROFILE.validate_json(v)) for k, v in last.items()}
    if set(got) != set(ours):
        missing, extra = sorted(set(ours) - set(got)), sorted(set(got) - set(ours))
        print(
            f"DIFFERENT: quix has profiles of {len(got):,} users, the raw fold of {len(ours):,} "
            f"(missing {missing[:5]}, extra {extra[:5]})",
            flush=True,
        )
        sys.exit(1)
    for user, profile in sorted(ours.items()):
        want = aggregates(profile)
        if got[user] != want:
            fields = [k for k in want if got[user].get(k) != want[k]]
            print(f"DIFFERENT: user {user!r}, fields {fields}", flush=True)
            for k in fields[:3]:
                print(f"  {k}: quix {got[user].get(k)!r}\n  {k}: ours {want[k]!r}", flush=True)
            sys.exit(1)
    return len(ours)


async def timed_child(role: str, env: dict[str, str], expected: int, tmp: Path) -> float:
    """stream_rate's run_child, for its children or this script's; says so
    when a child finished in too few batches for its rate to mean much."""
    ours = role in ("worker", "ceiling")
    rate = await stream_rate.run_child(
        role, env, expected, tmp, stream_rate.__file__ if ours else __file__
    )
    batches = json.loads((tmp / f"{role}.json").read_text())["batches"]
    if batches < 5:
        print(f"  ({NAMES[role]}: {batches} batches, too few to time: more --events)", flush=True)
    return rate


async def stream_round(
    order: tuple[str, ...], broker: brokers.Broker, tmp: Path, sent: int, r: int
) -> dict[str, float]:
    rates: dict[str, float] = {}
    env = stream_rate.child_env(broker, tmp)
    profiles: dict[str, Profile] = {}
    out = f"bench.quix.profiles.{r}"
    for role in order:
        group = f"bench-{role}-{uuid7()}"
        if role == "raw":
            rates[role] = await stream_rate.raw_loop(broker.bootstrap_servers, sent, profiles)
        elif role in ("worker", "ceiling"):
            app_env = {**env, "USERTRAIL_STREAM_APP_ID": group}
            rates[role] = await timed_child(role, app_env, sent, tmp)
        else:
            app_env = {**env, "BENCH_GROUP": group, "BENCH_OUT": out}
            rates[role] = await timed_child(role, app_env, sent, tmp)
            shutil.rmtree(tmp / "quix" / group, ignore_errors=True)
    users = await check_equal(broker.bootstrap_servers, out, sent, profiles)
    print(
        f"round {r}: " + "   ".join(f"{NAMES[k]} {rates[k]:,.0f}/s" for k in order),
        flush=True,
    )
    print(
        f"  quix stateful's profiles checked equal to the raw fold's on {users:,} users",
        flush=True,
    )
    return rates


# --- the sink part ----------------------------------------------------------


async def topic_events(bootstrap: str, expected: int) -> list[EventBase]:
    consumer = brokers.reader(bootstrap, TOPIC)
    await consumer.start()
    events: list[EventBase] = []
    try:
        while len(events) < expected:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                events += [decode(r.value or b"") for r in records]
        return events
    finally:
        await consumer.stop()


def table_digest(url: str) -> tuple[int, str]:
    """The rows of "UserInteraction" and an md5 of all of them, by id."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), md5(string_agg(concat_ws(E'\\t', id, \"userId\", "
            "\"createdAt\"::text, type, service, coalesce(theme, '\\N'), "
            "coalesce(rating::text, '\\N'), coalesce(metadata::text, '\\N')), "
            "E'\\n' ORDER BY id)) FROM \"UserInteraction\""
        ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


async def sink_round(
    order: tuple[str, ...],
    pg: EmbeddedPostgres,
    base: Settings,
    env: dict[str, str],
    tmp: Path,
    users: list[str],
    data: bytes,
    rows: int,
    records: int,
    args: argparse.Namespace,
    r: int,
) -> dict[str, float]:
    rates: dict[str, float] = {}
    digests = {}
    for system in order:
        url = sink_rate.fresh_database(pg, f"bench_{system.replace('-', '_')}", users)
        if system == "raw-copy":
            rates[system], _ = sink_rate.raw_copy(url, data, rows)
        elif system == "usertrail-sink":
            settings = base.model_copy(update={"database_url": SecretStr(url)})
            rates[system], _ = await sink_rate.sink_round(
                settings, rows, args.batch, base.archiving, count="interactions"
            )
        else:
            group = f"bench-quix-sink-{uuid7()}"
            child_env = {
                **env,
                "BENCH_GROUP": group,
                "BENCH_COMMIT_EVERY": str(args.batch),
                "BENCH_RECORDS": str(records),
                "USERTRAIL_DATABASE_URL": url,
            }
            rates[system] = await timed_child(system, child_env, rows, tmp)
            shutil.rmtree(tmp / "quix" / group, ignore_errors=True)
        digests[system] = table_digest(url)
    if len(set(digests.values())) != 1 or next(iter(digests.values()))[0] != rows:
        print(f"DIFFERENT rows written ({rows:,} expected): {digests}", flush=True)
        sys.exit(1)
    print(
        f"round {r}: " + "   ".join(f"{NAMES[k]} {rates[k]:,.0f} rows/s" for k in order),
        flush=True,
    )
    print(f"  the same {rows:,} rows in all three tables", flush=True)
    return rates


# --- the run ----------------------------------------------------------------


def median(rounds: list[dict[str, float]], system: str) -> float:
    return statistics.median(r[system] for r in rounds)


def report(title: str, rounds: list[dict[str, float]], base: str, unit: str) -> None:
    medians = {k: median(rounds, k) for k in rounds[0]}
    print(f"{title}: medians of {len(rounds)} rounds", flush=True)
    for k, rate in medians.items():
        vs = "" if k == base else f"   {NAMES[k]} / {NAMES[base]} {rate / medians[base]:.2f}"
        print(f"  {NAMES[k]:<28}{rate:>10,.0f} {unit}{vs}", flush=True)


def order_of(systems: tuple[str, ...], r: int) -> tuple[str, ...]:
    """The systems in their order, reversed every other round."""
    return systems if r % 2 else tuple(reversed(systems))


async def main(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory() as folder,
        brokers.started(args.broker, Path(folder)) as broker,
    ):
        tmp = Path(folder)
        print(f"{versions()}; broker: {args.broker}", flush=True)
        # the events topic as `up` creates it (kept forever): quix gives its
        # changelog topics the source topic's retention, and tansu describes
        # only the configuration a topic was created with
        up_like = Settings(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            events_topic=TOPIC,
            events_partitions=PARTITIONS,
            data_dir=tmp,
        )
        await ensure_topics(up_like, [s for s in topic_specs(up_like) if s.name == TOPIC])
        _, sent = await stream_rate.demo_topic(broker, tmp, args.users, args.events)
        print(
            f"{sent:,} demo events of {args.users:,} users in {TOPIC} ({PARTITIONS} partitions)",
            flush=True,
        )
        if args.part in ("stream", "both"):
            rounds = []
            for r in range(1, args.rounds + 1):
                rounds.append(await stream_round(order_of(STREAM, r), broker, tmp, sent, r))
            report("stream", rounds, "worker", "events/s")
            q, w = (median(rounds, k) for k in ("quix-stateful", "worker"))
            print(f"quix stateful / usertrail worker: {q / w:.2f}", flush=True)
            print(f"usertrail worker / quix stateful: {w / q:.2f} (target >= 1.2)", flush=True)
        if args.part in ("sink", "both"):
            events = await topic_events(broker.bootstrap_servers, sent)
            interactions = [e for e in events if isinstance(e, Interaction)]
            users = sorted({e.user_id for e in events})
            data, rows = interaction_copy_rows(interactions), len(interactions)
            del events, interactions
            base = sink_rate.sink_settings(broker.bootstrap_servers, tmp)
            await ensure_topics(base)  # the other topics our sink reads or writes
            env = stream_rate.child_env(broker, tmp)
            print(
                f'sink: {rows:,} "UserInteraction" rows of {len(users):,} users; our sink '
                f"with the archive {'on' if base.archiving else 'off'} (as `up` runs it), "
                f"{args.batch:,} records a transaction (quix: a checkpoint every {args.batch:,})",
                flush=True,
            )
            gc.collect()
            tune_gc()  # as sink_rate sets up the process our sink runs in
            pg = EmbeddedPostgres(data_dir=tmp / "pg", port=free_port(), database="bench")
            pg.start()
            try:
                rounds = []
                for r in range(1, args.rounds + 1):
                    rates = await sink_round(
                        order_of(SINK, r), pg, base, env, tmp, users, data, rows, sent, args, r
                    )
                    rounds.append(rates)
            finally:
                pg.stop()
            report("sink", rounds, "usertrail-sink", "rows/s")
            q, w = (median(rounds, k) for k in ("quix-sink", "usertrail-sink"))
            print(f"usertrail sink / quix PostgreSQLSink: {w / q:.2f}", flush=True)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        quix = version("quixstreams")
    except PackageNotFoundError:
        raise SystemExit(
            "quixstreams is not installed: run this with `./dev bench peers`, which "
            "installs pyproject.toml's bench extra"
        ) from None
    others = ("faust-streaming", "aiokafka", "confluent-kafka", "rocksdict", "pydantic")
    return f"quix-streams {quix} against usertrail, on " + ", ".join(
        f"{name} {version(name)}" for name in others
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--events", type=int, default=60_000, help="demo events (about)")
    parser.add_argument("--users", type=int, default=2000, help="demo users")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--part", choices=["stream", "sink", "both"], default="both")
    parser.add_argument(
        "--batch", type=int, default=5000, help="sink records per transaction (quix: checkpoint)"
    )
    brokers.add_argument(parser)
    parser.add_argument(
        "--child", choices=["quix-stateful", "quix-decode", "quix-sink"], help=argparse.SUPPRESS
    )
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        quix_child(arguments.child, arguments.events, arguments.result)
    else:
        started = time.monotonic()
        asyncio.run(main(arguments))
        print(f"took {math.ceil(time.monotonic() - started)} s", flush=True)
