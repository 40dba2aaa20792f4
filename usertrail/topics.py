"""The topics and their configuration, created idempotently."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from usertrail.errors import BrokerUnavailableError, ConfigurationError
from usertrail.settings import Settings

log = logging.getLogger("usertrail.topics")

FORWARDED = "usertrail-forwarded-from"
"""Header of a record the stream copied to its home partition: the
original's ``partition/offset`` (docs/architecture.md, rule 4)."""


@functools.lru_cache(maxsize=1 << 17)
def home_partition(key: bytes, partitions: int) -> int:
    """The partition of a record keyed ``key`` when the topic has
    ``partitions``: murmur2 of the key, as the SDK, aiokafka and the Java
    client place it. A user's events are folded and written in the order of
    this one partition; a record a producer put elsewhere is copied here.
    (Remembered per key: murmur2 in Python costs about 5 us, and every
    record of the sink and the stream asks.)"""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


def is_home(key: bytes | None, partition: int, partitions: int | None) -> bool:
    """Whether a record is read where it is applied: at its key's home, or
    it has no key (nothing to place it by), or the count is unknown."""
    return key is None or not partitions or home_partition(key, partitions) == partition


def copy_headers(
    headers: Iterable[tuple[str, bytes]], partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """The headers of a record's copy at its home: the original's, naming
    the original (``FORWARDED``) in place of any such header it had."""
    return [
        *((k, v) for k, v in headers if k != FORWARDED),
        (FORWARDED, f"{partition}/{offset}".encode()),
    ]


def homes_in(settings: Settings, cluster: Any) -> int | None:
    """``homes_count`` from an aiokafka cluster's metadata."""
    topics = (settings.events_topic, settings.changelog_topic, settings.profiles_topic)
    return homes_count(settings, {t: len(cluster.partitions_for_topic(t) or ()) for t in topics})


def homes_count(settings: Settings, counts: dict[str, int]) -> int | None:
    """The partition count homes are taken over: the events topic's, when it
    equals the profiles topic's (or, without one, the stream changelog's:
    each is created with it, and the profiles topic is named beside the
    events topic, where the changelog is named by the stream's app id). A
    grown events topic would move users to other homes, which nothing here
    supports: refused, with what to do. ``counts``: partitions per topic as
    the broker answered (0: no topic)."""
    events = counts.get(settings.events_topic)
    for reference in (settings.profiles_topic, settings.changelog_topic):
        made_with = counts.get(reference)
        if not made_with:
            continue
        if events and events != made_with:
            raise ConfigurationError(
                f"{settings.events_topic} has {events} partitions but {reference}, created "
                f"with it, has {made_with}: a user's events are applied in the order of one "
                "home partition (murmur2 of the user id over the partition count), and a "
                "changed count moves every home. usertrail does not support changing the "
                "events topic's partition count; set it back, or start a new events topic "
                "and re-send the log into it (docs/architecture.md, rule 4)"
            )
        break
    return events or None


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    forever = {"retention.ms": "-1", "retention.bytes": "-1"}
    return [
        # The source of truth: kept forever, keyed by user id.
        TopicSpec(settings.events_topic, settings.events_partitions, dict(forever)),
        # The latest profile per user; co-partitioned with the events.
        TopicSpec(
            settings.profiles_topic,
            settings.events_partitions,
            {"cleanup.policy": "compact"},
        ),
        # Events that could not be applied, with their reason in headers.
        TopicSpec(settings.dead_letter_topic, 1, dict(forever)),
        # The stream table's changelog, as faust would declare it, created here
        # first: a reader that asks for it before the first worker declared it
        # (replay, verify, a test) would otherwise have a broker with
        # auto.create.topics.enable make it with num.partitions (1 on Apache
        # Kafka), and faust then fails on partitions that do not exist.
        TopicSpec(
            settings.changelog_topic, settings.events_partitions, {"cleanup.policy": "compact"}
        ),
    ]


async def ensure_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> list[str]:
    """Create missing topics; return the names created. Existing topics are
    left as they are (a partition count that differs is logged)."""
    specs = specs if specs is not None else topic_specs(settings)
    admin = AIOKafkaAdminClient(**settings.kafka_options(), request_timeout_ms=15000)
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        raise BrokerUnavailableError(
            f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}"
        ) from exc
    created = []
    try:
        existing = set(await admin.list_topics())
        for spec in specs:
            if spec.name in existing:
                continue
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            num_partitions=spec.partitions,
                            replication_factor=settings.replicas(),
                            topic_configs=spec.config,
                        )
                    ]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another process created it between our list and create
        described = await admin.describe_topics([s.name for s in specs])
        counts = {info["topic"]: len(info.get("partitions", [])) for info in described}
        for spec in specs:
            count = counts.get(spec.name, 0)
            if count and count != spec.partitions:
                log.warning(
                    "topic %s has %d partitions, configured %d", spec.name, count, spec.partitions
                )
    finally:
        await admin.close()
    return created
