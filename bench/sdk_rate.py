"""SDK ``track_interaction`` rate against a raw ``AIOKafkaProducer.send`` loop.

Both send the same interactions with the same producer settings (acks=all,
lz4, linger 5 ms, 256 KiB batches) to the same broker, in alternating rounds
of one run; the raw loop sends pre-encoded bytes, so the SDK's validation,
id and encoding costs are all counted against it. Prints each round and the
median ratio SDK/raw (target: >= 0.8).

    ./dev bench sdk_rate [--events 50000] [--rounds 3] [--broker tansu|kafka]

Runs on a broker it starts itself: tansu, or one Apache Kafka node.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import brokers
from aiokafka import AIOKafkaProducer
from usertrail.producers import TrackingClient
from usertrail.producers.events import build, encode, key
from usertrail.producers.ids import uuid7

from usertrail.settings import Settings
from usertrail.topics import ensure_topics

OPTIONS = {"acks": "all", "compression_type": "lz4", "linger_ms": 5, "max_batch_size": 256 * 1024}


def fields(i: int) -> dict[str, object]:
    return {
        "user_id": f"user-{i % 1000}",
        "type": "reading",
        "service": "tarot",
        "theme": "love",
        "rating": 1 + i % 5,
        "metadata": {"duration": i % 600},
    }


def settle_heap() -> None:
    """Both legs alike: the inputs built before the timed loop (50,000 dicts
    or payloads) are moved out of the garbage collector's reach, so a full
    collection during the loop costs what the loop allocates, not what the
    harness holds."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def raw_round(settings: Settings, n: int) -> float:
    now = datetime.now(UTC)
    payloads = []
    for i in range(n):
        event = build("interaction", event_id=uuid7(), occurred_at=now, source="bench", **fields(i))
        payloads.append((key(event), encode(event)))
    # the idempotent producer where the broker has one, as the SDK uses it
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_idempotence=not settings.is_tansu,
        **OPTIONS,
    )
    await producer.start()
    settle_heap()
    try:
        started = time.perf_counter()
        for k, v in payloads:
            await producer.send(settings.events_topic, v, key=k)
        await producer.flush()
        return n / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def sdk_round(settings: Settings, n: int) -> float:
    args = [fields(i) for i in range(n)]
    client = TrackingClient(source="bench", settings=settings, **OPTIONS)  # type: ignore[arg-type]
    await client.start()
    settle_heap()
    try:
        started = time.perf_counter()
        for f in args:
            await client.track_interaction(**f)  # type: ignore[arg-type]
        report = await client.flush()
        elapsed = time.perf_counter() - started
        assert report.delivered == n, report
        return n / elapsed
    finally:
        await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    brokers.add_argument(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, brokers.started(args.broker, Path(tmp)) as broker:
        settings = Settings(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            data_dir=Path(tmp),
            events_topic="bench.events",
        )
        await ensure_topics(settings)
        await raw_round(settings, 2000)  # warm up connections and code paths
        await sdk_round(settings, 2000)
        ratios = []
        for r in range(args.rounds):
            raw = await raw_round(settings, args.events)
            sdk = await sdk_round(settings, args.events)
            ratios.append(sdk / raw)
            print(
                f"round {r + 1}: raw send {raw:,.0f} ev/s   SDK track_interaction "
                f"{sdk:,.0f} ev/s   ratio {sdk / raw:.2f}"
            )
        print(f"median ratio SDK/raw: {statistics.median(ratios):.2f} (target >= 0.8)")


if __name__ == "__main__":
    asyncio.run(main())
