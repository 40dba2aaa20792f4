"""Segments: rules from a TOML file, evaluated over a profile. Pure.

Each assignment has a segment id, a score in [0, 1] and human-readable
reasons. ``primarySegment`` is the best score (ties: the earlier rule);
``segmentConfidence`` is ``score * (1 - exp(-evidence / evidence_scale))``,
growing with both the score and the amount of evidence behind it.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import tomllib
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from usertrail.producers.events import SLUG_PATTERN
from usertrail.stream.fold import AffinityConfig, micros

from usertrail.errors import ConfigurationError


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Annotated[str, Field(pattern=SLUG_PATTERN)]


class ColdStart(_Rule):
    kind: Literal["cold_start"]
    interest: str
    max_interactions: int = Field(ge=0)
    score: float = Field(ge=0, le=1)


class ServiceShare(_Rule):
    kind: Literal["service_share"]
    service: str
    min_share: float = Field(gt=0, le=1)
    min_interactions: int = Field(ge=1)


class ThemeShare(_Rule):
    kind: Literal["theme_share"]
    theme: str
    min_share: float = Field(gt=0, le=1)
    min_interactions: int = Field(ge=1)


class Engagement(_Rule):
    kind: Literal["engagement"]
    window_days: float = Field(gt=0)
    min_interactions: int = Field(ge=1)


class RatingAverage(_Rule):
    kind: Literal["rating_average"]
    min_average: float | None = Field(default=None, ge=1, le=5)
    max_average: float | None = Field(default=None, ge=1, le=5)
    min_ratings: int = Field(ge=1)


class Fallback(_Rule):
    """Everyone no other rule selects (so every user has a segment, as the
    seed's validation report expects: coverage 100%)."""

    kind: Literal["fallback"]
    score: float = Field(ge=0, le=1)


Rule = Annotated[
    ColdStart | ServiceShare | ThemeShare | Engagement | RatingAverage | Fallback,
    Field(discriminator="kind"),
]


class _Affinity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    themes: list[str]
    services: list[str]
    half_life_days: float = Field(gt=0)
    rating_weights: tuple[float, float, float, float, float]
    unrated: float = Field(ge=0)


class _Confidence(BaseModel):
    model_config = ConfigDict(extra="forbid")
    evidence_scale: float = Field(gt=0)


class Rules(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    affinity: _Affinity
    confidence: _Confidence
    segments: list[Rule] = Field(alias="segment", min_length=1)

    @functools.cached_property
    def matchers(self) -> list[tuple[Rule, Matcher]]:
        """Each rule with its compiled ``_compile`` function."""
        return [(rule, _compile(rule)) for rule in self.segments]

    @functools.cached_property
    def keyed(self) -> list[tuple[str, Matcher]]:
        """``matchers`` by segment id, as ``segment_key`` reads them."""
        return [(rule.id, match) for rule, match in self.matchers]

    @functools.cached_property
    def fallback(self) -> Fallback | None:
        """The rule that applies when no other does, if any."""
        return next((r for r in self.segments if isinstance(r, Fallback)), None)

    def affinity_config(self) -> AffinityConfig:
        a = self.affinity
        return AffinityConfig(
            tuple(a.themes), tuple(a.services), a.half_life_days, a.rating_weights, a.unrated
        )


DEFAULT_RULES = "rules.toml"
_KINDS = (
    "cold_start",
    "service_share",
    "theme_share",
    "engagement",
    "rating_average",
    "fallback",
)


def load_rules(path: Path | None = None) -> Rules:
    """The rules at ``path`` (default: the shipped file); a malformed file
    raises ``ConfigurationError`` naming the file, the line and the reason."""
    if path is None:
        text = resources.files("usertrail.stream").joinpath(DEFAULT_RULES).read_text()
        name = f"<default {DEFAULT_RULES}>"
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read segment rules {path}: {exc}") from exc
        name = str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = match.group(1) if match else "?"
        raise ConfigurationError(f"{name}:{line}: not valid TOML: {exc}") from None
    try:
        rules = Rules.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = list(err["loc"])
            line = _line_of(text, loc)
            where = ".".join(str(p) for p in loc if p not in _KINDS)
            problems.append(f"{name}:{line}: {where}: {err['msg']}")
        raise ConfigurationError("invalid segment rules:\n  " + "\n  ".join(problems)) from None
    ids = [r.id for r in rules.segments]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigurationError(f"{name}: segment ids must be unique: {duplicates}")
    for rule in rules.segments:
        if isinstance(rule, RatingAverage) and (rule.min_average is None) == (
            rule.max_average is None
        ):
            raise ConfigurationError(
                f"{name}:{_line_of(text, ['segment', ids.index(rule.id)])}: segment "
                f"{rule.id!r}: give exactly one of min_average or max_average"
            )
    return rules


def _line_of(text: str, loc: Sequence[object]) -> int:
    """The line a validation error points at: the n-th [[segment]] header (or
    a key inside it), else the [table] header, else 1."""
    lines = text.splitlines()
    if len(loc) >= 2 and loc[0] == "segment" and isinstance(loc[1], int):
        headers = [i for i, text_line in enumerate(lines) if text_line.strip() == "[[segment]]"]
        if loc[1] < len(headers):
            start = headers[loc[1]]
            end = headers[loc[1] + 1] if loc[1] + 1 < len(headers) else len(lines)
            key = next((str(p) for p in loc[2:] if isinstance(p, str) and p not in _KINDS), None)
            for i in range(start, end):
                if key and re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
                    return i + 1
            return start + 1
    if loc and isinstance(loc[0], str):
        for i, text_line in enumerate(lines):
            if text_line.strip() == f"[{loc[0]}]":
                return i + 1
    return 1


# --- evaluation ---------------------------------------------------------------------
class Assignment(BaseModel):
    model_config = ConfigDict(frozen=True)
    segment: str
    score: float = Field(ge=0, le=1)
    reasons: list[str] = Field(min_length=1)
    evidence: int = Field(ge=0)


class Segmentation(BaseModel):
    model_config = ConfigDict(frozen=True)
    assignments: list[Assignment]
    primary_segment: str | None
    segment_confidence: float | None


class Facts(Protocol):
    """What rules read: a ``Profile``, or a ``Folding`` between events."""

    @property
    def interactions(self) -> int: ...
    def totals(self) -> Sequence[int]: ...
    @property
    def counts_by_service(self) -> dict[str, int]: ...
    @property
    def counts_by_theme(self) -> dict[str, int]: ...
    @property
    def rating_sum_by_service(self) -> dict[str, int]: ...
    @property
    def rating_count_by_service(self) -> dict[str, int]: ...
    @property
    def onboarding(self) -> dict[str, Any] | None: ...
    @property
    def now(self) -> datetime | None: ...
    @property
    def recent_activity(self) -> Sequence[int]: ...  # microseconds (fold.micros)


# The sums every rule reads, as ``Facts.totals()`` gives them (taken once per
# evaluation and passed as they are: a named tuple per event cost more than
# the rules it served), by position:
INTERACTIONS, THEMED, RATINGS, RATING_SUM = range(4)
Totals = Sequence[int]
Matcher = Callable[[Facts, Totals], "tuple[float, int] | None"]


def _compile(rule: Rule) -> Matcher:
    """``rule`` as a function of (facts, totals) giving (score, evidence)
    when the rule selects them: the one place a rule is decided; ``_reasons``
    only words what this found. Compiled once per rules file (``Rules.matchers``):
    the worker asks after every event."""
    if isinstance(rule, ServiceShare):  # of all interactions
        return _share(
            "counts_by_service", INTERACTIONS, rule.service, rule.min_interactions, rule.min_share
        )
    if isinstance(rule, ThemeShare):  # of the interactions with a theme
        return _share("counts_by_theme", THEMED, rule.theme, rule.min_interactions, rule.min_share)
    if isinstance(rule, RatingAverage):
        least, low, high = rule.min_ratings, rule.max_average, rule.min_average

        def rating_average(p: Facts, t: Totals) -> tuple[float, int] | None:
            ratings = t[RATINGS]
            if ratings < least:
                return None
            average = t[RATING_SUM] / ratings
            if low is not None and average <= low:
                return (5 - average) / 4, ratings
            if high is not None and average >= high:
                return (average - 1) / 4, ratings
            return None

        return rating_average
    if isinstance(rule, Engagement):
        window, least = timedelta(days=rule.window_days), rule.min_interactions

        def engagement(p: Facts, t: Totals) -> tuple[float, int] | None:
            if p.now is None:
                return None
            recent = _recent(p, window)
            if recent >= least:
                return min(1.0, recent / (2 * least)), recent
            return None

        return engagement
    if isinstance(rule, Fallback):
        return lambda p, t: None  # decided after every other rule: see Rules.fallback
    interest, most, score = rule.interest, rule.max_interactions, rule.score

    def cold_start(p: Facts, t: Totals) -> tuple[float, int] | None:
        if t[INTERACTIONS] <= most and interest in (p.onboarding or {}).get("interests", ()):
            return score, 1
        return None

    return cold_start


def _share(counts: str, total: int, slug: str, least: int, share: float) -> Matcher:
    """``slug``'s share of ``p.<counts>`` out of ``t[total]`` interactions."""

    def match(p: Facts, t: Totals) -> tuple[float, int] | None:
        n = t[total]
        if n >= least and (count := getattr(p, counts).get(slug, 0)) / n >= share:
            return count / n, n
        return None

    return match


def _recent(p: Facts, window: timedelta) -> int:
    """Interactions after ``now - window`` (``recent_activity`` is sorted)."""
    assert p.now is not None
    activity = p.recent_activity
    return len(activity) - bisect.bisect_right(activity, micros(p.now - window))


def _reasons(rule: Rule, p: Facts) -> list[str]:
    if isinstance(rule, ColdStart):
        n = p.interactions
        return [
            f"declared an interest in {rule.interest} at onboarding",
            f"{n} interaction{'s' if n != 1 else ''} so far",
        ]
    if isinstance(rule, ServiceShare):
        count = p.counts_by_service.get(rule.service, 0)
        return [f"{count} of {p.interactions} interactions were {rule.service}"]
    if isinstance(rule, ThemeShare):
        themed = sum(p.counts_by_theme.values())
        count = p.counts_by_theme.get(rule.theme, 0)
        return [f"{count} of {themed} interactions with a theme were about {rule.theme}"]
    if isinstance(rule, Engagement):
        assert p.now is not None
        return [
            f"{_recent(p, timedelta(days=rule.window_days))} interactions in the "
            f"{rule.window_days:g} days "
            f"up to {p.now:%Y-%m-%d}"
        ]
    ratings = sum(p.rating_count_by_service.values())
    average = sum(p.rating_sum_by_service.values()) / ratings
    return [f"average rating {average:.1f} over {ratings} ratings"]


def segment_key(p: Facts, rules: Rules) -> tuple[tuple[str, float], ...]:
    """(segment, score to 6 places) of every assignment: what ``segment``
    decides, without its reasons, cheap enough to ask after every event."""
    t = p.totals()
    key = tuple([(rule_id, round(m[0], 6)) for rule_id, match in rules.keyed if (m := match(p, t))])
    if key:
        return key
    if (fallback := rules.fallback) is not None:
        return ((fallback.id, round(fallback.score, 6)),)
    return ()


def segment(profile: Facts, rules: Rules) -> Segmentation:
    t = profile.totals()
    assignments = [
        Assignment(segment=rule.id, score=m[0], evidence=m[1], reasons=_reasons(rule, profile))
        for rule, match in rules.matchers
        if (m := match(profile, t)) is not None
    ]
    if not assignments and (fallback := rules.fallback) is not None:
        n = t[INTERACTIONS]
        assignments = [
            Assignment(
                segment=fallback.id,
                score=fallback.score,
                evidence=n,
                reasons=[f"no other segment fits yet ({n} interaction{'s' if n != 1 else ''})"],
            )
        ]
    if not assignments:
        return Segmentation(assignments=[], primary_segment=None, segment_confidence=None)
    best = max(assignments, key=lambda a: a.score)  # max keeps the first of equals
    confidence = best.score * (1 - math.exp(-best.evidence / rules.confidence.evidence_scale))
    return Segmentation(
        assignments=assignments,
        primary_segment=best.segment,
        segment_confidence=round(confidence, 6),
    )
