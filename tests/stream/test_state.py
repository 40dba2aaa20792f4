"""``advance``: a batch of a user's events through the fold and the segment
rules, as the worker and ``replay stream`` run it. Pure, property-tested."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter
from usertrail.producers.events import EventBase
from usertrail.stream.fold import micros
from usertrail.stream.segments import segment, segment_key
from usertrail.stream.state import UserState, advance, dump_state, load_state

from tests.folding import RULES, USER, cut, event_lists, fold_seq

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_AS_TEXT = TypeAdapter(list[datetime])


def _as_text(times: Iterable[int]) -> list[str]:
    """Microseconds as states from before 2026-12-02 wrote the times."""
    text = _AS_TEXT.dump_python([_EPOCH + timedelta(microseconds=t) for t in times], mode="json")
    assert all(isinstance(t, str) for t in text)
    return text


def run(batches: list[list[tuple[EventBase, int | None]]]) -> tuple[UserState | None, list[Any]]:
    """Batches through ``advance``, the state round-tripping the changelog
    between them; what was published, in order."""
    state: UserState | None = None
    published: list[Any] = []
    for batch in batches:
        result = advance(state, USER, batch, RULES)
        if result is None:
            continue
        state = load_state(dump_state(result.state))
        published.append(result.message)
    return state, published


@given(event_lists(erasures=True), st.data())
def test_the_state_and_the_last_message_do_not_depend_on_batches(
    events: list[EventBase], data: st.DataObject
) -> None:
    items: list[tuple[EventBase, int | None]] = [(e, i) for i, e in enumerate(events)]
    points = data.draw(st.lists(st.integers(0, len(items)), max_size=6))
    one_by_one, each = run([[item] for item in items])
    batched, some = run(cut(items, points))
    assert batched == one_by_one
    assert some[-1:] == each[-1:]  # what the sink ends with
    if batched is not None:
        assert batched.profile == fold_seq(items)
        # segments as they are after the last event, checked the slow way
        full = segment(batched.profile, RULES)
        assert batched.segment_key == tuple(
            (a.segment, round(a.score, 6)) for a in full.assignments
        )
        assert segment_key(batched.profile, RULES) == batched.segment_key


@given(event_lists(erasures=True), st.data())
def test_segments_changed_at_is_the_last_event_that_changed_them(
    events: list[EventBase], data: st.DataObject
) -> None:
    items: list[tuple[EventBase, int | None]] = [(e, i) for i, e in enumerate(events)]
    state, _ = run(cut(items, data.draw(st.lists(st.integers(0, len(items)), max_size=4))))
    # the slow way: segment after every event, from the very first
    changed_at, key, profile = None, None, None
    for n in range(1, len(items) + 1):
        profile = fold_seq(items[n - 1 : n], profile)
        new = tuple((a.segment, round(a.score, 6)) for a in segment(profile, RULES).assignments)
        if profile.erased_at is not None:
            changed_at = None
        elif n == 1 or new != key:
            changed_at = profile.now
        key = new
    assert (state.segments_changed_at if state else None) == changed_at


@given(event_lists(erasures=True))
def test_a_user_erased_at_the_end_publishes_a_tombstone(events: list[EventBase]) -> None:
    items: list[tuple[EventBase, int | None]] = [(e, i) for i, e in enumerate(events)]
    state, published = run([items])
    if state is None:
        assert not items
    elif state.profile.erased_at is not None:
        assert published == [None]
    else:
        assert published[-1].primary_segment == segment(state.profile, RULES).primary_segment


@given(event_lists(erasures=True))
def test_a_state_stored_with_times_as_text_loads_as_the_same_instants(
    events: list[EventBase],
) -> None:
    """States written before interaction and reading times were kept as
    microseconds held them as RFC 3339 text (in UTC, as pydantic writes a
    datetime): such a state, in a changelog or a store from before, loads as
    the same profile."""
    items: list[tuple[EventBase, int | None]] = [(e, i) for i, e in enumerate(events)]
    state, _ = run([items])
    if state is None:
        return
    stored = json.loads(dump_state(state))
    p = stored["profile"]
    p["recent_activity"] = _as_text(state.profile.recent_activity)
    readings = state.profile.top_readings
    p["top_readings"] = [
        [at, *rest]
        for at, (_, *rest) in zip(_as_text(r[0] for r in readings), readings, strict=True)
    ]
    assert load_state(json.dumps(stored).encode()) == state


def test_interaction_times_are_exact_microseconds_in_any_offset() -> None:
    text = ["2026-01-01T00:00:00Z", "2026-01-01T09:00:00.000001+09:00"]
    readings = [[text[1], "id", "love"]]
    stored = {"profile": {"user_id": USER, "recent_activity": text, "top_readings": readings}}
    loaded = load_state(json.dumps(stored).encode())
    assert loaded is not None
    start = micros(datetime(2026, 1, 1, tzinfo=UTC))
    assert loaded.profile.recent_activity == (start, start + 1)
    assert loaded.profile.top_readings == ((start + 1, "id", "love"),)
