"""``stop_within`` on a broker that stopped answering (a real tansu, frozen
with SIGSTOP): the stop gives up in time and leaves no connection open."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from usertrail.embedded import EmbeddedBroker, free_port
from usertrail.kafka import stop_within


@pytest.fixture
def frozen_later(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of its own: the test freezes it."""
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "tansu.log")
    broker.start()
    try:
        yield broker
    finally:
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGCONT)
        broker.stop()


def _freeze(broker: EmbeddedBroker) -> None:
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)


def _open_to(broker: EmbeddedBroker) -> list[str]:
    """This process's sockets connected to ``broker``."""
    port = int(broker.bootstrap_servers.rsplit(":", 1)[1])
    return [
        f"{c.laddr} -> {c.raddr} {c.status}"
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    ]


async def test_a_producer_that_cannot_stop_is_closed_anyway(frozen_later: EmbeddedBroker) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=frozen_later.bootstrap_servers, acks="all")
    await producer.start()
    await producer.send_and_wait("t", b"delivered")
    await producer.send("t", b"never acknowledged")
    assert _open_to(frozen_later), "connected before the broker froze"
    _freeze(frozen_later)
    started = time.monotonic()
    await stop_within(producer, 1, "producer")
    assert time.monotonic() - started < 8
    assert _open_to(frozen_later) == []


async def test_a_consumer_that_cannot_stop_is_closed_anyway(frozen_later: EmbeddedBroker) -> None:
    consumer = AIOKafkaConsumer(
        "t",
        bootstrap_servers=frozen_later.bootstrap_servers,
        group_id="g",
        session_timeout_ms=2000,
        heartbeat_interval_ms=200,
    )
    await consumer.start()
    await consumer.getmany(timeout_ms=3000)
    assert _open_to(frozen_later), "connected before the broker froze"
    _freeze(frozen_later)
    started = time.monotonic()
    await stop_within(consumer, 1, "consumer")
    assert time.monotonic() - started < 8
    assert _open_to(frozen_later) == []
