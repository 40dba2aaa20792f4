"""The event contract: what travels on ``usertrail.events``.

Every event is a frozen pydantic model with ``extra="forbid"``. On the wire it
is compact JSON with camelCase keys (the product's Prisma column names),
absent optional fields left out, keyed by the user id. ``encode`` and
``decode`` are the only ways in and out, so the bytes are the same wherever
an event is made.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from usertrail.errors import EventValidationError

SCHEMA_VERSION: Literal[1] = 1
EVENT_MAX_BYTES = 32 * 1024
"""Largest event accepted, as wire JSON; ``metadata`` (``answers`` of an
onboarding, ``notificationSettings`` of preferences) is what can grow."""
_FREE_FORM = {
    "interaction": "metadata",
    "onboarding.completed": "answers",
    "preferences.updated": "notification_settings",
}
USER_ID_MAX = 191
SOURCE_MAX = 100

# Checked by pydantic-core's regex engine (no Python call per field); the
# messages below replace its generic "should match pattern" in errors.
SLUG_PATTERN = r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$"
SLUG_MAX = 64
InteractionType = Literal["reading", "chat", "feedback", "share"]
INTERACTION_TYPES: tuple[str, ...] = get_args(InteractionType)
# Control characters (C0, DEL, C1) and white space, spelled out: "\\s" means
# other sets in other regex engines (pydantic-core's counts U+0085, a
# JavaScript validator's does not), and the JSON Schema carries this pattern.
_CONTROL = "\\x00-\\x1f\\x7f-\\x9f"
_SPACE = " \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
TEXT_ID_PATTERN = f"^[^{_CONTROL}]*[^{_CONTROL}{_SPACE}][^{_CONTROL}]*$"
# RFC 3339's date-time, exactly: a 'T' (or 't') between date and time, no
# leap second (no library here represents one), an offset as Z or +hh:mm.
# pydantic alone also takes a space for the 'T', an offset "+09" and more.
# [0-9], never "\\d" (Unicode digits in Python and Rust), and no lookahead.
RFC3339_PATTERN = (
    r"^(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # a year, not 0000
    r"-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt]"
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?"
    r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
_RFC3339 = re.compile(RFC3339_PATTERN)
FUTURE_BOUND_MS = 24 * 3600 * 1000
PAST_BOUND_MS = 3653 * 24 * 3600 * 1000
"""An event's ``occurredAt`` lies at most a day after its record's timestamp
(what the log holds, so a replay decides alike) and at most ten years
before it; outside, the event is a dead letter. One event from year 9999
would otherwise be every later rule's "now", one from 1970 the user's first
activity."""
FREE_FORM_DEPTH = 32
"""Levels of nesting a free-form object (``metadata`` and the like) may hold."""
UUID7_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
LANGUAGE_PATTERN = r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$"
_PATTERN_MESSAGES = {
    SLUG_PATTERN: "must be a lower-case slug (a-z, 0-9, '-' or '_' between them)",
    TEXT_ID_PATTERN: "must not be blank or contain control characters",
    UUID7_PATTERN: "must be a lower-case canonical UUID version 7 (time-ordered)",
    LANGUAGE_PATTERN: "must be a language tag such as 'en' or 'pt-BR'",
}


def _free_form(value: dict[str, Any]) -> dict[str, Any]:
    """What PostgreSQL's jsonb and every JSON parser take alike: finite
    numbers, no NUL in a string or key, valid Unicode, FREE_FORM_DEPTH
    levels at most. (pydantic's JsonValue takes NaN, Infinity, 1e400 as
    inf and NUL; PostgreSQL refuses them.)"""
    problem = _free_form_problem(value, 1)
    if problem is not None:
        raise ValueError(problem)
    return value


def _free_form_problem(value: Any, depth: int) -> str | None:
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain NUL (\\u0000) in a string"
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return "must be valid Unicode (no lone surrogate)"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "must hold finite numbers (no NaN or Infinity)"
    if isinstance(value, dict | list):
        if depth > FREE_FORM_DEPTH:
            return f"must not be nested more than {FREE_FORM_DEPTH} levels deep"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            problem = (_free_form_problem(k, depth) if isinstance(k, str) else None) or (
                _free_form_problem(v, depth + 1)
            )
            if problem is not None:
                return problem
    return None


def _whole_number(value: Any) -> Any:
    """4.0 is the integer 4, as JSON Schema's "integer" says; 4.5 stays
    refused, and so does a string or a boolean."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def _rfc3339(value: Any) -> Any:
    if isinstance(value, str) and _RFC3339.fullmatch(value) is None:
        raise ValueError("must be an RFC 3339 date-time such as 2026-03-01T10:00:00+09:00")
    return value


def _utc_representable(at: datetime) -> datetime:
    # an instant is stored and compared in UTC: 0001-01-01T00:00:00+01:00
    # has no UTC date-time (year 0), nor has 9999-12-31T23:00:00-05:00
    try:
        at.astimezone(UTC)
    except OverflowError:
        raise ValueError("must lie within the years 1 to 9999 in UTC") from None
    return at


Slug = Annotated[str, Field(max_length=SLUG_MAX, pattern=SLUG_PATTERN)]
UserId = Annotated[str, Field(min_length=1, max_length=USER_ID_MAX, pattern=TEXT_ID_PATTERN)]
EventId = Annotated[str, Field(pattern=UUID7_PATTERN)]
JsonObject = Annotated[dict[str, JsonValue], AfterValidator(_free_form)]
Rating = Annotated[StrictInt, Field(ge=1, le=5), BeforeValidator(_whole_number)]
EventTime = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_utc_representable)]


class ContractModel(BaseModel):
    """The contract's model settings: frozen, extra=forbid, camelCase on the wire."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        # SDK keyword arguments arrive as Python values; JSON from the wire is
        # parsed in JSON mode (where a string is never an int either).
        strict=False,
        # NaN and infinities are not JSON: refused anywhere, metadata included.
        allow_inf_nan=False,
    )


Source = Annotated[str, Field(min_length=1, max_length=SOURCE_MAX, pattern=TEXT_ID_PATTERN)]
_SOURCE_ADAPTER: TypeAdapter[str] = TypeAdapter(Source)


class EventBase(ContractModel):
    """The envelope every event carries (``kind`` is set by each subclass)."""

    event_id: EventId
    user_id: UserId
    occurred_at: EventTime
    schema_version: Literal[1] = SCHEMA_VERSION
    source: Source

    # Events made here (build, the SDK) carry occurredAt in UTC, written
    # RFC 3339 with "Z"; an event from another producer keeps the offset it
    # was written with: the instant is the same, and every consumer compares
    # instants and converts to UTC when it writes a row.


class Interaction(EventBase):
    """A reading, chat, feedback or share: one ``"UserInteraction"`` row."""

    kind: Literal["interaction"] = "interaction"
    type: InteractionType
    service: Slug
    theme: Slug | None = None
    rating: Rating | None = None
    metadata: JsonObject = Field(default_factory=dict)


class PreferencesUpdated(EventBase):
    """Explicit preferences; only the fields carried change (``None`` = not carried)."""

    kind: Literal["preferences.updated"] = "preferences.updated"
    preferred_language: Annotated[str, Field(max_length=35, pattern=LANGUAGE_PATTERN)] | None = None
    preferred_themes: Annotated[list[Slug], Field(max_length=50)] | None = None
    preferred_services: Annotated[list[Slug], Field(max_length=50)] | None = None
    notification_settings: JsonObject | None = None
    reading_length: Literal["short", "medium", "long"] | None = None
    tone_preference: Literal["casual", "formal", "mystical"] | None = None

    PREFERENCE_FIELDS: ClassVar[tuple[str, ...]] = (
        "preferred_language",
        "preferred_themes",
        "preferred_services",
        "notification_settings",
        "reading_length",
        "tone_preference",
    )

    @model_validator(mode="after")
    def _carries_something(self) -> PreferencesUpdated:
        if all(getattr(self, name) is None for name in self.PREFERENCE_FIELDS):
            raise ValueError("must carry at least one preference field")
        return self

    def carried(self) -> dict[str, Any]:
        """The preference fields this event sets, by wire (column) name."""
        return {
            to_camel(name): getattr(self, name)
            for name in self.PREFERENCE_FIELDS
            if getattr(self, name) is not None
        }


class OnboardingCompleted(EventBase):
    """The onboarding answers: declared interests for cold-start segments."""

    kind: Literal["onboarding.completed"] = "onboarding.completed"
    interests: Annotated[list[Slug], Field(max_length=50)] = Field(default_factory=list)
    services: Annotated[list[Slug], Field(max_length=50)] = Field(default_factory=list)
    experience: Literal["new", "casual", "regular", "expert"] | None = None
    answers: JsonObject = Field(default_factory=dict)


class UserErased(EventBase):
    """Erase the user: every row and aggregate of theirs is deleted."""

    kind: Literal["user.erased"] = "user.erased"


Event = Annotated[
    Interaction | PreferencesUpdated | OnboardingCompleted | UserErased,
    Field(discriminator="kind"),
]
EVENT_TYPES: dict[str, type[EventBase]] = {
    "interaction": Interaction,
    "preferences.updated": PreferencesUpdated,
    "onboarding.completed": OnboardingCompleted,
    "user.erased": UserErased,
}
_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"]]
        # Drop the union tag pydantic adds ("interaction", ...) from the path.
        if loc and loc[0] in EVENT_TYPES:
            loc = loc[1:]
        field = ".".join(loc) or "event"
        message = err["msg"]
        if err["type"] == "string_pattern_mismatch":
            message = _PATTERN_MESSAGES.get(str(err.get("ctx", {}).get("pattern")), message)
        out.append((field, message))
    return out


def build(kind: str, **fields: Any) -> EventBase:
    """Validate Python values into an event, raising ``EventValidationError``."""
    return build_encoded(kind, fields)[0]


def build_encoded(kind: str, fields: dict[str, Any]) -> tuple[EventBase, bytes]:
    """Validate Python values into an event and its wire bytes, in one pass
    (the size limit is a limit on those bytes)."""
    model = EVENT_TYPES.get(kind)
    if model is None:
        raise EventValidationError(kind, [("kind", f"must be one of {sorted(EVENT_TYPES)}")])
    at = fields.get("occurred_at")
    if isinstance(at, datetime) and at.tzinfo is not None and at.tzinfo is not UTC:
        fields = {**fields, "occurred_at": at.astimezone(UTC)}  # naive: refused below
    try:
        event = model.__pydantic_validator__.validate_python(fields)
    except ValidationError as exc:
        raise EventValidationError(kind, _errors(exc)) from None
    wire = event.__pydantic_serializer__.to_json(event, exclude_none=True, by_alias=True)
    if len(wire) > EVENT_MAX_BYTES:
        raise _too_large(kind, len(wire))
    return event, wire


def _too_large(kind: str, size: int) -> EventValidationError:
    field = _FREE_FORM.get(kind, "event")
    return EventValidationError(
        kind, [(field, f"makes the event {size} bytes as JSON; the limit is {EVENT_MAX_BYTES}")]
    )


def check_source(source: str) -> str:
    """Validate an emitting app's name as the envelope's ``source`` field would."""
    try:
        return _SOURCE_ADAPTER.validate_python(source)
    except ValidationError as exc:
        raise EventValidationError("any", [("source", e["msg"]) for e in exc.errors()]) from None


def encode(event: EventBase) -> bytes:
    """The wire bytes of an event: compact JSON, absent optionals left out."""
    return event.__pydantic_serializer__.to_json(event, exclude_none=True, by_alias=True)


def decode(data: bytes | str) -> EventBase:
    """Parse and validate wire bytes, raising ``EventValidationError``."""
    if len(data) > EVENT_MAX_BYTES:
        raise _too_large(_peek_kind(data), len(data))
    try:
        return _EVENT_ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise EventValidationError(_peek_kind(data), _errors(exc)) from None
    except (ValueError, RecursionError, OverflowError) as exc:  # never seen; bytes are hostile
        raise EventValidationError("unknown", [("(value)", f"{type(exc).__name__}")]) from None


def _peek_kind(data: bytes | str) -> str:
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python goes
        return "unknown"
    if isinstance(raw, dict) and isinstance(raw.get("kind"), str):
        return str(raw["kind"])
    return "unknown"


def key(event: EventBase) -> bytes:
    """The partition key: the user id, so one user's events stay in order."""
    return event.user_id.encode()


_NO_NUL = {"type": "string", "pattern": "^[^\\x00]*$"}
_JSON_VALUE_SCHEMA: dict[str, Any] = {
    "description": "any JSON value without NUL (\\u0000) in a string or key",
    "anyOf": [
        _NO_NUL,
        {"type": ["number", "boolean", "null"]},
        {"type": "array", "items": {"$ref": "#/$defs/JsonValue"}},
        {
            "type": "object",
            "propertyNames": _NO_NUL,
            "additionalProperties": {"$ref": "#/$defs/JsonValue"},
        },
    ],
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of each kind, for producers in other languages."""
    schemas = {}
    for kind, model in EVENT_TYPES.items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        schema["$id"] = f"https://usertrail.dev/schemas/{kind}.v{SCHEMA_VERSION}.json"
        schema["properties"]["kind"]["const"] = kind
        schema.setdefault("required", [])
        for name in ("kind", "schemaVersion"):
            if name not in schema["required"]:
                schema["required"].append(name)
        schema["properties"]["occurredAt"].update(
            pattern=RFC3339_PATTERN,
            description="RFC 3339 date-time with an explicit offset (Z or +hh:mm), any "
            "offset: it is read as the instant it names, and every time usertrail "
            "writes or compares is that instant in UTC. Besides the pattern: a real "
            "calendar date (no 2026-02-30), no leap second (:60), and within the years "
            "1 to 9999 once in UTC (not 0001-01-01T00:00:00+01:00). It lies at most "
            "one day after the Kafka record's timestamp and at most ten years (3,653 "
            "days) before it; outside, the event is a dead letter.",
        )
        if "JsonValue" in schema.get("$defs", {}):
            schema["$defs"]["JsonValue"] = _JSON_VALUE_SCHEMA
        free = _FREE_FORM.get(kind)
        if free is not None:
            prop = schema["properties"][to_camel(free)]
            # the object itself, also where the field may be null (anyOf)
            obj = next(b for b in prop.get("anyOf", [prop]) if b.get("type") == "object")
            obj["propertyNames"] = _NO_NUL
            prop["description"] = (
                "free-form JSON object: finite numbers only (no NaN or Infinity, none "
                "beyond a double), no NUL (\\u0000) in a string or key, at most "
                f"{FREE_FORM_DEPTH} levels of nesting"
            )
        if kind == "preferences.updated":
            fields = [to_camel(f) for f in PreferencesUpdated.PREFERENCE_FIELDS]
            # at least one carried: present and not null (null = not carried)
            schema["anyOf"] = [
                {"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields
            ]
        schema["description"] = (
            f"{schema.get('description', '').strip()}\n\nBeyond what this schema says: the "
            f"record's value is at most {EVENT_MAX_BYTES:,} bytes of UTF-8 JSON with each "
            "key once (where one repeats, every part of usertrail takes the last, as "
            "PostgreSQL's jsonb does); strings are valid Unicode (no lone surrogate "
            "escape); the record's key is the userId."
        ).strip()
        schema["properties"]["eventId"]["description"] = (
            "lower-case canonical UUIDv7, made by the client; becomes UserInteraction.id"
        )
        schemas[kind] = schema
    return schemas


def out_of_bounds(at: datetime, timestamp_ms: int) -> str | None:
    """Why an event time (``occurredAt``) lies outside the contract's window around its
    record's timestamp (``FUTURE_BOUND_MS``, ``PAST_BOUND_MS``); None inside
    it, or when the record has no timestamp (negative)."""
    if timestamp_ms < 0:
        return None
    at_ms = at.timestamp() * 1000
    if at_ms <= timestamp_ms + FUTURE_BOUND_MS and at_ms >= timestamp_ms - PAST_BOUND_MS:
        return None
    side = "a day after" if at_ms > timestamp_ms else "ten years before"
    return f"{at.isoformat()} is more than {side} the record's timestamp {_STAMP}{timestamp_ms})"


def bound_error(event: EventBase, timestamp_ms: int) -> EventValidationError | None:
    """``out_of_bounds`` as the contract's error, naming ``occurredAt``."""
    rule = out_of_bounds(event.occurred_at, timestamp_ms)
    kind = getattr(event, "kind", "any")  # every kind's model has one
    return None if rule is None else EventValidationError(kind, [("occurredAt", rule)])


_STAMP = "(ms since the epoch: "
_STAMPED = re.compile(re.escape(_STAMP) + r"(-?[0-9]+)\)")


def stamped(error: str) -> int:
    """The record timestamp an ``out_of_bounds`` message names, -1 for none:
    ``dlq retry`` judges a dead letter again by what its record held, and the
    dead-letter table keeps the reason's text, not the record's timestamp."""
    m = _STAMPED.search(error)
    return int(m.group(1)) if m else -1


def accept(key: bytes | None, value: bytes | None, timestamp_ms: int = -1) -> EventBase | None:
    """The event of a record that ``classify`` decodes; None for one it makes
    a dead letter (the stream skips those: the sink keeps them). The same
    checks, without the objects the sink needs, for the stream's hot loop."""
    if value is None:
        return None
    try:
        event = decode(value)
    except Exception:  # noqa: BLE001  # classify's dead letters, whatever the bytes
        return None
    if key != event.user_id.encode() or out_of_bounds(event.occurred_at, timestamp_ms):
        return None
    return event
