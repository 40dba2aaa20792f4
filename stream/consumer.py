"""faust's consumer where faust offers no setting, and the faust and
aiokafka internals that takes (used here and, for the store, in
stream/store.py only; an upgrade that changes them fails
``tests/stream/test_consumer.py``, and pyproject.toml pins faust to the
minor version they were read from).

Batched delivery (``deliver_in_batches``): faust hands a worker's records to
its agents one at a time. For each record its fetch loop builds a
``Message``, races the delivery against a flow-control event (four
asyncio tasks a record), and its conductor builds an ``Event`` that goes
through a channel queue, the stream's iteration and sensors and, one by one
again, its acknowledgement: about 130 us a record here, where decoding and
folding it cost about 15. The worker's fold takes whole batches, so the
events topic bypasses that path: each fetch's records of the events topic
go to the folder as aiokafka gave them, in one call, and are acknowledged
for faust's commits in one step once the folder has folded them and their
writes are acknowledged. Every other topic (the table's changelog,
read during recovery) goes through faust's path as before. What stays
faust's: group membership and assignment, pausing partitions during
recovery (only active partitions are delivered), flow control on a
rebalance (a fetch from an older generation is dropped; its records are
read again from the applied offsets), commits and the worker's lifecycle.

The fetch wait: faust creates its worker's aiokafka consumer with a fixed
``fetch_max_wait_ms=1500`` and ``fetch_min_bytes=1``. On tansu a fetch is
answered only when its wait is over, so an event would wait up to 1.5 s
before the worker saw it (docs/brokers.md, "Fetches wait their whole
wait"); on Apache Kafka a fetch was answered at its first record, so at a
steady trickle every few records cost a fetch and a hand-over
(``Settings.fetch_min_bytes``). aiokafka's fetcher reads both for every
request it builds, so setting them once the consumer runs applies from the
next fetch on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka.structs import ConsumerRecord
from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

Deliver = Callable[[list[ConsumerRecord[bytes, bytes]]], Awaitable[None]]
"""Takes one fetch's records of the events topic (in offset order per
partition); returns once it holds them (they count as acknowledged)."""


def _fetcher(app: Any) -> Any:
    # faust's ThreadDelegateConsumer -> its AIOKafkaConsumerThread -> the
    # aiokafka consumer it started -> that consumer's Fetcher
    return app.consumer._thread._ensure_consumer()._fetcher


def set_fetch_wait(app: Any, wait_ms: int, min_bytes: int) -> None:
    """Make ``app``'s running worker consumer's fetches wait at most
    ``wait_ms`` for ``min_bytes`` (from its next fetch on)."""
    fetcher = _fetcher(app)
    for name in ("_fetch_max_wait_ms", "_fetch_min_bytes"):
        if not isinstance(getattr(fetcher, name, None), int):
            raise RuntimeError(f"aiokafka's fetcher no longer keeps {name}")
    fetcher._fetch_max_wait_ms = wait_ms
    fetcher._fetch_min_bytes = min_bytes


def acknowledge(consumer: Any, topic: str, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
    """Mark ``records`` of ``topic`` acknowledged for faust's commits, as
    ``Consumer.ack`` does for each of its messages."""
    offsets: dict[int, list[int]] = {}
    for record in records:
        offsets.setdefault(record.partition, []).append(record.offset)
    with ack_lock:
        for partition, got in offsets.items():
            tp = TP(topic, partition)
            committed = consumer._committed_offset[tp]
            index = consumer._acked_index[tp]
            new = [o for o in got if (committed is None or o >= committed) and o not in index]
            index.update(new)
            consumer._acked[tp].extend(new)
            consumer._n_acked += len(new)
    notify(consumer._waiting_for_ack)


RELIED_ON = (
    "_drain_messages",
    "_wait_next_records",
    "_to_message",
    "callback",
    "_stopped",
    "_buffered_partitions",
    "flow_active",
    "suspend_flow",
    "wait_first",
    "diag",
    "_committed_offset",
    "_acked_index",
    "_acked",
    "_n_acked",
    "_waiting_for_ack",
)
"""faust consumer attributes the batched delivery uses."""


def deliver_in_batches(app: Any, topic: str, deliver: Deliver) -> None:
    """From now on ``app``'s consumer hands ``topic``'s records to
    ``deliver``, a fetch at a time (module notes); call before the worker
    starts."""
    consumer = app.consumer
    missing = [name for name in RELIED_ON if not hasattr(consumer, name)]
    if missing:  # a faust upgrade: tests/stream/test_consumer.py says what changed
        raise RuntimeError(f"faust's consumer no longer has {', '.join(missing)}")

    async def drain_messages(fetcher: Any) -> None:  # faust's Consumer._drain_messages
        callback = consumer.callback
        to_message = consumer._to_message
        stopping = consumer._stopped.is_set
        fetcher_stopping = fetcher._stopped.is_set
        buffered = consumer._buffered_partitions
        try:
            while not (stopping() or fetcher_stopping()):
                consumer.diag.set_flag(CONSUMER_FETCHING)
                records, active = await consumer._wait_next_records(1.0)
                await asyncio.sleep(0)  # as faust's loop: never starve the rest
                if not records or consumer.should_stop:
                    continue
                generation = app.consumer_generation_id
                batch: list[ConsumerRecord[bytes, bytes]] = []
                for tp, got in records.items():
                    if active is not None and tp not in active and tp not in buffered:
                        continue  # paused meanwhile (recovery): fetched again on resume
                    if tp.topic == topic:
                        batch.extend(got)
                        continue
                    for record in got:
                        if not consumer.flow_active or app.consumer_generation_id != generation:
                            break
                        await consumer.wait_first(
                            callback(to_message(tp, record)), consumer.suspend_flow.wait()
                        )
                if not batch or not consumer.flow_active:
                    continue
                if app.consumer_generation_id != generation:
                    continue  # a rebalance began: read again from the applied offsets
                handing = deliver(batch)
                await consumer.wait_first(handing, consumer.suspend_flow.wait())
                # not acknowledged here: the folder does, once the batch is
                # folded and its writes are acknowledged (stream/app.py), and
                # faust's commit timer commits what is acknowledged
                consumer.diag.unset_flag(CONSUMER_FETCHING)
        except consumer.consumer_stopped_errors:
            if consumer.transport.app.should_stop:
                return  # stopping anyway
            raise
        except asyncio.CancelledError:
            if consumer.transport.app.should_stop:
                return
            raise
        finally:
            consumer.diag.unset_flag(CONSUMER_FETCHING)

    consumer._drain_messages = drain_messages
