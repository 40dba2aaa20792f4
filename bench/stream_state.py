"""A stream worker's memory as users grow, with its table in memory and in
RocksDB (stream/store.py), in the same run.

Two events topics on one Apache Kafka node: SMALL users and 4 x SMALL users
(two events each). Per round, for each store and each topic, a fresh real
worker (``create_app``, as ``usertrail stream`` runs it, a new app id) folds
the whole topic; once its last batch is acknowledged its resident memory
(VmRSS of the worker's own process, not its fold helper) is read. Prints
each round and, per store, the median ratio of memory with 4x the users to
memory with 1x (in memory it grows with the users; on disk it should stay
near 1), and the median ratio rocksdb/memory at 4x.

    ./dev bench stream_state [--users 25000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import brokers
import stream_rate
from usertrail.producers import TrackingClient, demo
from usertrail.producers.ids import uuid7

PARTITIONS = 8


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def worker_rss(env: dict[str, str], expected: int, tmp: Path, name: str) -> float:
    log, result = tmp / f"{name}.log", tmp / f"{name}.json"
    result.unlink(missing_ok=True)
    proc = stream_rate.spawn("worker", env, expected, log, result)
    try:
        deadline = time.monotonic() + 900
        while not result.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} gave no result:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # the last batch's table writes are done
        return rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, brokers.started("kafka", Path(tmp)) as broker:
        sizes = {"1x": args.users, "4x": 4 * args.users}
        sent: dict[str, int] = {}
        for label, users in sizes.items():
            topic = f"bench.events.{label}"
            settings = await brokers.events_and_profiles(broker, Path(tmp), topic, PARTITIONS)
            async with TrackingClient(source="demo", settings=settings) as client:
                sent[label] = await demo.run(
                    client, demo.plan(users=users, events=2 * users, seed=5)
                )
            print(f"{topic}: {sent[label]:,} events of {users:,} users", flush=True)
        rss: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            line = []
            for store in ("memory", "rocksdb"):
                for label in sizes:
                    env = {
                        **os.environ,
                        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                        "USERTRAIL_EVENTS_TOPIC": f"bench.events.{label}",
                        "USERTRAIL_PROFILES_TOPIC": "bench.profiles",
                        "USERTRAIL_EVENTS_PARTITIONS": str(PARTITIONS),
                        "USERTRAIL_DATA_DIR": tmp,
                        "USERTRAIL_STREAM_APP_ID": f"bench-{store}-{uuid7()}",
                        "USERTRAIL_STREAM_STORE": store,
                    }
                    got = await worker_rss(env, sent[label], Path(tmp), f"{store}-{label}")
                    rss.setdefault((store, label), []).append(got)
                    line.append(f"{store} {label} {got:,.0f} MiB")
            print(f"round {r + 1}: " + "   ".join(line), flush=True)
        for store in ("memory", "rocksdb"):
            ratios = [
                big / small
                for small, big in zip(rss[(store, "1x")], rss[(store, "4x")], strict=True)
            ]
            print(
                f"{store}: memory with 4x the users / with 1x, "
                f"median {statistics.median(ratios):.2f}"
            )
        at_4x = [d / m for m, d in zip(rss[("memory", "4x")], rss[("rocksdb", "4x")], strict=True)]
        print(f"rocksdb/memory at 4x the users: median {statistics.median(at_4x):.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=25_000)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
