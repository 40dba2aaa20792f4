"""The topics and their configuration, created idempotently."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from usertrail.errors import BrokerUnavailableError
from usertrail.settings import Settings

log = logging.getLogger("usertrail.topics")


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
