"""The faust worker: folds ``usertrail.events`` into per-user profiles.

``create_app(settings, rules)`` builds the app; nothing here runs at import.
The agent only moves bytes and calls the pure functions (``fold``,
``segment``): per event it reads the user's state from the table, folds the
event in (a redelivered or resent event leaves it unchanged, DESIGN.md
rule 2), writes it back and, when the user's segments or vector changed,
publishes a ``ProfileMessage`` to ``usertrail.profiles``.

The table is co-partitioned with the events: faust writes a key to the
changelog partition of the event being processed, which is the partition
the producers' murmur2 partitioner chose for the same user id, so every
worker recovers exactly its own users (``test_stream`` checks both agree).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import faust
from pydantic import TypeAdapter
from usertrail.producers.profiles import ProfileMessage, SegmentAssignment, encode_profile
from usertrail.sink.plan import Decoded, Record, classify
from usertrail.stream.fold import Profile, fold
from usertrail.stream.segments import Rules, Segmentation, segment

from usertrail.settings import Settings

log = logging.getLogger("usertrail.stream")

TABLE = "profiles"


@dataclass(frozen=True)
class UserState:
    """A table value: the fold state and what was last published."""

    profile: Profile
    segments_changed_at: datetime | None = None
    published: str | None = None  # signature of the last published message
    # (segment, score) of the profile's segmentation, so the next event need
    # not segment the previous profile again to see whether segments changed
    segment_key: tuple[tuple[str, float], ...] | None = None


_STATE = TypeAdapter(UserState)


def dump_state(state: UserState) -> bytes:
    """A table value as the changelog stores it."""
    return _STATE.dump_json(state)


def load_state(data: bytes | None) -> UserState | None:
    return None if data is None else _STATE.validate_json(data)


def message_for(state: UserState, seg: Segmentation, offset: int | None) -> ProfileMessage:
    p = state.profile
    assert p.now is not None
    return ProfileMessage(
        user_id=p.user_id,
        updated_at=p.now,
        vector={k: round(v, 9) for k, v in sorted(p.affinity.items())},
        segments=[
            SegmentAssignment(segment=a.segment, score=round(a.score, 6), reasons=a.reasons)
            for a in seg.assignments
        ],
        primary_segment=seg.primary_segment,
        segment_confidence=seg.segment_confidence,
        last_segment_update=state.segments_changed_at,
        source_offset=offset,
    )


def step(
    state: UserState | None, item: Decoded, rules: Rules
) -> tuple[UserState, ProfileMessage | None, bool]:
    """One event through the fold: (new state, message to publish or None,
    whether anything changed). Pure: the agent only stores and sends."""
    event, offset = item.event, item.record.offset
    before = state or UserState(Profile(event.user_id))
    profile = fold(before.profile, event, offset, config=rules.affinity_config())
    if profile is before.profile:
        return before, None, False
    if profile.erased_at is not None and event.kind == "user.erased":
        erased_key = _segment_key(segment(profile, rules))
        return UserState(profile, segment_key=erased_key), None, True  # publish a tombstone
    seg = segment(profile, rules)
    seg_key = _segment_key(seg)
    changed_at = before.segments_changed_at
    if state is None or seg_key != before.segment_key:
        changed_at = profile.now
    new = UserState(profile, changed_at, before.published, seg_key)
    message = message_for(new, seg, offset)
    signature = json.dumps(
        [message.vector, seg_key, message.primary_segment, message.segment_confidence]
    )
    if signature == before.published:
        return new, None, True
    return UserState(profile, changed_at, signature, seg_key), message, True


def _segment_key(seg: Segmentation) -> tuple[tuple[str, float], ...]:
    return tuple((a.segment, round(a.score, 6)) for a in seg.assignments)


def create_app(
    settings: Settings, rules: Rules, *, web_port: int = 6066, store: str = "memory://"
) -> faust.App:
    group = settings.group_options()
    datadir = settings.data_dir / "faust" / settings.stream_app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.stream_app_id,
        broker=[f"kafka://{host}" for host in settings.bootstrap_servers.split(",")],
        store=store,
        autodiscover=False,
        topic_partitions=settings.events_partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,
        processing_guarantee="at_least_once",
        broker_session_timeout=group["session_timeout_ms"] / 1000,
        broker_heartbeat_interval=group["heartbeat_interval_ms"] / 1000,
        broker_rebalance_timeout=group["rebalance_timeout_ms"] / 1000,
        # tansu answers ListOffsets(latest) with the first offset of the last
        # batch + 1 (BROKER.md 1): table recovery is only exact when faust's
        # own producer writes one record per batch. Not on a real cluster.
        producer_max_batch_size=1 if settings.is_tansu else 16384,
        # faust's own files (rocksdb tables, if chosen) under our data
        # directory, never in the working directory
        datadir=str(datadir),
        web_port=web_port,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
    )
    events = app.topic(
        settings.events_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    profiles_out = app.topic(
        settings.profiles_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    table = app.Table(
        TABLE,
        default=None,
        partitions=settings.events_partitions,
        # bytes -> bytes: faust's raw codec end to end (changelog, store,
        # recovery). The key is the user id in UTF-8, the very key bytes of
        # the events, so the changelog partition is the producers' partition.
        key_type=bytes,
        value_type=bytes,
    )

    @app.agent(events)
    async def fold_events(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            message = event.message
            item = classify(
                Record(message.topic, message.partition, message.offset, message.key, message.value)
            )
            if not isinstance(item, Decoded):
                continue  # the sink dead-letters it, with its reason and bytes
            user = item.event.user_id
            key = user.encode()
            state, out, changed = step(load_state(table.get(key)), item, rules)
            if not changed:
                continue
            table[key] = dump_state(state)
            if item.event.kind == "user.erased":
                await profiles_out.send(key=user.encode(), value=None)
            elif out is not None:
                await profiles_out.send(key=user.encode(), value=encode_profile(out))

    @app.task
    async def know_the_changelog() -> None:
        # faust's table router asks the producer's metadata for the
        # changelog's partitions and fails (a 500) until it has them.
        producer = app.producer._ensure_producer()
        await producer.partitions_for(table.changelog_topic.get_topic_name())
        routable.set()

    routable = asyncio.Event()

    def when_routable(view: Any) -> Any:
        @functools.wraps(view)
        async def guarded(web: Any, request: Any, **kwargs: Any) -> Any:
            if not routable.is_set():
                return web.json({"error": "starting: try again shortly"}, status=503)
            return await view(web, request, **kwargs)

        return guarded

    @app.page("/profiles/{user_id}")
    @when_routable
    @app.table_route(table=table, match_info="user_id")
    async def get_profile(web: Any, request: Any, user_id: str) -> Any:
        state = load_state(table.get(user_id.encode()))
        if state is None or state.profile.erased_at is not None:
            return web.json({"error": f"unknown user {user_id!r}"}, status=404)
        seg = segment(state.profile, rules)
        body = message_for(state, seg, state.profile.last_offset).model_dump(
            mode="json", by_alias=True
        )
        p = state.profile
        body["profile"] = {
            "countsByType": p.counts_by_type,
            "countsByService": p.counts_by_service,
            "countsByTheme": p.counts_by_theme,
            "favouriteThemes": p.favourite_themes(),
            "ratingSumByService": p.rating_sum_by_service,
            "ratingCountByService": p.rating_count_by_service,
            "firstActivity": p.first_activity.isoformat() if p.first_activity else None,
            "lastActivity": p.last_activity.isoformat() if p.last_activity else None,
            "preferences": p.preferences,
            "onboarding": p.onboarding,
        }
        return web.json(body)

    app.usertrail_table = table  # for tests and operator tools
    return app
