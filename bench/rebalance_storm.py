"""How long a sink group stops writing under a storm of SIGKILLs, with
dynamic and with static group membership, in the same run.

Two `usertrail sink` processes share the events (8 partitions) while events
arrive at --rate per second. For --storm seconds one of them is SIGKILLed
every --every seconds and started again at once under the same name, as
`usertrail up` restarts its workers. Measured per round and membership:

- stall: the longest time without a new row while events were waiting;
- converge: seconds from the last kill until every event sent is a row.

Dynamic membership: a killed member stays in the group until its session
times out, and every rebalance waits for it. Static membership
(USERTRAIL_GROUP_INSTANCE_ID, KIP-345): the restarted process takes its
own place back with no rebalance. Prints each round and the median ratios
static/dynamic (smaller is better). Group timing: the defaults of the
broker asked for (Kafka: session 10 s; tansu: 2 s).

    ./dev bench rebalance_storm [--broker kafka] [--rounds 5]
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import brokers
import psycopg
from aiokafka import AIOKafkaProducer
from usertrail.producers.events import build, encode
from usertrail.producers.ids import uuid7

from usertrail.embedded import EmbeddedPostgres, free_port
from usertrail.settings import Settings
from usertrail.topics import TopicSpec, ensure_topics

PARTITIONS = 8


def rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        found = conn.execute('SELECT count(*) FROM "UserInteraction"').fetchone()
    return 0 if found is None else int(found[0])


class Sinks:
    """Two sink processes, each restarted at once when killed."""

    def __init__(self, env: dict[str, str], folder: Path, static: bool) -> None:
        self.env, self.folder, self.static = env, folder, static
        self.procs: list[subprocess.Popen[bytes]] = [self._start(i) for i in range(2)]
        self.kills = 0
        self.exits = 0  # exits of their own (stalls), each restarted

    def _start(self, i: int) -> subprocess.Popen[bytes]:
        env = dict(self.env)
        if self.static:
            env["USERTRAIL_GROUP_INSTANCE_ID"] = f"sink-{i}"
        with open(self.folder / f"sink{i}.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "usertrail.cli", "sink", "--log-level", "WARNING"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def watch(self) -> None:
        """A sink that exited by itself (a stall, exit code 6) started again."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                self.exits += 1
                self.procs[i] = self._start(i)

    def kill_one(self) -> None:
        i = self.kills % 2
        self.procs[i].kill()
        self.procs[i].wait()
        self.procs[i] = self._start(i)
        self.kills += 1

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def storm(
    broker: brokers.Broker, pg: EmbeddedPostgres, folder: Path, name: str, static: bool, args: Any
) -> tuple[float, float, int, int]:
    """(stall, converge) seconds, the kills made and the sinks' own exits."""
    url = brokers.migrated_database(pg, "bench_storm")
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        events_topic=f"{name}.events",
        profiles_topic=f"{name}.profiles",
        events_partitions=PARTITIONS,
        data_dir=folder,
    )
    await ensure_topics(
        settings,
        [TopicSpec(settings.events_topic, PARTITIONS), TopicSpec(settings.profiles_topic, 1)],
    )
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "DATABASE_URL": url,
        "USERTRAIL_EVENTS_TOPIC": settings.events_topic,
        "USERTRAIL_PROFILES_TOPIC": settings.profiles_topic,
        "USERTRAIL_DATA_DIR": str(folder),
    }
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    await producer.start()
    sent = 0
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    async def send(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            e = build(
                "interaction",
                event_id=uuid7(),
                user_id=f"user-{sent % 500}",
                occurred_at=t0 + timedelta(milliseconds=sent),
                source="bench",
                type="reading",
                service="saju",
            )
            await producer.send(settings.events_topic, encode(e), key=e.user_id.encode())
            sent += 1

    sinks = Sinks(env, folder, static)
    try:
        # the group formed and writing before the storm
        await send(100)
        deadline = time.monotonic() + 120
        while rows(url) < sent and time.monotonic() < deadline:  # noqa: ASYNC110  # a database, polled
            await asyncio.sleep(0.2)
        longest, last_row_at, seen = 0.0, time.monotonic(), rows(url)
        started = time.monotonic()
        next_kill = started + args.every
        last_kill = started
        while True:
            now = time.monotonic()
            if now - started < args.storm:
                await send(int(args.rate * 0.1))
                if now >= next_kill:
                    sinks.kill_one()
                    last_kill, next_kill = now, now + args.every
            elif seen >= sent:
                break
            elif now - last_kill > 300:
                raise SystemExit(f"{seen} rows of {sent} events 300 s after the last kill")
            await asyncio.sleep(0.1)
            sinks.watch()
            count = rows(url)
            now = time.monotonic()
            if count > seen:
                seen, last_row_at = count, now
            elif seen < sent:
                longest = max(longest, now - last_row_at)
        return longest, time.monotonic() - last_kill, sinks.kills, sinks.exits
    finally:
        sinks.stop()
        await producer.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--storm", type=float, default=20.0, help="seconds of kills")
    parser.add_argument("--every", type=float, default=2.5, help="seconds between kills")
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    brokers.add_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, brokers.started(args.broker, Path(tmp)) as broker:
        pg = EmbeddedPostgres(data_dir=Path(tmp) / "pg", port=free_port(), database="bench")
        pg.start()
        try:
            stalls, converges = [], []
            for r in range(args.rounds):
                got = {}
                for static in (False, True):
                    mode = "static" if static else "dynamic"
                    got[static] = await storm(
                        broker, pg, Path(tmp), f"storm{r}{mode}", static, args
                    )
                (ds, dc, kills, dx), (ss, sc, _, sx) = got[False], got[True]
                stalls.append(ss / ds)
                converges.append(sc / dc)
                print(
                    f"round {r + 1}: {kills} kills in {args.storm:.0f} s; "
                    f"dynamic: stall {ds:.1f} s, converged {dc:.1f} s after the last kill; "
                    f"static: stall {ss:.1f} s, converged {sc:.1f} s; "
                    f"static/dynamic {ss / ds:.2f} and {sc / dc:.2f}"
                    + (f"; stalled sinks restarted: {dx} dynamic, {sx} static" if dx or sx else ""),
                    flush=True,
                )
            print(
                f"median static/dynamic: longest stall {statistics.median(stalls):.2f}, "
                f"convergence {statistics.median(converges):.2f} ({args.rounds} rounds, "
                f"{args.broker})"
            )
        finally:
            pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
