"""The event contract: round trips, and a clear error for every bad input."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from usertrail.producers import events, ids
from usertrail.producers.events import EVENT_MAX_BYTES, build, decode, encode
from usertrail.producers.ids import uuid7, uuid7_time_ms

from tests.contract import (
    _interaction,
    any_event,
    event_ids,
)
from usertrail.errors import EventValidationError


@given(any_event)
def test_any_valid_event_round_trips_through_json_unchanged(event: events.EventBase) -> None:
    wire = encode(event)
    again = decode(wire)
    assert again == event
    assert encode(again) == wire
    assert type(again) is type(event)


@given(any_event)
def test_wire_form_is_camel_case_utc_json(event: events.EventBase) -> None:
    raw = json.loads(encode(event))
    assert raw["kind"] == event.kind
    assert raw["eventId"] == event.event_id
    assert raw["userId"] == event.user_id
    assert raw["schemaVersion"] == 1
    assert raw["occurredAt"].endswith("Z")
    assert datetime.fromisoformat(raw["occurredAt"]) == event.occurred_at
    assert not any(v is None for v in raw.values()), "absent optionals are left out"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rating": 0}, "rating"),
        ({"rating": 6}, "rating"),
        ({"rating": 4.5}, "rating"),
        ({"rating": "5"}, "rating"),
        ({"rating": True}, "rating"),
        ({"occurred_at": datetime(2026, 1, 1, 12, 0)}, "occurred_at"),  # noqa: DTZ001 naive on purpose
        ({"type": "purchase"}, "type"),
        ({"colour": "red"}, "colour"),
        ({"metadata": [1, 2]}, "metadata"),
        ({"metadata": {"blob": "x" * EVENT_MAX_BYTES}}, "metadata"),
        ({"metadata": {"x": float("nan")}}, "metadata.x.float"),
        ({"metadata": {"when": object()}}, "metadata.when"),
        ({"metadata": {"deep": [{"x": float("inf")}]}}, "metadata.deep.list.0.dict.x.float"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "   "}, "user_id"),
        ({"service": "Tarot"}, "service"),
        ({"theme": "love life"}, "theme"),
        ({"event_id": "not-a-uuid"}, "event_id"),
        ({"event_id": "6ba7b810-9dad-11d1-80b4-00c04fd430c8"}, "event_id"),  # v1, not v7
    ],
)
def test_invalid_interaction_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(EventValidationError) as info:
        build("interaction", **_interaction(**changes))
    assert field in info.value.fields, info.value.errors
    assert str(info.value).startswith("invalid interaction event: ")


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"rating": "5"}, "rating"),
        ({"rating": 4.5}, "rating"),
        ({"occurredAt": "2026-01-01T12:00:00"}, "occurredAt"),
        ({"kind": "purchase"}, "event"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_wire_json_names_the_field(patch: dict[str, Any], field: str) -> None:
    raw = json.loads(encode(build("interaction", **_interaction(rating=3))))
    raw.update(patch)
    with pytest.raises(EventValidationError) as info:
        decode(json.dumps(raw))
    assert any(f == field or f.startswith(field) for f in info.value.fields), info.value.errors


def test_oversized_wire_event_is_refused_before_parsing() -> None:
    raw = json.loads(encode(build("interaction", **_interaction())))
    raw["metadata"] = {"blob": "x" * (2 * 1024 * 1024)}
    with pytest.raises(EventValidationError) as info:
        decode(json.dumps(raw))
    assert info.value.fields == ["metadata"]


def test_not_json_is_a_validation_error() -> None:
    with pytest.raises(EventValidationError):
        decode(b"\x00not json")


def test_preferences_must_carry_something() -> None:
    with pytest.raises(EventValidationError, match="at least one preference"):
        build(
            "preferences.updated",
            event_id=uuid7(),
            user_id="u",
            occurred_at=datetime.now(UTC),
            source="web",
        )


def test_preferences_report_only_carried_fields() -> None:
    event = build(
        "preferences.updated",
        event_id=uuid7(),
        user_id="u",
        occurred_at=datetime.now(UTC),
        source="web",
        tone_preference="mystical",
    )
    assert isinstance(event, events.PreferencesUpdated)
    assert event.carried() == {"tonePreference": "mystical"}


def test_events_are_frozen() -> None:
    event = build("interaction", **_interaction())
    with pytest.raises(ValueError, match="frozen"):
        event.rating = 3  # type: ignore[misc]


def test_occurred_at_is_normalised_to_utc() -> None:
    seoul = datetime(2026, 3, 1, 9, 0, tzinfo=timezone(timedelta(hours=9)))
    event = build("interaction", **_interaction(occurred_at=seoul))
    assert event.occurred_at.tzinfo == UTC
    assert json.loads(encode(event))["occurredAt"] == "2026-03-01T00:00:00Z"


@given(event_ids)
def test_any_uuid7_is_a_valid_event_id(event_id: str) -> None:
    assert uuid.UUID(event_id).version == 7
    build(
        "user.erased", event_id=event_id, user_id="u", occurred_at=datetime.now(UTC), source="web"
    )


@given(st.integers(0, 2**48 - 1), st.integers(0, 2**12 - 1), st.integers(0, 2**62 - 1))
def test_uuid7_fast_text_is_the_rfc_layout(ms: int, rand_a: int, rand_b: int) -> None:
    assert ids._text(ids._time_text(ms), rand_a, rand_b) == ids.uuid7_from(ms, rand_a, rand_b)


def test_uuid7_ids_are_time_ordered_and_unique() -> None:
    ids = [uuid7() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert abs(uuid7_time_ms(ids[-1]) - datetime.now(UTC).timestamp() * 1000) < 5000


def test_json_schema_has_every_kind_and_rejects_what_the_models_reject() -> None:
    schemas = events.json_schemas()
    assert set(schemas) == set(events.EVENT_TYPES)
    interaction = schemas["interaction"]
    assert interaction["additionalProperties"] is False
    assert {"eventId", "userId", "occurredAt", "source", "type", "service", "kind"} <= set(
        interaction["required"]
    )
    rating = interaction["properties"]["rating"]["anyOf"][0]
    assert (rating["type"], rating["minimum"], rating["maximum"]) == ("integer", 1, 5)
