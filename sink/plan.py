"""What a batch of records does to the database: pure, no I/O.

``classify`` turns one Kafka record into an event or a dead letter (with its
reason); ``plan`` folds a batch of events, in log order, into the writes one
transaction makes. A user's erasure removes what came before it in the batch
(it would be deleted anyway) and is applied before the writes that follow it,
so the result equals applying the events one by one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple

from usertrail.producers import events
from usertrail.producers.events import (
    EventBase,
    Interaction,
    OnboardingCompleted,
    PreferencesUpdated,
    UserErased,
)
from usertrail.sink.rows import FastRow, fast_row

from usertrail.errors import EventValidationError

# dead-letter reasons
INVALID = "invalid"  # not JSON, wrong shape, a broken rule
WRONG_KEY = "wrong_key"  # the record key is not the user id: per-user order is not guaranteed
UNKNOWN_USER = "unknown_user"  # "park" mode and the user is not in "User"
CRASHED = "crashed"  # a sink died twice while handling this record alone (sink/careful.py)


class Record(NamedTuple):
    """A Kafka record, as the sink needs it (a tuple: one is made per record)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = -1  # ms since the epoch (CreateTime), -1: unknown
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    reason: str
    error: str
    event_id: str | None = None
    user_id: str | None = None


class Decoded(NamedTuple):
    """A record and its event (a tuple: one is made per record, and a frozen
    dataclass's __init__ took a sixteenth of the sink's fetch-and-prepare)."""

    record: Record
    event: EventBase | FastRow  # an interaction in the SDK's layout: its row, made directly


def named_user(record: Record) -> str | None:
    """The user an invalid record names, so that erasure and export find its
    dead letter: its key, else its payload's ``userId``, when either is
    text that PostgreSQL can store."""
    candidates: list[object] = []
    if record.key is not None:
        try:
            candidates.append(record.key.decode())
        except UnicodeDecodeError:
            pass
    if record.value is not None:
        try:
            doc = json.loads(record.value)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            candidates.append(doc.get("userId"))
    for user in candidates:
        if isinstance(user, str) and user and "\x00" not in user and len(user) <= 1000:
            try:
                user.encode()
            except UnicodeEncodeError:
                continue
            return user
    return None


def classify(record: Record) -> Decoded | DeadLetter:
    if record.value is None:
        return DeadLetter(record, INVALID, "empty record value (null)")
    try:
        row = fast_row(record.value, record.key, record.timestamp)
        if row is not None:
            return tuple.__new__(Decoded, (record, row))
        event = events.decode(record.value)
    except EventValidationError as exc:
        return DeadLetter(record, INVALID, str(exc), None, named_user(record))
    except Exception as exc:  # noqa: BLE001  # whatever the bytes: a dead letter, never a crash
        error = f"undecodable: {type(exc).__name__}: {exc}"[:1000].replace("\x00", "\\u0000")
        return DeadLetter(record, INVALID, error, None, named_user(record))
    if record.key != event.user_id.encode():
        return DeadLetter(
            record,
            WRONG_KEY,
            f"record key {record.key!r} is not the user id {event.user_id!r}",
            event.event_id,
            event.user_id,
        )
    bound = events.bound_error(event, record.timestamp)
    if bound is not None:
        return DeadLetter(record, INVALID, str(bound), event.event_id, event.user_id)
    return Decoded(record, event)


@dataclass
class WritePlan:
    erase: list[str] = field(default_factory=list)
    interactions: list[Interaction | FastRow] = field(default_factory=list)
    # Applied one by one, in log order: each is a conditional upsert (newer
    # over older), so merging them here would make the result depend on
    # where batches happen to split.
    preferences: list[PreferencesUpdated] = field(default_factory=list)
    users: set[str] = field(default_factory=set)  # users that must exist in "User"
    # interactions an erasure later in the batch forgets: their ids are kept
    # (usertrail_seen_events) as an erased row's are
    forgotten: list[str] = field(default_factory=list)


def plan(decoded: list[EventBase | FastRow]) -> WritePlan:
    """Fold events (in log order) into the writes of one transaction."""
    out = WritePlan()
    last_erasure: dict[str, int] = {}
    for i, event in enumerate(decoded):
        if isinstance(event, UserErased):
            last_erasure[event.user_id] = i
    out.erase = sorted(last_erasure)
    for i, event in enumerate(decoded):
        if last_erasure.get(event.user_id, -1) >= i:
            if isinstance(event, (FastRow, Interaction)):
                out.forgotten.append(event.event_id)
            continue  # before (or is) the user's erasure in this batch
        if isinstance(event, (FastRow, Interaction)):
            out.interactions.append(event)
            out.users.add(event.user_id)
        elif isinstance(event, PreferencesUpdated):
            out.users.add(event.user_id)
            out.preferences.append(event)
        elif isinstance(event, OnboardingCompleted):
            out.users.add(event.user_id)
    return out
