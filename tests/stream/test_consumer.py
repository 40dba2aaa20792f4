"""What stream/consumer.py takes from faust and aiokafka: if an upgrade
changes it, this fails before a worker on tansu waits 1.5 s per fetch
again (or crashes setting the wait)."""

from __future__ import annotations

import inspect

from aiokafka.consumer.consumer import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher
from faust.transport.consumer import ThreadDelegateConsumer
from faust.transport.drivers import aiokafka as faust_aiokafka


def test_what_the_fetch_wait_takes_from_faust_and_aiokafka_is_still_there() -> None:
    # why it is set at all: faust fixes the wait, with no setting for it
    # (when faust offers one, use it and drop stream/consumer.py)
    assert "fetch_max_wait_ms=1500" in inspect.getsource(
        faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
    )
    # the path stream/consumer.py walks: app.consumer._thread ...
    assert "self._thread = self._new_consumer_thread()" in inspect.getsource(
        ThreadDelegateConsumer.__init__
    )
    assert faust_aiokafka.Transport.Consumer is faust_aiokafka.Consumer
    assert "AIOKafkaConsumerThread(" in inspect.getsource(
        faust_aiokafka.Consumer._new_consumer_thread
    )
    # ... ._ensure_consumer() (the started aiokafka consumer) ...
    assert "return self._consumer" in inspect.getsource(
        faust_aiokafka.AIOKafkaConsumerThread._ensure_consumer
    )
    # ... ._fetcher, whose wait is read for every fetch request it builds
    assert "self._fetcher = Fetcher(" in inspect.getsource(AIOKafkaConsumer.start)
    assert "self._fetch_max_wait_ms = fetch_max_wait_ms" in inspect.getsource(Fetcher.__init__)
    assert "self._fetch_min_bytes = fetch_min_bytes" in inspect.getsource(Fetcher.__init__)
    built = inspect.getsource(Fetcher._get_actions_per_node)
    assert (
        "FetchRequest(\n                self._fetch_max_wait_ms,\n                self._fetch_min_bytes,"
        in built
    )


def test_what_the_batched_delivery_takes_from_faust_is_still_there() -> None:
    """stream/consumer.py replaces faust's fetch loop for the events topic
    and acknowledges as ``Consumer.ack`` does, for faust's commit timer: if
    faust changes any of them, the worker would silently stop folding or
    committing."""
    from faust.transport import consumer as faust_consumer
    from usertrail.stream import consumer

    Consumer = faust_consumer.Consumer
    # the fetch loop faust's Fetcher runs, which the worker replaces
    assert "await consumer._drain_messages(self)" in inspect.getsource(faust_consumer.Fetcher)
    drain = inspect.getsource(Consumer._drain_messages)
    for step in (  # what the replacement keeps doing as faust does
        "getmany(timeout=1.0)",
        "callback(message), self.suspend_flow.wait()",
    ):
        assert step in drain, step
    # what commits the acknowledged offsets (the folder acknowledges a batch
    # once it is durable; nothing else asks for a commit)
    commits = inspect.getsource(Consumer._commit_handler.fun)  # a mode ServiceTask
    for step in ('self.itertimer(interval, name="commit")', "await self.commit()"):
        assert step in commits, step
    getmany = inspect.getsource(Consumer.getmany)
    for step in (
        "records, active_partitions = await self._wait_next_records(timeout)",
        "generation_id = self.app.consumer_generation_id",
        "tp in active_partitions",
        "or tp in self._buffered_partitions",
        "yield tp, to_message(tp, record)",
    ):
        assert step in getmany, step
    # acknowledging: the bookkeeping consumer.acknowledge repeats per batch
    ack = inspect.getsource(Consumer.ack)
    for step in (
        "with ack_lock:",
        "committed = self._committed_offset[tp]",
        "if committed is None or offset >= committed:",
        "acked_index.add(offset)",
        "acked_for_tp.append(offset)",
        "self._n_acked += 1",
        "notify(self._waiting_for_ack)",
    ):
        assert step in ack, step
    # every attribute it uses: the class's, or set in an __init__ of its own
    # or of mode's Service
    from faust.transport.drivers.aiokafka import Consumer as WorkerConsumer

    inits = "".join(
        inspect.getsource(cls.__init__)
        for cls in WorkerConsumer.__mro__
        if inspect.isfunction(vars(cls).get("__init__"))
    )
    missing = [
        name
        for name in consumer.RELIED_ON
        if not hasattr(WorkerConsumer, name) and f"self.{name} =" not in inits
    ]
    assert not missing
