"""The contract of ``usertrail.profiles``: what the stream publishes for a
user after each batch that changed them (and ``replay stream`` for each
user it rebuilt), and what the sink writes to ``user_vectors``.

Keyed by user id, compacted. A record with a null value is a tombstone: the
user was erased, and their ``user_vectors`` row goes. All times are event
times (docs/architecture.md, rule 1), so a replay publishes identical messages.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AwareDatetime,
    Field,
    TypeAdapter,
    ValidationError,
)
from usertrail.producers.events import ContractModel, UserId

from usertrail.errors import EventValidationError

PROFILE_SCHEMA_VERSION = 1


class SegmentAssignment(ContractModel):
    segment: str
    score: Annotated[float, Field(ge=0, le=1)]
    reasons: Annotated[list[str], Field(min_length=1)]


class ProfileMessage(ContractModel):
    """One user's published profile (``user_vectors`` row material)."""

    user_id: UserId
    schema_version: int = PROFILE_SCHEMA_VERSION
    updated_at: AwareDatetime  # the newest event time folded into the profile
    vector: dict[str, float]
    segments: list[SegmentAssignment]
    primary_segment: str | None
    segment_confidence: Annotated[float, Field(ge=0, le=1)] | None
    last_segment_update: AwareDatetime | None  # event time the segments last changed
    source_offset: int | None = None  # of the last event folded in (diagnostics)


_ADAPTER: TypeAdapter[ProfileMessage] = TypeAdapter(ProfileMessage)


def encode_profile(message: ProfileMessage) -> bytes:
    return message.__pydantic_serializer__.to_json(message, by_alias=True)


def decode_profile(data: bytes) -> ProfileMessage:
    try:
        return _ADAPTER.validate_json(data)
    except ValidationError as exc:
        errors = [
            (".".join(str(p) for p in e["loc"]) or "profile", e["msg"])
            for e in exc.errors(include_url=False)
        ]
        raise EventValidationError("profile", errors) from None
