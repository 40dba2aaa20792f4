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
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from usertrail.errors import EventValidationError

SCHEMA_VERSION = 1
METADATA_MAX_BYTES = 16 * 1024
"""Largest serialized ``metadata`` (or onboarding ``answers``) accepted."""
USER_ID_MAX = 191
INTERACTION_TYPES = ("reading", "chat", "feedback", "share")

_SLUG = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _slug(value: str) -> str:
    if len(value) > 64 or not _SLUG.fullmatch(value):
        raise ValueError(
            "must be a lower-case slug (a-z, 0-9, '-' or '_' between them, at most 64 chars)"
        )
    return value


def _user_id(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _event_id(value: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ValueError("must be a UUID (version 7, time-ordered)") from None
    if parsed.version != 7 or str(parsed) != value:
        raise ValueError("must be a lower-case canonical UUID version 7 (time-ordered)")
    return value


def _json_object(limit: int) -> Any:
    def check(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        _reject_non_finite(value)
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > limit:
            raise ValueError(f"is {size} bytes as JSON; the limit is {limit}")
        return value

    return AfterValidator(check)


def _reject_non_finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must not contain NaN or infinite numbers (not JSON)")
    if isinstance(value, dict):
        for item in value.values():
            _reject_non_finite(item)
    elif isinstance(value, list):
        for item in value:
            _reject_non_finite(item)


Slug = Annotated[str, AfterValidator(_slug)]
UserId = Annotated[str, Field(min_length=1, max_length=USER_ID_MAX), AfterValidator(_user_id)]
EventId = Annotated[str, AfterValidator(_event_id)]
JsonObject = Annotated[dict[str, JsonValue], _json_object(METADATA_MAX_BYTES)]
Rating = Annotated[StrictInt, Field(ge=1, le=5)]


def format_time(value: datetime) -> str:
    """The wire form of a timestamp: UTC, microseconds, ``Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Frozen(BaseModel):
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
    )


Source = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_user_id)]
_SOURCE_ADAPTER: TypeAdapter[str] = TypeAdapter(Source)


class EventBase(_Frozen):
    """The envelope every event carries (``kind`` is set by each subclass)."""

    event_id: EventId
    user_id: UserId
    occurred_at: AwareDatetime
    schema_version: Literal[1] = SCHEMA_VERSION
    source: Source

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @field_serializer("occurred_at")
    def _ser_time(self, value: datetime) -> str:
        return format_time(value)


class Interaction(EventBase):
    """A reading, chat, feedback or share: one ``"UserInteraction"`` row."""

    kind: Literal["interaction"] = "interaction"
    type: Literal["reading", "chat", "feedback", "share"]
    service: Slug
    theme: Slug | None = None
    rating: Rating | None = None
    metadata: JsonObject = Field(default_factory=dict)


class PreferencesUpdated(EventBase):
    """Explicit preferences; only the fields carried change (``None`` = not carried)."""

    kind: Literal["preferences.updated"] = "preferences.updated"
    preferred_language: (
        Annotated[str, Field(max_length=35, pattern=_LANGUAGE.pattern)] | None
    ) = None
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
        out.append((field, err["msg"]))
    return out


def build(kind: str, **fields: Any) -> EventBase:
    """Validate Python values into an event, raising ``EventValidationError``."""
    model = EVENT_TYPES.get(kind)
    if model is None:
        raise EventValidationError(kind, [("kind", f"must be one of {sorted(EVENT_TYPES)}")])
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise EventValidationError(kind, _errors(exc)) from None


def check_source(source: str) -> str:
    """Validate an emitting app's name as the envelope's ``source`` field would."""
    try:
        return _SOURCE_ADAPTER.validate_python(source)
    except ValidationError as exc:
        raise EventValidationError("any", [("source", e["msg"]) for e in exc.errors()]) from None


def encode(event: EventBase) -> bytes:
    """The wire bytes of an event: compact JSON, absent optionals left out."""
    return event.model_dump_json(exclude_none=True).encode()


def decode(data: bytes | str) -> EventBase:
    """Parse and validate wire bytes, raising ``EventValidationError``."""
    try:
        return _EVENT_ADAPTER.validate_json(data)
    except ValidationError as exc:
        kind = "unknown"
        try:
            raw = json.loads(data)
            if isinstance(raw, dict) and isinstance(raw.get("kind"), str):
                kind = raw["kind"]
        except ValueError:
            pass
        raise EventValidationError(kind, _errors(exc)) from None


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


def now() -> datetime:
    """The wall-clock time for *new* events (apps only: projections never call it)."""
    return datetime.now(UTC)
