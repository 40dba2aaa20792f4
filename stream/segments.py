"""Segments: rules from a TOML file, evaluated over a profile. Pure.

Each assignment has a segment id, a score in [0, 1] and human-readable
reasons. ``primarySegment`` is the best score (ties: the earlier rule);
``segmentConfidence`` is ``score * (1 - exp(-evidence / evidence_scale))``,
growing with both the score and the amount of evidence behind it.
"""

from __future__ import annotations

import math
import re
import tomllib
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from usertrail.stream.fold import AffinityConfig, Profile

from usertrail.errors import ConfigurationError


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Annotated[str, Field(pattern=r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")]


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


Rule = Annotated[
    ColdStart | ServiceShare | ThemeShare | Engagement | RatingAverage,
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

    def affinity_config(self) -> AffinityConfig:
        a = self.affinity
        return AffinityConfig(
            tuple(a.themes), tuple(a.services), a.half_life_days, a.rating_weights, a.unrated
        )


DEFAULT_RULES = "rules.toml"
_KINDS = ("cold_start", "service_share", "theme_share", "engagement", "rating_average")


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


def _line_of(text: str, loc: list[object]) -> int:
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


def _assign(rule: Rule, p: Profile) -> Assignment | None:
    n = p.interactions
    if isinstance(rule, ColdStart):
        interests = (p.onboarding or {}).get("interests", [])
        if rule.interest in interests and n <= rule.max_interactions:
            return Assignment(
                segment=rule.id,
                score=rule.score,
                evidence=1,
                reasons=[
                    f"declared an interest in {rule.interest} at onboarding",
                    f"{n} interaction{'s' if n != 1 else ''} so far",
                ],
            )
        return None
    if isinstance(rule, ServiceShare):
        count = p.counts_by_service.get(rule.service, 0)
        if n >= rule.min_interactions and count / n >= rule.min_share:
            return Assignment(
                segment=rule.id,
                score=count / n,
                evidence=n,
                reasons=[f"{count} of {n} interactions were {rule.service}"],
            )
        return None
    if isinstance(rule, ThemeShare):
        themed = sum(p.counts_by_theme.values())
        count = p.counts_by_theme.get(rule.theme, 0)
        if themed >= rule.min_interactions and count / themed >= rule.min_share:
            return Assignment(
                segment=rule.id,
                score=count / themed,
                evidence=themed,
                reasons=[f"{count} of {themed} interactions with a theme were about {rule.theme}"],
            )
        return None
    if isinstance(rule, Engagement):
        if p.now is None:
            return None
        since = p.now - timedelta(days=rule.window_days)
        recent = sum(1 for t in p.recent_activity if t > since)
        if recent >= rule.min_interactions:
            return Assignment(
                segment=rule.id,
                score=min(1.0, recent / (2 * rule.min_interactions)),
                evidence=recent,
                reasons=[
                    f"{recent} interactions in the {rule.window_days:g} days up to {p.now:%Y-%m-%d}"
                ],
            )
        return None
    ratings = sum(p.rating_count_by_service.values())
    if ratings < rule.min_ratings:
        return None
    average = sum(p.rating_sum_by_service.values()) / ratings
    reason = f"average rating {average:.1f} over {ratings} ratings"
    if rule.max_average is not None and average <= rule.max_average:
        return Assignment(
            segment=rule.id, score=(5 - average) / 4, evidence=ratings, reasons=[reason]
        )
    if rule.min_average is not None and average >= rule.min_average:
        return Assignment(
            segment=rule.id, score=(average - 1) / 4, evidence=ratings, reasons=[reason]
        )
    return None


def segment(profile: Profile, rules: Rules) -> Segmentation:
    assignments = [a for rule in rules.segments if (a := _assign(rule, profile)) is not None]
    if not assignments:
        return Segmentation(assignments=[], primary_segment=None, segment_confidence=None)
    best = max(assignments, key=lambda a: a.score)  # max keeps the first of equals
    confidence = best.score * (1 - math.exp(-best.evidence / rules.confidence.evidence_scale))
    return Segmentation(
        assignments=assignments,
        primary_segment=best.segment,
        segment_confidence=round(confidence, 6),
    )
