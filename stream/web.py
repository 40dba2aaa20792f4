"""The worker's web view: ``GET /profiles/{user_id}`` (the id
percent-encoded as one path segment), answered by
whichever worker owns the user (faust's table routing forwards the
request), as the profile message the worker publishes plus the profile's
counts. 503 until the worker can route; 404 for a user it does not know,
or one erased. ``GET /health`` says whether the worker is healthy (the
watchdog's view, ``watchdog.py``); ``GET /metrics`` is for Prometheus."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from usertrail.stream.segments import Rules, segment
from usertrail.stream.state import UserState, load_state, message_for

if TYPE_CHECKING:
    from usertrail.stream.folder import BatchFolder


def profile_body(state: UserState, rules: Rules) -> dict[str, Any]:
    """The JSON a profile is served as."""
    body = message_for(state, segment(state.profile, rules)).model_dump(mode="json", by_alias=True)
    p = state.profile
    body["profile"] = {
        "countsByType": p.counts_by_type,
        "countsByService": p.counts_by_service,
        "countsByTheme": p.counts_by_theme,
        "favouriteThemes": p.favourite_themes(),
        "ratingSumByService": p.rating_sum_by_service,
        "ratingCountByService": p.rating_count_by_service,
        "firstActivity": p.first_activity.isoformat() if p.first_activity else None,
        "lastActivity": p.last_activity.isoformat() if p.last_activity else None,
        "preferences": p.preferences,
        "onboarding": p.onboarding,
    }
    return body


def add_metrics_view(
    app: faust.App, table: Any, folder: BatchFolder, store_dir: Path | None
) -> None:
    """``GET /metrics``: the worker's Prometheus metrics (stream/metrics.py).
    ``store_dir``: the table's directory on disk (None: in memory)."""

    @app.page("/metrics")
    async def get_metrics(web: Any, request: Any) -> Any:
        data = table.data
        keys = None if store_dir is not None else (lambda: len(data))
        folder.metrics.refresh(
            folder.lags(), store_dir, keys, getattr(data, "usertrail_recovered", None)
        )
        body = generate_latest(folder.metrics.registry)
        return web.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_profile_view(
    app: faust.App, table: Any, rules: Rules, *, health: Callable[[], tuple[bool, str]]
) -> None:
    """The pages on ``app``'s web server: the profiles, routed by
    ``table``'s keys, and ``GET /health`` (200 with what the worker is
    doing, 503 with why it stalled: ``health()``; with the table on disk,
    also how many changelog records its recovery read since the start)."""
    routable = asyncio.Event()

    @app.page("/health")
    async def get_health(web: Any, request: Any) -> Any:
        ok, state = health()
        body = {"ok": ok, "state": state}
        recovered = getattr(table.data, "usertrail_recovered", None)
        if recovered is not None:  # on disk: what recovery read of the changelog
            body["changelogRecordsRecovered"] = recovered
        return web.json(body, status=200 if ok else 503)

    @app.task  # type: ignore[untyped-decorator]
    async def know_the_changelog() -> None:
        # faust's table router asks the producer's metadata for the
        # changelog's partitions and fails (a 500) until it has them.
        producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
        await producer.partitions_for(table.changelog_topic.get_topic_name())
        routable.set()

    def when_routable(view: Any) -> Any:
        @functools.wraps(view)
        async def guarded(web: Any, request: Any, **kwargs: Any) -> Any:
            if not routable.is_set():
                return web.json({"error": "starting: try again shortly"}, status=503)
            try:
                return await view(web, request, **kwargs)
            except aiohttp.ClientConnectionError as exc:
                # the user's owner, as this worker last heard, is gone (killed,
                # say) until the group reassigns its partitions
                return web.json(
                    {"error": f"the worker that owns this user is unreachable ({exc})"},
                    status=503,
                )

        return guarded

    # any user id: a client percent-encodes it as one path segment, and
    # aiohttp decodes it; "{user_id}" alone would refuse '{', '}' and '/'
    @app.page("/profiles/{user_id:.+}")
    @when_routable
    @app.table_route(table=table, match_info="user_id")
    async def get_profile(web: Any, request: Any, user_id: str) -> Any:
        state = load_state(table.get(user_id.encode()))
        if state is None or state.profile.erased_at is not None:
            return web.json({"error": f"unknown user {user_id!r}"}, status=404)
        return web.json(profile_body(state, rules))
