"""A user's state in the stream's table and how a batch of events moves it.
Pure, no faust: the live worker and ``replay stream`` both call ``advance``,
so a replayed state is the live one, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import TypeAdapter
from usertrail.producers.events import EventBase
from usertrail.producers.profiles import ProfileMessage, SegmentAssignment
from usertrail.stream.fold import Folding, NeedChunks, Profile, UtcDatetime, chunks_needed
from usertrail.stream.segments import Rules, Segmentation, segment, segment_key

# The table also holds, beside the users, per events partition:
APPLIED = b"\x00usertrail/applied/"
"""Table key prefix of a partition's applied offset (no user id starts
with a control character, so it never collides with a user)."""

LOG = b"\x00usertrail/log/"
"""Table key prefix of the id of the events topic a partition's applied
offset belongs to (docs/log.md): a worker that finds the broker's topic
under another id stops (LogResetError) instead of skipping the new log's
records as applied."""


SEEN = b"\x00usertrail/seen/"
"""Table key prefix of a user's sealed chunks of event ids (stream/fold.py):
``seen_key``."""


def is_user_key(key: bytes) -> bool:
    """Whether a table key is a user's (not an applied offset, log id or chunk)."""
    return not key.startswith(b"\x00")


def seen_key(user_key: bytes, index: int) -> bytes:
    return SEEN + str(index).encode() + b"/" + user_key


def applied_key(partition: int) -> bytes:
    return APPLIED + str(partition).encode()


def log_key(partition: int) -> bytes:
    return LOG + str(partition).encode()


@dataclass(frozen=True)
class UserState:
    """A table value: the fold state and when its segments last changed."""

    profile: Profile
    segments_changed_at: UtcDatetime | None = None
    # (segment, score) of the profile's segmentation, so the next event need
    # not segment the previous profile again to see whether segments changed
    segment_key: tuple[tuple[str, float], ...] | None = None


_STATE = TypeAdapter(UserState)


def dump_state(state: UserState) -> bytes:
    """A table value as the changelog stores it."""
    return _STATE.dump_json(state)


def load_state(data: bytes | None) -> UserState | None:
    return None if data is None else _STATE.validate_json(data)


def message_for(state: UserState, seg: Segmentation) -> ProfileMessage:
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
        source_offset=p.last_offset,
    )


@dataclass(frozen=True)
class Advance:
    """What a batch did to one user: the new state and what to publish (the
    profile after the batch, or a tombstone when the user ends erased)."""

    state: UserState
    message: ProfileMessage | None  # None: a tombstone
    chunks: dict[int, frozenset[str]] = field(default_factory=dict)  # sealed by the batch

    @property
    def erased(self) -> bool:
        return self.message is None


def advance(
    state: UserState | None,
    user_id: str,
    events: Iterable[tuple[EventBase, int | None]],
    rules: Rules,
    chunks: Mapping[int, frozenset[str]] | None = None,
) -> Advance | None:
    """``state`` after the user's ``events`` (with their source offsets), in
    log order; None when they change nothing (all redelivered or resent).

    Segments are decided after every event, so ``segments_changed_at`` is
    the event time at which they last changed, however the events are cut
    into batches; the published message is always the profile after the
    batch, so the last message of a user is the final profile's.

    ``chunks``: the user's sealed chunks at hand; NeedChunks, before
    anything is folded, names those the events' ids need and are not."""
    events = list(events)
    if state is not None and state.profile.sealed:
        need = chunks_needed(state.profile.sealed, (e.event_id for e, _ in events), chunks or {})
        if need:
            raise NeedChunks(need)
    folding = Folding(state.profile if state else Profile(user_id), rules.affinity_config(), chunks)
    key = state.segment_key if state else None
    changed_at = state.segments_changed_at if state else None
    first = state is None
    changed = False
    for event, offset in events:
        if not folding.apply(event, offset):
            continue
        changed = True
        before, key = key, segment_key(folding, rules)
        if folding.erased_at is not None:
            changed_at = None  # forgotten with everything else
        elif first or key != before:
            changed_at = folding.now
        first = False
    if not changed:
        return None
    profile = folding.freeze()
    new = UserState(profile, changed_at, key)
    if profile.erased_at is not None:
        return Advance(new, None, folding.new_chunks)
    return Advance(new, message_for(new, segment(profile, rules)), folding.new_chunks)
