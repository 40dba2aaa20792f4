"""Events and folds for the stream tests: the rules, strategies of event lists, a fold step by step."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from usertrail.producers.events import EventBase, build
from usertrail.stream.fold import FAVOURITE_WINDOW, Profile, fold
from usertrail.stream.segments import load_rules

RULES = load_rules()


CONFIG = RULES.affinity_config()


T0 = datetime(2026, 1, 1, tzinfo=UTC)


USER = "u1"


def _v7(n: int) -> str:
    h = f"{(1_700_000_000_000 + n) << 80 | 0x7 << 76 | 0b10 << 62 | n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@st.composite
def event_lists(draw: st.DrawFn, erasures: bool = False) -> list[EventBase]:
    n = draw(st.integers(0, 60))
    # distinct, mostly increasing event times (apps' clocks are not perfect)
    seconds = draw(st.lists(st.integers(0, 90 * 86400), min_size=n, max_size=n, unique=True))
    out: list[EventBase] = []
    for i, sec in enumerate(seconds):
        common = {
            "event_id": _v7(i),
            "user_id": USER,
            "source": "t",
            "occurred_at": T0 + timedelta(seconds=sec),
        }
        kind = draw(
            st.sampled_from(
                ["interaction"] * 8
                + ["preferences.updated", "onboarding.completed"]
                + (["user.erased"] if erasures else [])
            )
        )
        if kind == "interaction":
            out.append(
                build(
                    kind,
                    **common,
                    type=draw(st.sampled_from(["reading", "chat", "feedback", "share"])),
                    service=draw(st.sampled_from(["saju", "tarot", "astrology", "x"])),
                    theme=draw(st.none() | st.sampled_from(["love", "career", "health"])),
                    rating=draw(st.none() | st.integers(1, 5)),
                )
            )
        elif kind == "preferences.updated":
            out.append(
                build(kind, **common, tone_preference=draw(st.sampled_from(["casual", "formal"])))
            )
        elif kind == "onboarding.completed":
            out.append(
                build(
                    kind,
                    **common,
                    interests=draw(
                        st.lists(st.sampled_from(["love", "career"]), max_size=2, unique=True)
                    ),
                )
            )
        else:
            out.append(build(kind, **common))
    return out


def fold_seq(
    events: list[tuple[EventBase, int | None]],
    start: Profile | None = None,
    chunks: dict[int, frozenset[str]] | None = None,
) -> Profile:
    """``fold`` event by event; ``chunks``: the sealed chunks of ids, kept
    across calls as the worker's table keeps them."""
    profile = start or Profile(USER)
    chunks = {} if chunks is None else chunks
    for event, offset in events:
        profile = fold(profile, event, offset, config=CONFIG, chunks=chunks)
    return profile


def data_of(p: Profile) -> dict[str, Any]:
    """The profile without its exactly-once bookkeeping."""
    d = dataclasses.asdict(p)
    for key in ("last_offset", "recent_ids", "sealed"):
        d.pop(key)
    return d


def seed_query(events: list[EventBase]) -> dict[str, int]:
    """The seed's Prisma query, literally: readings rated >= 4, newest first,
    take 20, count the themes."""
    rows = [
        e
        for e in events
        if e.kind == "interaction"
        and e.type == "reading"  # type: ignore[attr-defined]
        and e.rating is not None
        and e.rating >= 4
    ]  # type: ignore[attr-defined]
    rows.sort(key=lambda e: e.occurred_at, reverse=True)
    counts: dict[str, int] = {}
    for e in rows[:FAVOURITE_WINDOW]:
        if e.theme:  # type: ignore[attr-defined]
            counts[e.theme] = counts.get(e.theme, 0) + 1  # type: ignore[attr-defined]
    return counts


def interactions(n: int, **fields: Any) -> list[EventBase]:
    return [
        build(
            "interaction",
            event_id=_v7(i),
            user_id=USER,
            source="t",
            occurred_at=T0 + timedelta(hours=i),
            **fields,
        )
        for i in range(n)
    ]


DEFAULT_TEXT = (Path(__file__).resolve().parent.parent / "stream" / "rules.toml").read_text()


def line_of(text: str, needle: str) -> int:
    return next(i + 1 for i, line in enumerate(text.splitlines()) if needle in line)


BAD_SHARE = DEFAULT_TEXT.replace("min_share = 0.6", "min_share = 6", 1)


BAD_KIND = DEFAULT_TEXT.replace('kind = "engagement"', 'kind = "astrology"')


KIND_HEADER = line_of(BAD_KIND, 'kind = "astrology"') - 2  # its [[segment]] line


def cut(items: list[Any], points: list[int]) -> list[list[Any]]:
    bounds = [0, *sorted(points), len(items)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
