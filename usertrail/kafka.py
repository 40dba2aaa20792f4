"""Stopping aiokafka clients on a broker that may not answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

log = logging.getLogger("usertrail")


async def stop_within(
    client: AIOKafkaProducer | AIOKafkaConsumer, seconds: float, what: str = "kafka client"
) -> None:
    """``client.stop()``, bounded: aiokafka's stop can hang on a broker that
    went away (BROKER.md 8). One that did not stop within ``seconds`` has
    its connections closed directly; left open, each held its socket until
    garbage collection found it, with a ResourceWarning then."""
    try:
        await asyncio.wait_for(client.stop(), seconds)
        return
    except (TimeoutError, KafkaError) as exc:
        log.warning("%s did not stop cleanly: %r", what, exc)
    connections = client.client if isinstance(client, AIOKafkaProducer) else client._client
    with contextlib.suppress(TimeoutError, KafkaError, OSError):
        await asyncio.wait_for(connections.close(), timeout=5)
