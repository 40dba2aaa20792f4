"""The event contract: what travels on ``usertrail.events``.

Every event is a frozen pydantic model with ``extra="forbid"``. On the wire it
is compact JSON with camelCase keys (the product's Prisma column names),
absent optional fields left out, keyed by the user id. ``encode`` and
``decode`` are the only ways in and out, so the bytes are the same wherever
an event is made.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
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
TEXT_ID_PATTERN = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
UUID7_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
LANGUAGE_PATTERN = r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$"
_PATTERN_MESSAGES = {
    SLUG_PATTERN: "must be a lower-case slug (a-z, 0-9, '-' or '_' between them)",
    TEXT_ID_PATTERN: "must not be blank or contain control characters",
    UUID7_PATTERN: "must be a lower-case canonical UUID version 7 (time-ordered)",
    LANGUAGE_PATTERN: "must be a language tag such as 'en' or 'pt-BR'",
}


Slug = Annotated[str, Field(max_length=SLUG_MAX, pattern=SLUG_PATTERN)]
UserId = Annotated[str, Field(min_length=1, max_length=USER_ID_MAX, pattern=TEXT_ID_PATTERN)]
EventId = Annotated[str, Field(pattern=UUID7_PATTERN)]
JsonObject = dict[str, JsonValue]
Rating = Annotated[StrictInt, Field(ge=1, le=5)]


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
    occurred_at: AwareDatetime
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
        schema["properties"]["occurredAt"]["description"] = (
            "UTC instant with an explicit offset; naive timestamps are refused"
        )
        schema["properties"]["eventId"]["description"] = (
            "lower-case canonical UUIDv7, made by the client; becomes UserInteraction.id"
        )
        schemas[kind] = schema
    return schemas


def accept(key: bytes | None, value: bytes | None) -> EventBase | None:
    """The event of a record that ``classify`` decodes; None for one it makes
    a dead letter (the stream skips those: the sink keeps them). The same
    checks, without the objects the sink needs, for the stream's hot loop."""
    if value is None:
        return None
    try:
        event = decode(value)
    except Exception:  # noqa: BLE001  # classify's dead letters, whatever the bytes
        return None
    return event if key == event.user_id.encode() else None
