"""The exported JSON Schema and the validator accept exactly the same events
(#19): events generated from the schema are accepted; mutated ones get the
same verdict from a JSON Schema validator as from ``decode``. The rules a
schema cannot express are in its descriptions, and ``outside_schema`` below
is that text as code."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, validators
from usertrail.producers import events

from usertrail.errors import EventValidationError

SCHEMAS = events.json_schemas()


# JavaScript's (ECMA-262) classes, which a validator in a browser or Node
# uses: narrower than Python's and Rust's Unicode ones (no U+0085 in \\s, no
# other scripts' digits in \\d).
_ECMA = {
    "s": "\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff",
    "d": "0-9",
    "w": "A-Za-z0-9_",
}


def ecma(pattern: str) -> str:
    """``pattern`` as JavaScript reads it, for Python's re: its \\s, \\d and
    \\w, and '$' only at the very end (Python's also matches before a final
    newline)."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            if escaped in _ECMA:
                out.append(_ECMA[escaped] if in_class else f"[{_ECMA[escaped]}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if c == "[":
            in_class = True
        elif c == "]":
            in_class = False
        elif c == "$" and not in_class:
            c = r"\Z"
        out.append(c)
        i += 1
    return "".join(out)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if isinstance(instance, str) and not re.search(ecma(pattern), instance):
        from jsonschema.exceptions import ValidationError

        yield ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})


def generated(kind: str, levels: int = 3) -> st.SearchStrategy[Any]:
    """Events drawn from the schema itself: a generator for the JSON Schema
    keywords ours use, its recursive JsonValue followed ``levels`` deep.
    (hypothesis-jsonschema, the library for this, fails on this hypothesis.)"""
    return _from(SCHEMAS[kind], SCHEMAS[kind], levels)


def _from(node: Any, root: dict[str, Any], levels: int) -> st.SearchStrategy[Any]:
    if "$ref" in node:
        target = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
        if levels <= 0:  # deep enough: its scalar branches only
            return st.one_of([_from(b, root, 0) for b in target["anyOf"][:2]])
        return _from(target, root, levels - 1)
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "anyOf" in node and "type" not in node:
        return st.one_of([_from(b, root, levels) for b in node["anyOf"]])
    types = node.get("type")
    if isinstance(types, list):
        return st.one_of([_from({**node, "type": t}, root, levels) for t in types])
    if types == "string":
        lo, hi = node.get("minLength", 0), node.get("maxLength", 40)
        if "pattern" in node:
            text = st.from_regex(node["pattern"], fullmatch=True)
        else:
            text = st.text(max_size=hi)
        return text.filter(lambda t: lo <= len(t) <= hi)
    if types == "integer":
        return st.integers(node.get("minimum"), node.get("maximum"))
    if types == "number":
        return st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    if types == "boolean":
        return st.booleans()
    if types == "null":
        return st.none()
    if types == "array":
        items = _from(node.get("items", {"type": "null"}), root, levels)
        return st.lists(items, max_size=min(node.get("maxItems", 4), 4))
    assert types == "object", node
    properties = node.get("properties", {})
    required = set(node.get("required", []))
    if not properties:  # a free-form object
        keys = _from(node.get("propertyNames", {"type": "string"}), root, levels)
        values = _from(node["additionalProperties"], root, levels)
        return st.dictionaries(keys, values, max_size=3)
    fixed = {k: _from(v, root, levels) for k, v in properties.items() if k in required}
    optional = {k: _from(v, root, levels) for k, v in properties.items() if k not in required}
    objects = st.fixed_dictionaries(fixed, optional=optional)
    if "anyOf" in node:  # conditions on the fields drawn
        some = Validator({"anyOf": node["anyOf"]})
        objects = objects.filter(some.is_valid)
    return objects


def schema_accepts(kind: str, doc: Any) -> bool:
    return Validator(SCHEMAS[kind]).is_valid(doc)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def outside_schema(doc: dict[str, Any]) -> str | None:
    """The rules the schema states in words only: which one ``doc`` breaks."""
    if len(json.dumps(doc, separators=(",", ":")).encode()) > events.EVENT_MAX_BYTES:
        return "size"
    at = doc.get("occurredAt")
    if isinstance(at, str):
        try:
            datetime.fromisoformat(at.upper())
        except ValueError:
            return "calendar date"
        try:
            datetime.fromisoformat(at.upper()).astimezone(UTC)
        except OverflowError:
            return "years 1 to 9999 in UTC"
    for name in ("metadata", "answers", "notificationSettings"):
        value = doc.get(name)
        if isinstance(value, dict) and _depth(value) > events.FREE_FORM_DEPTH:
            return "depth"
        if isinstance(value, dict) and _beyond_double(value):
            return "number beyond a double"
    return None


def _beyond_double(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) > 1.7976931348623157e308
    if isinstance(value, dict):
        return any(map(_beyond_double, value.values()))
    if isinstance(value, list):
        return any(map(_beyond_double, value))
    return False


def decoder_accepts(doc: Any) -> bool:
    try:
        events.decode(json.dumps(doc, separators=(",", ":")))
    except EventValidationError:
        return False
    return True


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_events_generated_from_the_schema_are_accepted(kind: str) -> None:
    @hsettings(
        max_examples=80,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(generated(kind))
    def check(doc: dict[str, Any]) -> None:
        assume(outside_schema(doc) is None)
        assert schema_accepts(kind, doc)
        assert decoder_accepts(doc), doc

    check()


def _text() -> st.SearchStrategy[str]:
    """Text that probes the patterns: controls, Unicode spaces and digits,
    offsets, separators."""
    tricky = st.sampled_from(
        [
            "\x00", "\x85", "\u00a0", "\u2028", "\ufeff", "\x7f", "\x9f", " ", "\n", "\t",
            "T", "t", "Z", "z", "+09", "+09:00", "-", ":", ".", "60", "٣", "0000", "2026",
            "-03-01", "23:59", "a", "A", "_", "é",
        ]
    )  # fmt: skip
    return tricky | st.lists(tricky | st.text(max_size=3), max_size=6).map("".join)


MUTATIONS = {
    "userId": _text(),
    "source": _text(),
    "service": _text(),
    "theme": _text(),
    "occurredAt": _text()
    | st.builds(
        lambda d, t, f, z: f"{d}{t}{f}{z}",
        st.sampled_from(["2026-03-01", "0000-01-01", "2026-02-30", "٢٠٢٦-03-01", "2026-3-1"]),
        st.sampled_from(["T10:00:00", "t23:59:59", " 10:00:00", "T23:59:60", "T24:00:00"]),
        st.sampled_from(["", ".5", ".123456789", "."]),
        st.sampled_from(["Z", "z", "+09:00", "+09", "-0500", "+24:00", ""]),
    ),
    "rating": st.sampled_from([0, 1, 5, 6, 4.0, 4.5, "4", True, None, -1, 1e3]),
    "preferredLanguage": _text(),
    "metadata": st.sampled_from(
        [{"a": "\x00"}, {"\x00": 1}, {"a": [1, {"b": "c"}]}, {"a": 1e300}, {}, {"a": "\u2028"}]
    ),
}


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_mutated_events_get_the_same_verdict_from_schema_and_validator(kind: str) -> None:
    fields = [name for name in MUTATIONS if name in SCHEMAS[kind]["properties"]]

    @hsettings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(generated(kind), st.sampled_from(fields), st.data())
    def check(doc: dict[str, Any], name: str, data: st.DataObject) -> None:
        doc = {**doc, name: data.draw(MUTATIONS[name])}
        if outside_schema(doc) is not None:
            assert not decoder_accepts(doc), doc
            return
        assert schema_accepts(kind, doc) == decoder_accepts(doc), doc

    check()


def test_the_cases_found_by_other_producers() -> None:
    """Each valid by the old schema and refused by us, or the reverse."""
    good = json.loads(events.encode(events.build(
        "interaction", event_id="0193a3c1-aaaa-7bbb-8ccc-0123456789ab", user_id="u",
        occurred_at=datetime.fromisoformat("2026-03-01T10:00:00+00:00"), source="web",
        type="reading", service="saju",
    )))  # fmt: skip
    accepted = [
        {"rating": 4.0},
        {"occurredAt": "2026-03-01T19:00:00+09:00"},
        {"occurredAt": "2026-03-01t10:00:00.123456789z"},
        {"metadata": {"deep": [[[[{"a": 1}]]]]}},
    ]
    refused = [
        {"occurredAt": "2026-03-01T23:59:60Z"},  # a leap second
        {"occurredAt": "2026-03-01T10:00:00+09"},
        {"occurredAt": "2026-03-01 10:00:00Z"},
        {"userId": "\u0085"},
        {"userId": "\ufeff"},
        {"metadata": {"x": "a\x00b"}},
        {"metadata": {"a\x00": 1}},
        {"rating": 4.5},
        {"rating": "4"},
    ]
    for change in accepted:
        doc = {**good, **change}
        assert schema_accepts("interaction", doc) and decoder_accepts(doc), change
    for change in refused:
        doc = {**good, **change}
        assert not schema_accepts("interaction", doc), change
        assert not decoder_accepts(doc), change
    for text in ('{"x":NaN}', '{"x":Infinity}', '{"x":1e400}'):  # not JSON, or not a double
        raw = json.dumps(good)[:-1] + ',"metadata":' + text + "}"
        with pytest.raises(EventValidationError, match="finite"):
            events.decode(raw)
    nested = good | {"metadata": json.loads('{"a":' * 40 + "1" + "}" * 40)}
    assert outside_schema(nested) == "depth" and not decoder_accepts(nested)
    empty = {**good, "kind": "preferences.updated"}
    for name in ("type", "service"):
        empty.pop(name)
    assert not schema_accepts("preferences.updated", empty)
    assert not decoder_accepts(empty)
