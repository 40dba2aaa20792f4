"""faust's consumer where faust offers no setting, and the faust and
aiokafka internals that takes (used here and, for the store, in
stream/store.py only; an upgrade that changes them fails
``tests/stream/test_consumer.py``).

The fetch wait: faust creates its worker's aiokafka consumer with a fixed
``fetch_max_wait_ms=1500``. On Apache Kafka that costs nothing (a waiting
fetch is answered as records arrive); on tansu a fetch is answered only when
its wait is over, so an event would wait up to 1.5 s before the worker saw
it (docs/brokers.md, "Fetches wait their whole wait"). aiokafka's fetcher
reads the wait for every request it builds, so setting it once the consumer
runs applies from the next fetch on."""

from __future__ import annotations

from typing import Any


def _fetcher(app: Any) -> Any:
    # faust's ThreadDelegateConsumer -> its AIOKafkaConsumerThread -> the
    # aiokafka consumer it started -> that consumer's Fetcher
    return app.consumer._thread._ensure_consumer()._fetcher


def set_fetch_wait(app: Any, wait_ms: int) -> None:
    """Make ``app``'s running worker consumer wait at most ``wait_ms`` per
    fetch (from its next fetch on)."""
    fetcher = _fetcher(app)
    if not isinstance(getattr(fetcher, "_fetch_max_wait_ms", None), int):
        raise RuntimeError("aiokafka's fetcher no longer keeps _fetch_max_wait_ms")
    fetcher._fetch_max_wait_ms = wait_ms
