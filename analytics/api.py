"""``usertrail dashboard``: the reports as a JSON API, and the page that draws them.

- ``GET /api/v1/services|ratings|themes|segments``: the report, as
  ``usertrail analytics NAME --json`` prints it;
- ``GET /api/v1/engagement?days=30&since=&until=&tz=``: per day and type;
- ``GET /api/v1/users/{id}``: one user's profile as the pipeline keeps it
  (vector, segments with their reasons, preferences, interactions per
  service, the latest interactions); 404 for a user with none of these;
- ``GET /openapi.json``, ``GET /health``;
- ``GET /``: the dashboard (static files in ``static/``, no request leaves
  the server: no CDN, no font, no tracker).

Errors are JSON ``{"error": {"code", "message"}}`` with 400 or 404. The
reports read the rollups (small tables), so every answer is a few queries
on a handful of rows, whatever the size of "UserInteraction".
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from usertrail.analytics import reports
from usertrail.analytics.openapi import document

from usertrail.errors import ConfigurationError

log = logging.getLogger("usertrail.dashboard")

STATIC = Path(__file__).parent / "static"
POOL_SIZE = 4


class Pool:
    """A few autocommit connections, handed out one request at a time."""

    def __init__(self, dsn: str, size: int = POOL_SIZE) -> None:
        self.dsn = dsn
        self.size = size
        self._free: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        self._made = 0

    async def run(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Any]]) -> Any:
        if self._free.empty() and self._made < self.size:
            self._made += 1
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            except BaseException:
                self._made -= 1
                raise
        else:
            conn = await self._free.get()
        try:
            result = await work(conn)
        except psycopg.OperationalError:
            await conn.close()
            self._made -= 1
            raise
        self._free.put_nowait(conn)
        return result

    async def close(self) -> None:
        while not self._free.empty():
            await self._free.get_nowait().close()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _date(request: web.Request, name: str) -> date | None:
    value = request.query.get(name)
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(f"{name}: {value!r} is not a date (YYYY-MM-DD)") from None


def window(request: web.Request, default_tz: str) -> reports.Window:
    raw = request.query.get("days", "30")
    try:
        days = int(raw)
    except ValueError:
        raise ConfigurationError(f"days: {raw!r} is not a whole number") from None
    if not 1 <= days <= 3660:
        raise ConfigurationError("days: from 1 to 3660")
    return reports.Window.of(
        request.query.get("tz") or default_tz,
        days,
        _date(request, "since"),
        _date(request, "until"),
    )


USER = {
    "vector": (
        'SELECT vector, segments, "primarySegment", "segmentConfidence", "lastSegmentUpdate", '
        '"updatedAt" FROM user_vectors WHERE "userId" = %s'
    ),
    "preferences": (
        'SELECT "preferredLanguage", "preferredThemes", "preferredServices", "readingLength", '
        '"tonePreference", "updatedAt" FROM "UserPreferences" WHERE "userId" = %s'
    ),
    "services": (
        'SELECT service, count(*) FROM "UserInteraction" WHERE "userId" = %s '
        "GROUP BY service ORDER BY count(*) DESC, service"
    ),
    "latest": (
        'SELECT id, "createdAt", type, service, theme, rating FROM "UserInteraction" '
        'WHERE "userId" = %s ORDER BY "createdAt" DESC NULLS LAST, id LIMIT 10'
    ),
}


def _iso(value: Any) -> Any:
    return value.isoformat() + "Z" if value is not None else None


async def user(conn: psycopg.AsyncConnection[Any], user_id: str) -> dict[str, Any] | None:
    vector = await (await conn.execute(USER["vector"], (user_id,))).fetchone()
    prefs = await (await conn.execute(USER["preferences"], (user_id,))).fetchone()
    services = await (await conn.execute(USER["services"], (user_id,))).fetchall()
    latest = await (await conn.execute(USER["latest"], (user_id,))).fetchall()
    if vector is None and prefs is None and not services:
        return None
    return {
        "userId": user_id,
        "profile": None
        if vector is None
        else {
            "vector": vector[0],
            "segments": vector[1] or [],
            "primarySegment": vector[2],
            "segmentConfidence": vector[3],
            "lastSegmentUpdate": _iso(vector[4]),
            "updatedAt": _iso(vector[5]),
        },
        "preferences": None
        if prefs is None
        else {
            "preferredLanguage": prefs[0],
            "preferredThemes": prefs[1],
            "preferredServices": prefs[2],
            "readingLength": prefs[3],
            "tonePreference": prefs[4],
            "updatedAt": _iso(prefs[5]),
        },
        "services": [{"service": s, "interactions": int(n)} for s, n in services],
        "latest": [
            {
                "id": i,
                "createdAt": _iso(at),
                "type": t,
                "service": s,
                "theme": th,
                "rating": r,
            }
            for i, at, t, s, th, r in latest
        ],
    }


def build_app(pool: Pool, tz: str) -> web.Application:
    reports.zone(tz)  # a bad default is refused at start, not per request

    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConfigurationError as exc:
            return _error(400, "bad_request", str(exc))
        except psycopg.OperationalError as exc:
            log.warning("database unavailable: %s", str(exc).strip().splitlines()[0])
            return _error(503, "database_unavailable", "the database cannot be reached")

    app = web.Application(middlewares=[errors])

    def report(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            if name == "engagement":
                w = window(request, tz)
                body = await pool.run(lambda c: reports.engagement(c, w))
            else:
                body = await pool.run(getattr(reports, name))
            return web.json_response(body, headers={"Cache-Control": "no-store"})

        return handler

    for name in reports.REPORTS:
        app.router.add_get(f"/api/v1/{name}", report(name))

    async def lookup(request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        body = await pool.run(lambda c: user(c, user_id))
        if body is None:
            return _error(404, "unknown_user", f"nothing is known of user {user_id!r}")
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def health(_: web.Request) -> web.Response:
        await pool.run(lambda c: c.execute("SELECT 1"))
        return web.json_response({"status": "ok"})

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(document(tz)), content_type="application/json")

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.router.add_get("/api/v1/users/{user_id}", lookup)
    app.router.add_get("/health", health)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
    return app


async def serve(dsn: str, host: str, port: int, tz: str) -> None:
    """Answer until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = Pool(dsn)
    await pool.run(lambda c: c.execute("SELECT 1 FROM usertrail_rollup_services LIMIT 1"))
    runner = web.AppRunner(build_app(pool, tz), access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("dashboard on http://%s:%d/ (API: /api/v1/..., /openapi.json)", host, port)
        await stop.wait()
    finally:
        await runner.cleanup()
        await pool.close()
