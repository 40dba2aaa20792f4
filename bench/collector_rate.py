"""Events/s through the HTTP collector against the SDK sending directly.

In each round, on one broker: the SDK's ``track_interaction`` loop (to its
flush: every event acknowledged) and ``usertrail collector`` as a process
of its own, loaded from this one over keep-alive HTTP with batches of 100
(4 connections), timed until every event is in the topic. Then the
collector again at half the rate it reached, paced, for its request
latency. Prints each round and the medians: the ratio collector/SDK
(target >= 0.5) and the p99 request latency at half the maximum rate
(target < 50 ms).

    ./dev bench collector_rate [--events 50000] [--rounds 5] [--broker tansu|kafka]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import brokers
from aiokafka import AIOKafkaConsumer, TopicPartition
from sdk_rate import fields, sdk_round
from usertrail.collector import keys

from usertrail.embedded import EmbeddedPostgres, free_port
from usertrail.kafka import high_waters, stop_within
from usertrail.settings import Settings

BATCH = 100
CONNECTIONS = 4


def bodies(n: int) -> list[bytes]:
    wire = []
    for i in range(n):
        f = fields(i)
        wire.append(
            {
                "kind": "interaction",
                "userId": f["user_id"],
                "type": f["type"],
                "service": f["service"],
                "theme": f["theme"],
                "rating": f["rating"],
                "metadata": f["metadata"],
            }
        )
    return [json.dumps(wire[i : i + BATCH]).encode() for i in range(0, n, BATCH)]


class Collector:
    def __init__(self, settings: Settings, database_url: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "DATABASE_URL": database_url,
            "USERTRAIL_EVENTS_TOPIC": settings.events_topic,
            "USERTRAIL_DATA_DIR": str(settings.data_dir),
            "USERTRAIL_LOG_LEVEL": "WARNING",
        }
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "usertrail.cli", "collector", "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the collector did not start: {log.read_text()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


async def in_topic(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> int:
    return sum((await high_waters(consumer, tps)).values())


async def collector_round(
    url: str, key: str, payloads: list[bytes], consumer: AIOKafkaConsumer, tps: list[TopicPartition]
) -> float:
    before = await in_topic(consumer, tps)
    n = sum(len(json.loads(p)) for p in payloads)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    queue = list(reversed(payloads))
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                async with session.post(f"{url}/v1/events", data=body, headers=headers) as r:
                    assert r.status == 202, (r.status, await r.text())
                    await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
        while await in_topic(consumer, tps) < before + n:  # noqa: ASYNC110  # a poll
            await asyncio.sleep(0.02)
        return n / (time.perf_counter() - started)


async def paced_latencies(url: str, key: str, payloads: list[bytes], rate: float) -> list[float]:
    """Requests of BATCH events at ``rate`` events/s; each request's time."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    gap = BATCH / rate
    times: list[float] = []
    # many clients, as a fleet of apps is: a request never waits for
    # another one's connection here, so its time is the collector's answer
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def one(body: bytes) -> None:
            t = time.perf_counter()
            async with session.post(f"{url}/v1/events", data=body, headers=headers) as r:
                await r.read()
                assert r.status == 202, r.status
            times.append(time.perf_counter() - t)

        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i, body in enumerate(payloads):
            await asyncio.sleep(max(0.0, start + i * gap - loop.time()))
            tasks.append(asyncio.ensure_future(one(body)))
        await asyncio.gather(*tasks)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    brokers.add_argument(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, brokers.started(args.broker, Path(tmp)) as broker:
        folder = Path(tmp)
        pg = EmbeddedPostgres(data_dir=folder / "pg", port=free_port(), database="usertrail")
        pg.start()
        try:
            database_url = brokers.migrated_database(pg, "bench")
            settings = await brokers.events_and_profiles(broker, folder, "bench.events", 8)
            _, key = keys.create(database_url, "bench")
            collector = Collector(settings, database_url, folder / "collector.log")
            consumer = AIOKafkaConsumer(
                bootstrap_servers=settings.bootstrap_servers,
                enable_auto_commit=False,
                max_partition_fetch_bytes=1024,
            )
            await consumer.start()
            tps = [TopicPartition(settings.events_topic, p) for p in range(8)]
            consumer.assign(tps)
            try:
                payloads = bodies(args.events)
                await sdk_round(settings, 2000)  # warm up
                await collector_round(collector.url, key, payloads[:20], consumer, tps)
                ratios, p99s = [], []
                for r in range(args.rounds):
                    sdk = await sdk_round(settings, args.events)
                    via = await collector_round(collector.url, key, payloads, consumer, tps)
                    half = via / 2
                    paced = payloads[: max(20, int(half * 5 / BATCH))]  # about 5 s of it
                    times = sorted(await paced_latencies(collector.url, key, paced, half))
                    p50 = times[len(times) // 2] * 1000
                    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
                    ratios.append(via / sdk)
                    p99s.append(p99)
                    print(
                        f"round {r + 1}: SDK {sdk:,.0f} ev/s   collector {via:,.0f} ev/s   "
                        f"ratio {via / sdk:.2f}   at {half:,.0f} ev/s: p50 {p50:.1f} ms, "
                        f"p99 {p99:.1f} ms",
                        flush=True,
                    )
                print(
                    f"median ratio collector/SDK: {statistics.median(ratios):.2f} (target >= 0.5); "
                    f"median p99 at half the maximum rate: {statistics.median(p99s):.1f} ms "
                    "(target < 50 ms)"
                )
            finally:
                await stop_within(consumer, 10)
                collector.stop()
        finally:
            pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
