"""The fold and the segment rules: pure, so property-tested without a broker."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from usertrail.producers.events import EventBase, build
from usertrail.stream.fold import RECENT_IDS, NeedChunks, fold_all
from usertrail.stream.segments import load_rules, segment
from usertrail.stream.state import UserState, advance, dump_state, load_state

from tests.folding import (
    BAD_KIND,
    BAD_SHARE,
    CONFIG,
    KIND_HEADER,
    RULES,
    T0,
    USER,
    _v7,
    data_of,
    event_lists,
    fold_seq,
    interactions,
    line_of,
    seed_query,
)
from usertrail.errors import ConfigurationError


@given(event_lists(erasures=True), st.data())
def test_same_profile_however_split_even_through_the_changelog(
    events: list[EventBase], data: st.DataObject
) -> None:
    with_offsets = [(e, i) for i, e in enumerate(events)]
    whole = fold_seq(with_offsets)
    cut = data.draw(st.integers(0, len(events)))
    # through the changelog: the table value as the worker writes and recovers it
    loaded = load_state(dump_state(UserState(fold_seq(with_offsets[:cut]))))
    assert loaded is not None
    restored = loaded.profile
    assert fold_seq(with_offsets[cut:], restored) == whole


@given(event_lists(), st.data())
def test_repeats_and_redeliveries_change_nothing(
    events: list[EventBase], data: st.DataObject
) -> None:
    plain = fold_seq([(e, i) for i, e in enumerate(events)])
    noisy: list[tuple[EventBase, int | None]] = []
    offset = 0
    for i, event in enumerate(events):
        noisy.append((event, offset))
        if data.draw(st.booleans()):  # redelivered after a crash: same offset again
            noisy.append((event, offset))
        offset += 1
        if i and data.draw(st.integers(0, 4)) == 0:  # an app resends an earlier event
            noisy.append((events[data.draw(st.integers(max(0, i - 50), i))], offset))
            offset += 1
    assert data_of(fold_seq(noisy)) == data_of(plain)


def _many(n: int) -> list[EventBase]:
    """``n`` interactions of USER, ids and times increasing."""
    return [
        build(
            "interaction",
            event_id=_v7(i),
            user_id=USER,
            source="t",
            occurred_at=T0 + timedelta(minutes=i),
            type=("reading", "chat")[i % 2],
            service=("saju", "tarot")[i % 2],
            rating=1 + i % 5,
        )
        for i in range(n)
    ]


@settings(max_examples=30, deadline=None)
@given(st.integers(300, 1200), st.lists(st.integers(0, 10**6), min_size=1, max_size=20), st.data())
def test_a_resend_however_late_changes_nothing(
    n: int, picks: list[int], data: st.DataObject
) -> None:
    """Dedup is exact forever: ids older than the profile's own window are
    sealed into chunks, and a resend of any of them, after hundreds of newer
    events, is still recognised (#19)."""
    events = _many(n)
    plain = fold_seq([(e, i) for i, e in enumerate(events)])
    assert len(plain.sealed) >= 1 and len(plain.recent_ids) <= RECENT_IDS
    noisy: list[tuple[EventBase, int | None]] = [(e, i) for i, e in enumerate(events)]
    for pick in picks:  # resends anywhere after the original in the log
        original = next(i for i, (e, _) in enumerate(noisy) if e is events[pick % n])
        noisy.insert(data.draw(st.integers(original + 1, len(noisy))), (events[pick % n], None))
    noisy = [(e, i) for i, (e, _) in enumerate(noisy)]
    chunks: dict[int, frozenset[str]] = {}
    got = fold_seq(noisy, chunks=chunks)
    assert data_of(got) == data_of(plain)
    assert got.interactions == n
    # what the table stores: every id once, in the profile or in one chunk
    stored = [x for c in chunks.values() for x in c] + list(got.recent_ids)
    assert sorted(stored) == sorted(e.event_id for e in events)


def test_a_resend_names_the_chunk_it_needs() -> None:
    events = _many(600)
    state = advance(None, USER, [(e, i) for i, e in enumerate(events)], RULES)
    assert state is not None and state.chunks
    sealed = state.state.profile.sealed
    old = events[3]
    want = {i for i, (lo, hi) in enumerate(sealed) if lo <= old.event_id <= hi}
    with pytest.raises(NeedChunks) as asked:
        advance(state.state, USER, [(old, 600)], RULES)
    assert asked.value.indices == want
    again = advance(state.state, USER, [(old, 600)], RULES, state.chunks)
    assert again is not None and again.state.profile.interactions == 600
    # a new event needs no chunk at all
    new = _many(601)[600]
    assert advance(state.state, USER, [(new, 601)], RULES) is not None


@given(event_lists(), event_lists())
def test_erasure_in_the_middle_leaves_only_what_follows(
    before: list[EventBase], after: list[EventBase]
) -> None:
    shifted = [
        e.model_copy(
            update={"event_id": _v7(1000 + i), "occurred_at": e.occurred_at + timedelta(days=100)}
        )
        for i, e in enumerate(after)
    ]
    erase = build(
        "user.erased",
        event_id=_v7(999),
        user_id=USER,
        source="t",
        occurred_at=T0 + timedelta(days=95),
    )
    p = fold_seq([(e, None) for e in [*before, erase, *shifted]])
    fresh = fold_seq([(e, None) for e in shifted])
    got, want = data_of(p), data_of(fresh)
    got.pop("now"), want.pop("now")
    got.pop("erased_at"), want.pop("erased_at")
    assert got == want
    assert p.erased_at == (erase.occurred_at if not shifted else None)


@settings(max_examples=200)
@given(event_lists())
def test_favourite_themes_equal_the_seed_query(events: list[EventBase]) -> None:
    assert fold_seq([(e, None) for e in events]).favourite_themes() == seed_query(events)


@given(event_lists(erasures=True))
def test_every_score_is_in_0_1_and_has_a_reason(events: list[EventBase]) -> None:
    result = segment(fold_seq([(e, i) for i, e in enumerate(events)]), RULES)
    for a in result.assignments:
        assert 0 <= a.score <= 1 and a.reasons and all(r.strip() for r in a.reasons)
    # the default rules end with a fallback: every user has a segment
    assert result.assignments
    assert result.primary_segment == max(result.assignments, key=lambda a: a.score).segment
    assert result.segment_confidence is not None and 0 <= result.segment_confidence <= 1
    if result.primary_segment == "explorer":
        assert [a.segment for a in result.assignments] == ["explorer"]


def test_segments_mean_what_they_say() -> None:
    tarot = fold_all(
        USER,
        [
            (e, None)
            for e in interactions(9, type="reading", service="tarot", theme="love", rating=5)
        ],
        config=CONFIG,
    )
    result = segment(tarot, RULES)
    ids = {a.segment: a for a in result.assignments}
    assert ids["tarot-devotee"].reasons == ["9 of 9 interactions were tarot"]
    assert "advocate" in ids and "romance-focused" in ids
    critic = fold_all(
        USER,
        [(e, None) for e in interactions(6, type="feedback", service="saju", rating=1)],
        config=CONFIG,
    )
    assert segment(critic, RULES).primary_segment in ("critic", "saju-regular")
    assert "average rating 1.0 over 6 ratings" in {
        r for a in segment(critic, RULES).assignments for r in a.reasons
    }
    newcomer = fold_all(
        USER,
        [
            (
                build(
                    "onboarding.completed",
                    event_id=_v7(1),
                    user_id=USER,
                    source="t",
                    occurred_at=T0,
                    interests=["love"],
                ),
                None,
            )
        ],
        config=CONFIG,
    )
    cold = segment(newcomer, RULES)
    assert cold.primary_segment == "love-seeker"
    assert cold.segment_confidence is not None and cold.segment_confidence < 0.1  # one answer


def test_confidence_grows_with_evidence() -> None:
    def confidence(n: int) -> float:
        p = fold_all(
            USER, [(e, None) for e in interactions(n, type="chat", service="tarot")], config=CONFIG
        )
        value = segment(p, RULES).segment_confidence
        assert value is not None
        return value

    assert confidence(5) < confidence(10) < confidence(40)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[affinity\n", ":1: not valid TOML"),
        (
            BAD_SHARE,
            f":{line_of(BAD_SHARE, 'min_share = 6')}: segment.2.min_share: "
            "Input should be less than or equal to 1",
        ),
        (BAD_KIND, f":{KIND_HEADER}: segment.6: Input tag"),
    ],
)
def test_a_malformed_rules_file_is_refused_with_the_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as info:
        load_rules(path)
    assert f"{path}{expected}" in str(info.value)
