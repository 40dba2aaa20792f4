"""The cost of scale, measured side by side in one run (#16):

restart    On one Apache Kafka node, two events topics: SMALL users (20
           events each) and BIG users (5 each; 1,000,000 events by
           default). Per table store (memory, rocksdb) and topic, one real
           ``usertrail stream`` worker folds the whole topic; then, per
           round, it is SIGKILLed and started again, and the time from its
           start to its first served profile (GET /profiles) and its
           resident memory once serving are taken. Prints the medians side
           by side, and rocksdb/memory ratios.
workers    A pre-filled topic folded by 1, 2 and 3 stream workers of one
           group (and written by 1, 2 and 3 sinks of one group into a fresh
           database), from their start until every record is folded
           (written): events/s and the ratio to one worker. On 2 cores,
           expect little.
freshness  ``usertrail up`` on the embedded default; an app sends 1,000
           events/s for --seconds (occurredAt: the moment it sends); a
           reader of the profiles topic takes, for every profile, the time
           from its newest event's occurredAt to its arrival: p50 and p99
           per round (target p99 < 500 ms). With each round, every part's
           CPU while the events were sent, and the host's busy and stolen
           shares: on a host that is full, or whose hypervisor takes a
           share, the figures measure the host.

    ./dev bench scale [--part restart|workers|freshness|all] [--rounds 5]
        [--small-users 10000] [--big-users 200000] [--big-events 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import brokers
import psutil
import psycopg
from aiokafka import AIOKafkaConsumer
from usertrail.producers import TrackingClient, demo
from usertrail.producers.ids import uuid7

from usertrail.embedded import EmbeddedPostgres, _die_with_parent, free_port
from usertrail.settings import Settings
from usertrail.topics import TopicSpec, ensure_topics

PARTITIONS = 8
TICK = 5
"""freshness: events sent together, every TICK ms."""
USERS = 500
"""freshness: users the events of a round go to, in turn."""
ROW_POLL = 0.025
"""freshness: seconds between two looks for the rows (an event's row is
seen up to this late)."""
ROW_SLACK = 0.1
"""freshness: seconds before the oldest unseen event's send a look begins
(its row's createdAt is later, by the SDK's own clock reading)."""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spawn(command: str, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "usertrail.cli", command, "--log-level", "WARNING", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # never outlives the benchmark
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _role(process: psutil.Process) -> str:
    line = " ".join(process.cmdline())
    for needle, role in (
        ("kafka.Kafka", "broker"),
        ("tansu", "broker"),
        ("postgres", "postgres"),
        ("batch import serve", "fold helper"),
        ("cli stream", "stream"),
        ("cli sink", "sink"),
        ("cli up", "up"),
    ):
        if needle in line:
            return role
    return "other"


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of ``root``, its descendants (by
    role) and this process ("bench": the sender and the readers)."""
    me = psutil.Process().cpu_times()
    out: dict[str, float] = {"bench": me.user + me.system}
    top = psutil.Process(root)
    for process in [top, *top.children(recursive=True)]:
        try:
            role, times = _role(process), process.cpu_times()
        except psutil.NoSuchProcess:
            continue  # ended since it was listed
        out[role] = out.get(role, 0.0) + times.user + times.system
    return out


def host_jiffies() -> tuple[int, int, int]:
    """The host's CPU time so far, all cores: (total, busy, stolen), where
    busy is everything but idle and I/O wait, stolen included (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total, total - idle - iowait, steal


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def folded(port: int) -> float:
    """Records a worker has read (its /metrics), -1 while it does not answer."""
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return -1
    for line in body.decode().splitlines():
        if line.startswith("usertrail_stream_records_read_total "):
            return float(line.split()[1])
    return -1


def stream_env(base: dict[str, str], topic: str, app: str, port: int, data: Path) -> dict[str, str]:
    return {
        **base,
        "USERTRAIL_EVENTS_TOPIC": topic,
        "USERTRAIL_PROFILES_TOPIC": f"{topic}.profiles",
        "USERTRAIL_STREAM_APP_ID": app,
        "USERTRAIL_STREAM_WEB_PORT": str(port),
        "USERTRAIL_DATA_DIR": str(data),
    }


async def wait_until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(0.2)


# --- restart -------------------------------------------------------------------
async def restart(args: argparse.Namespace, tmp: Path) -> None:
    with brokers.started("kafka", tmp) as broker:
        base = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
        sizes = {
            "small": (args.small_users, 20 * args.small_users),
            "big": (args.big_users, args.big_events),
        }
        sent, first_user = {}, {}
        for label, (users, events) in sizes.items():
            topic = f"bench.{label}"
            settings = Settings(
                kafka_bootstrap_servers=broker.bootstrap_servers,
                events_topic=topic,
                profiles_topic=f"{topic}.profiles",
                events_partitions=PARTITIONS,
                data_dir=tmp,
            )
            await ensure_topics(
                settings,
                [TopicSpec(topic, PARTITIONS), TopicSpec(f"{topic}.profiles", PARTITIONS)],
            )
            first_user[label] = "demo-00000"  # the demo's first user: onboarded first
            started = time.perf_counter()
            async with TrackingClient(source="demo", settings=settings) as client:
                sent[label] = await demo.run(client, demo.plan(users=users, events=events, seed=7))
            print(
                f"{topic}: {sent[label]:,} events of {users:,} users "
                f"({time.perf_counter() - started:.0f} s to send)",
                flush=True,
            )
        figures: dict[tuple[str, str], dict[str, list[float]]] = {}
        for store in ("memory", "rocksdb"):
            for label in sizes:
                port = free_port()
                data = tmp / f"{store}-{label}"
                env = {
                    **stream_env(base, f"bench.{label}", f"bench-{store}-{label}", port, data),
                    "USERTRAIL_STREAM_STORE": store,
                }
                log = tmp / f"{store}-{label}.log"
                proc = spawn("stream", env, log)
                started = time.perf_counter()
                try:
                    await wait_until(
                        lambda p=port, n=sent[label]: folded(p) >= n, 3600, f"{store} {label}"
                    )
                except SystemExit:
                    print(log.read_text()[-3000:])
                    raise
                took = time.perf_counter() - started
                rss = rss_mib(proc.pid)
                print(
                    f"{store} {label}: folded {sent[label]:,} events in {took:.0f} s, "
                    f"{rss:,.0f} MiB",
                    flush=True,
                )
                got = figures.setdefault((store, label), {"start": [], "rss": []})
                url = f"http://127.0.0.1:{port}/profiles/{first_user[label]}"
                for _ in range(args.rounds):
                    stop(proc, signal.SIGKILL)
                    proc = spawn("stream", env, log)
                    started = time.perf_counter()
                    await wait_until(lambda u=url: get(u)[0] == 200, 900, "first profile")
                    got["start"].append(time.perf_counter() - started)
                    await asyncio.sleep(2)  # recovered: what it holds while serving
                    got["rss"].append(rss_mib(proc.pid))
                stop(proc)
                print(
                    f"  restarts: {', '.join(f'{s:.1f}' for s in got['start'])} s to the "
                    f"first profile; {', '.join(f'{m:,.0f}' for m in got['rss'])} MiB",
                    flush=True,
                )
        print("\nrestart (SIGKILL) to first served profile, and RSS while serving (medians):")
        print(f"{'':14}{'memory':>22}{'rocksdb':>22}{'rocksdb/memory':>18}")
        for label, (users, _) in sizes.items():
            m, r = figures[("memory", label)], figures[("rocksdb", label)]
            ms, rs = statistics.median(m["start"]), statistics.median(r["start"])
            mm, rm = statistics.median(m["rss"]), statistics.median(r["rss"])
            print(
                f"{label} {users:>7,}u  {ms:8.1f} s {mm:8,.0f} MiB  {rs:8.1f} s {rm:8,.0f} MiB"
                f"   {rs / ms:5.2f} / {rm / mm:4.2f}"
            )


# --- workers -------------------------------------------------------------------
async def workers(args: argparse.Namespace, tmp: Path) -> None:
    with brokers.started("kafka", tmp) as broker:
        base = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
        topic = "bench.group"
        settings = await brokers.events_and_profiles(broker, tmp, topic, PARTITIONS)
        # the workers' own profiles topic (stream_env), with the events' partition count
        await ensure_topics(settings, [TopicSpec(f"{topic}.profiles", PARTITIONS)])
        async with TrackingClient(source="demo", settings=settings) as client:
            sent = await demo.run(client, demo.plan(users=2000, events=args.events, seed=3))
        print(f"{topic}: {sent:,} demo events ({PARTITIONS} partitions)", flush=True)
        pg = EmbeddedPostgres(data_dir=tmp / "pg", port=free_port(), database="bench")
        pg.start()
        try:
            rates: dict[tuple[str, int], list[float]] = {}
            for r in range(args.rounds):
                line = []
                for n in (1, 2, 3):
                    rate = await stream_group(base, topic, n, sent, tmp, f"{r}-{n}")
                    rates.setdefault(("stream", n), []).append(rate)
                    url = brokers.migrated_database(pg, f"bench_{r}_{n}")
                    sink_env = {
                        **base,
                        "USERTRAIL_EVENTS_TOPIC": topic,
                        "USERTRAIL_PROFILES_TOPIC": f"{topic}.profiles",
                    }
                    sink_rate = await sink_group(sink_env, url, n, sent, tmp, f"{r}-{n}")
                    rates.setdefault(("sink", n), []).append(sink_rate)
                    line.append(f"{n}: stream {rate:,.0f}/s sink {sink_rate:,.0f}/s")
                print(f"round {r + 1}: " + "   ".join(line), flush=True)
        finally:
            pg.stop()
        print("\nthroughput of one group (medians), and the ratio to one process:")
        for role in ("stream", "sink"):
            one = statistics.median(rates[(role, 1)])
            cells = [
                f"{n} x {statistics.median(rates[(role, n)]):,.0f}/s "
                f"({statistics.median(rates[(role, n)]) / one:.2f})"
                for n in (1, 2, 3)
            ]
            print(f"{role:7}" + "   ".join(cells))


async def stream_group(
    base: dict[str, str], topic: str, n: int, sent: int, tmp: Path, tag: str
) -> float:
    """Events/s of ``n`` workers of a new group, from their start until the
    sum of what they read reaches ``sent``."""
    app = f"bench-group-{uuid7()}"
    ports = [free_port() for _ in range(n)]
    procs = [
        spawn("stream", stream_env(base, topic, app, port, tmp / f"w{tag}-{i}"), tmp / "w.log")
        for i, port in enumerate(ports)
    ]
    started = time.perf_counter()
    try:
        await wait_until(
            lambda: _alive(procs, tmp / "w.log") and sum(max(0, folded(p)) for p in ports) >= sent,
            900,
            "group",
        )
        return sent / (time.perf_counter() - started)
    finally:
        for proc in procs:
            stop(proc)


async def sink_group(
    base: dict[str, str], url: str, n: int, sent: int, tmp: Path, tag: str
) -> float:
    env = {**base, "DATABASE_URL": url, "USERTRAIL_DATA_DIR": str(tmp / f"s{tag}")}
    group = f"bench-sinks-{uuid7()}"
    procs = [spawn("sink", env, tmp / "s.log", "--group", group) for _ in range(n)]
    started = time.perf_counter()

    def rows() -> int:
        with psycopg.connect(url) as conn:
            row = conn.execute('SELECT count(*) FROM "UserInteraction"').fetchone()
            return int(row[0]) if row else 0

    try:
        # every interaction of the demo (its other kinds keep no row)
        await wait_until(
            lambda: _alive(procs, tmp / "s.log") and rows() >= sent * 0.9 and _settled(rows),
            900,
            "sinks",
        )
        return rows() / (time.perf_counter() - started)
    finally:
        for proc in procs:
            stop(proc)


def _alive(procs: list[subprocess.Popen[bytes]], log: Path) -> bool:
    """True while every process runs; a process that exited ends the benchmark."""
    for proc in procs:
        if proc.poll() is not None:
            raise SystemExit(f"a worker exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
    return True


def _settled(rows: Any) -> bool:
    before = rows()
    time.sleep(0.5)
    return bool(rows() == before)


# --- freshness -----------------------------------------------------------------
async def freshness(args: argparse.Namespace, tmp: Path) -> None:
    for broker in ["tansu", "kafka"] if args.broker == "both" else [args.broker]:
        print(f"--- `usertrail up --broker {broker}`", flush=True)
        (tmp / broker).mkdir()
        await freshness_on(broker, args, tmp / broker)


async def freshness_on(broker: str, args: argparse.Namespace, tmp: Path) -> None:
    kafka_port, pg_port, web_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "USERTRAIL_DATA_DIR": str(tmp / "up"),
        "USERTRAIL_EMBEDDED_KAFKA_PORT": str(kafka_port),
        "USERTRAIL_EMBEDDED_POSTGRES_PORT": str(pg_port),
        "USERTRAIL_STREAM_WEB_PORT": str(web_port),
    }
    for key in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"):
        env.pop(key, None)
    up = spawn("up", env, tmp / "up.log", "--broker", broker)
    settings = Settings(
        kafka_bootstrap_servers=f"127.0.0.1:{kafka_port}",
        embedded_postgres_port=pg_port,
        data_dir=tmp / "app",
    )
    try:
        await wait_until(
            lambda: get(f"http://127.0.0.1:{web_port}/health")[0] == 200, 300, "`usertrail up`"
        )
        figures: dict[str, list[tuple[float, float]]] = {}
        for r in range(args.rounds):
            lags, shares, host = await one_round(settings, args.seconds, r, up.pid)
            ranked = sorted(shares.items(), key=lambda kv: -kv[1])
            print(
                "  CPU while sending (% of one core): "
                + ", ".join(f"{role} {share:.0f}" for role, share in ranked)
                + f"; the host {host[0]:.0f}% busy, {host[1]:.0f}% stolen",
                flush=True,
            )
            line = []
            for what, values in lags.items():
                values.sort()
                p50 = values[len(values) // 2]
                p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
                figures.setdefault(what, []).append((p50, p99))
                line.append(f"{what} p50 {p50:.0f} p99 {p99:.0f} max {values[-1]:.0f}")
            print(f"round {r + 1} (ms): " + "; ".join(line), flush=True)
        print(f"\nfreshness at 1,000 events/s, `up --broker {broker}` (ms, medians of rounds):")
        for what, pairs in figures.items():
            p50 = statistics.median(p for p, _ in pairs)
            p99 = statistics.median(p for _, p in pairs)
            target = "   (target p99 < 500)" if what in ("row visible", "profile") else ""
            print(f"  {what:18} p50 {p50:6.0f}   p99 {p99:6.0f}{target}")
    finally:
        stop(up, signal.SIGINT)


async def one_round(
    settings: Settings, seconds: float, r: int, up: int
) -> tuple[dict[str, list[float]], dict[str, float], tuple[float, float]]:
    """Per event sent: when it is in the events topic (a plain consumer: the
    floor any part can reach), when its row is visible and when a profile
    that folded it arrives, in ms from ``track_interaction``. With them,
    while the events were sent: each part's CPU (% of one core) and the
    host's (% of all its cores busy, and stolen by its hypervisor)."""

    def reader(topic: str) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.bootstrap_servers,
            group_id=None,
            auto_offset_reset="latest",
            enable_auto_commit=False,
            fetch_max_wait_ms=20,  # the instrument: never the slow part
        )

    prefix = f"fresh-{r}-"
    sent: dict[str, float] = {}  # event id -> time.time() at track_interaction
    lags: dict[str, list[float]] = {
        "in the topic": [],
        "row visible": [],
        "profile sent": [],  # the profile record's timestamp: when the worker sent it
        "profile": [],
    }
    readers = [reader(settings.events_topic), reader(settings.profiles_topic)]
    for one in readers:
        await one.start()
    stop_reading = asyncio.Event()

    async def read_events() -> None:
        while not stop_reading.is_set():
            batch = await readers[0].getmany(timeout_ms=50)
            now = time.time()
            for records in batch.values():
                for record in records:
                    event_id = _event_id(record.value)
                    if event_id in sent:
                        lags["in the topic"].append((now - sent[event_id]) * 1000)

    async def read_profiles() -> None:
        marker = f'"userId":"{prefix}'.encode()
        while not stop_reading.is_set():
            batch = await readers[1].getmany(timeout_ms=50)
            now = time.time() * 1000
            for records in batch.values():
                for record in records:
                    # the round's users only, without decoding the whole
                    # profile: the reader shares the two cores it measures
                    if record.value is None or marker not in record.value:
                        continue
                    at = _updated_at(record.value)
                    lags["profile sent"].append(record.timestamp - at)
                    lags["profile"].append(now - at)

    async def read_rows() -> None:
        # A look every ROW_POLL at the round's users' rows since the oldest
        # event not yet seen (its createdAt, the event's occurredAt, is
        # taken after its entry in `sent`; ROW_SLACK earlier for rounding):
        # the index on ("userId", "createdAt") makes a look cost what the
        # sink is behind, not what the round has sent. A query of every id
        # not yet seen grew with them: in 60 s rounds it put the rows' p50
        # at 13 s while the sink had written every row by the end of
        # sending. The users go as one array literal, built once: dumped
        # as a list at every look, they were a fifth of the reader's CPU.
        users = "{" + ",".join(f"{prefix}{u}" for u in range(USERS)) + "}"
        async with await psycopg.AsyncConnection.connect(
            settings.embedded_database_url, autocommit=True
        ) as conn:
            while not stop_reading.is_set() or unseen:
                if unseen:
                    oldest = next(iter(unseen.values()))
                    since = datetime.fromtimestamp(oldest - ROW_SLACK, UTC).replace(tzinfo=None)
                    cursor = await conn.execute(
                        'SELECT id FROM "UserInteraction" '
                        'WHERE "userId" = ANY(%s::text[]) AND "createdAt" >= %s',
                        (users, since),
                    )
                    now = time.time()
                    for (event_id,) in await cursor.fetchall():
                        at = unseen.pop(event_id, None)
                        if at is not None:
                            lags["row visible"].append((now - at) * 1000)
                if stop_reading.is_set() and unseen:
                    break  # one last look after the end
                await asyncio.sleep(ROW_POLL)

    unseen: dict[str, float] = {}  # sent, no row seen yet: oldest first
    tasks = [asyncio.create_task(f()) for f in (read_events, read_profiles, read_rows)]
    await asyncio.sleep(2)  # the readers are at the end before anything is sent
    async with TrackingClient(source="bench", settings=settings) as client:
        cpu_before, host_before = cpu_seconds(up), host_jiffies()
        started = time.perf_counter()
        for i in range(int(seconds * 1000)):
            # 1,000 a second, in ticks of TICK events: an app's events come
            # in bursts too, and a timer a millisecond costs the sender's
            # process (which shares the two cores) more than the events do
            if i % TICK == 0:
                wait = started + i / 1000 - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            event_id = uuid7()
            sent[event_id] = unseen[event_id] = time.time()
            await client.track_interaction(
                user_id=f"{prefix}{i % USERS}",
                type="reading",
                service="tarot",
                rating=5,
                event_id=event_id,
            )
        took = time.perf_counter() - started
        cpu_after, host_after = cpu_seconds(up), host_jiffies()
    shares = {
        role: (cpu_after[role] - cpu_before.get(role, 0.0)) / took * 100 for role in cpu_after
    }
    total, busy, stolen = (a - b for a, b in zip(host_after, host_before, strict=True))
    host = (100 * busy / max(total, 1), 100 * stolen / max(total, 1))
    await asyncio.sleep(3)
    stop_reading.set()
    await asyncio.gather(*tasks)
    for one in readers:
        await one.stop()
    for what, values in lags.items():
        if not values:
            raise SystemExit(f"{what}: nothing arrived")
    missing = len(sent) - len(lags["row visible"])
    if missing:
        print(f"  ({missing:,} rows not visible 3 s after the last send)", flush=True)
    return lags, shares, host


def _text(value: bytes | None, name: str) -> str:
    """The text of the field ``name`` of a record this pipeline wrote (the
    SDK and pydantic write ``"name":"..."``, without spaces), read without
    decoding the whole record; "" if it has none."""
    key = f'"{name}":"'.encode()
    at = -1 if not value else value.find(key)
    if at < 0:
        return ""
    at += len(key)
    assert value is not None
    return value[at : value.find(b'"', at)].decode(errors="replace")


def _updated_at(value: bytes) -> float:
    """A profile's updatedAt in ms since the epoch."""
    return datetime.fromisoformat(_text(value, "updatedAt")).timestamp() * 1000


def _event_id(value: bytes | None) -> str:
    """The eventId of an event this process sent."""
    return _text(value, "eventId")


async def main(args: argparse.Namespace) -> None:
    parts = ["restart", "workers", "freshness"] if args.part == "all" else [args.part]
    for part in parts:
        print(f"=== {part}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            await {"restart": restart, "workers": workers, "freshness": freshness}[part](
                args, Path(tmp)
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["restart", "workers", "freshness", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small-users", type=int, default=10_000)
    parser.add_argument("--big-users", type=int, default=200_000)
    parser.add_argument("--big-events", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=60_000, help="workers: events in the topic")
    parser.add_argument("--seconds", type=float, default=20.0, help="freshness: per round")
    parser.add_argument(
        "--broker", choices=["tansu", "kafka", "both"], default="both", help="freshness: `up`'s"
    )
    asyncio.run(main(parser.parse_args()))
