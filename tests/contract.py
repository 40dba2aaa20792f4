"""Hypothesis strategies for the event contract, shared by the tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st
from usertrail.producers import events
from usertrail.producers.events import build
from usertrail.producers.ids import uuid7

slugs = st.from_regex(r"\A[a-z0-9]{1,10}(?:[-_][a-z0-9]{1,10}){0,2}\Z")


# not blank: some character that is not white space as the contract counts it
# (Unicode's White_Space, and U+FEFF, as JavaScript's \s)
user_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40
).filter(lambda s: s.strip().strip("\ufeff"))
# any text a free-form JSON value may hold: no NUL (PostgreSQL refuses it)
free_text = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))


times = st.datetimes(
    # hypothesis takes naive bounds and adds the timezones itself
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=datetime(2100, 1, 1),  # noqa: DTZ001
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=9)), timezone(timedelta(hours=-5))]),
)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(free_text, max_size=20)
    | (st.floats(allow_nan=False, allow_infinity=False))
)


json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(free_text, max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


metadata = st.dictionaries(st.text(free_text, max_size=10), json_values, max_size=5)


def _v7(ms: int, rand_a: int, rand_b: int) -> str:
    h = f"{ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


event_ids = st.builds(
    _v7, st.integers(0, 2**48 - 1), st.integers(0, 2**12 - 1), st.integers(0, 2**62 - 1)
)


def envelope(**extra: Any) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "event_id": event_ids,
            "user_id": user_ids,
            "occurred_at": times,
            "source": st.sampled_from(["web", "ios", "backend"]),
            **extra,
        }
    )


interactions = envelope(
    type=st.sampled_from(events.INTERACTION_TYPES),
    service=slugs,
    theme=st.none() | slugs,
    rating=st.none() | st.integers(1, 5),
    metadata=metadata,
).map(lambda f: build("interaction", **f))


preferences = envelope(
    preferred_language=st.sampled_from(["en", "ko", "pt-BR"]),
    preferred_themes=st.none() | st.lists(slugs, max_size=3),
    preferred_services=st.none() | st.lists(slugs, max_size=3),
    notification_settings=st.none() | st.fixed_dictionaries({"daily": st.booleans()}),
    reading_length=st.none() | st.sampled_from(["short", "medium", "long"]),
    tone_preference=st.none() | st.sampled_from(["casual", "formal", "mystical"]),
).map(lambda f: build("preferences.updated", **f))


onboardings = envelope(
    interests=st.lists(slugs, max_size=4),
    services=st.lists(slugs, max_size=3),
    experience=st.none() | st.sampled_from(["new", "casual", "regular", "expert"]),
    answers=metadata,
).map(lambda f: build("onboarding.completed", **f))


erasures = envelope().map(lambda f: build("user.erased", **f))


any_event = interactions | preferences | onboardings | erasures


def _interaction(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event_id": uuid7(),
        "user_id": "u1",
        "occurred_at": datetime.now(UTC),
        "source": "web",
        "type": "reading",
        "service": "saju",
    }
    fields.update(changes)
    return fields
