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
    built = inspect.getsource(Fetcher._get_actions_per_node)
    assert "FetchRequest(\n                self._fetch_max_wait_ms," in built
