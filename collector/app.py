"""``usertrail collector``: ``POST /v1/events`` for apps that cannot speak Kafka.

A request carries a JSON array of events in the wire form of the contract
(camelCase, as ``usertrail schema`` exports it), where ``eventId``,
``occurredAt`` and ``schemaVersion`` may be left out (the collector fills
them in: a client that retries a batch should set ``eventId`` itself, so the
retry is counted once) and ``source`` is never taken from the body: the API
key decides it. Every event is validated as the SDK validates a call; the
valid ones are handed to the SDK's client of that source (one per source,
with its own spool), which delivers them or spools them: nothing accepted is
lost, also when the broker is down or the collector is stopped.

Answers, always JSON:
- 202 ``{"accepted": n, "rejected": m, "results": [...]}``, one result per
  event in order: ``{"status": "accepted", "eventId": ...}`` or
  ``{"status": "rejected", "errors": [{"field": ..., "message": ...}]}``;
- 400 a body that is not a JSON array; 401 no key, or an unknown or revoked
  one; 413 a body or batch over the limits; 415 another content type;
  429 with ``Retry-After`` when the client's buffer has no room (the broker
  is slower than the traffic); 503 while shutting down.

Browsers: CORS for the configured origins, and ``text/plain`` bodies with
the key in ``?key=`` for ``navigator.sendBeacon`` (which can set neither a
header nor another content type without a preflight).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiokafka.errors import KafkaError
from pydantic_core import PydanticSerializationError, to_json
from usertrail.collector.keys import KeyRing
from usertrail.collector.openapi import document
from usertrail.producers import events
from usertrail.producers.client import TrackingClient
from usertrail.producers.ids import uuid7

from usertrail.errors import (
    BufferFullError,
    ClientClosedError,
    EventValidationError,
    UsertrailError,
)
from usertrail.settings import Settings

log = logging.getLogger("usertrail.collector")

RETRY_AFTER_SECONDS = 1
# how long a stop waits for the requests in progress (their bodies may still
# be arriving) before it cuts them off
SHUTDOWN_SECONDS = 10.0
ALLOWED_TYPES = ("application/json", "text/plain")
ALLOWED_HEADERS = "authorization, content-type, x-usertrail-key"


@dataclass
class Limits:
    max_body_bytes: int = 1024 * 1024
    max_events: int = 1000


@dataclass
class Collector:
    """The collector's state: keys, one client per source, the counters."""

    settings: Settings
    keys: KeyRing
    limits: Limits = field(default_factory=Limits)
    cors_origins: frozenset[str] = frozenset()
    clients: dict[str, TrackingClient] = field(default_factory=dict)
    accepted: int = 0
    rejected: int = 0
    stopping: bool = False
    in_progress: int = 0  # requests in their handler now
    _opening: dict[str, asyncio.Task[TrackingClient]] = field(default_factory=dict)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    async def finished(self, seconds: float) -> bool:
        """Wait (at most ``seconds``) until no request is in its handler;
        False when some still are."""
        if self.in_progress:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), seconds)
        return self.in_progress == 0

    async def client(self, source: str) -> TrackingClient:
        """The source's client, started on its first event (offline start:
        a broker that is not there yet means spooling, not an error)."""
        client = self.clients.get(source)
        if client is not None:
            return client
        opening = self._opening.get(source)
        if opening is None:
            opening = asyncio.get_running_loop().create_task(self._open(source))
            self._opening[source] = opening
        try:
            return await asyncio.shield(opening)
        except Exception:
            if self._opening.get(source) is opening:
                del self._opening[source]  # the next request tries again
            raise

    async def _open(self, source: str) -> TrackingClient:
        spool_dir = self.settings.spool_dir or self.settings.data_dir / "collector-spool"
        client = TrackingClient(
            source=source,
            settings=self.settings,
            spool_path=spool_dir / f"{source}.jsonl",
            buffer_size=self.settings.collector_buffer_events,
        )
        try:
            await client.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await client.close()
            raise
        self.clients[source] = client
        return client

    async def close(self) -> tuple[int, int]:
        """Deliver what every client holds, spool what cannot be."""
        delivered = spooled = 0
        for client in self.clients.values():
            report = await client.close()
            delivered += report.delivered
            spooled += report.spooled
        self.clients.clear()
        return delivered, spooled


class _ClientErrors(logging.Filter):
    """aiohttp logs a malformed request (a NUL in a header, a broken request
    line) with a traceback, after answering it 400 itself: the client's
    mistake, one line at debug level is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and 400 <= (error.code or 0) < 500:
            log.debug("malformed request answered %s: %s", error.code, error.message)
            return False
        return True


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


def _key_of(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("X-Usertrail-Key") or request.query.get("key")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def admit(raw: Any, source: str, now: datetime) -> events.EventBase:
    """One event of a request, validated with the contract: the key's source,
    the defaults filled in, the time window checked."""
    if not isinstance(raw, dict):
        raise EventValidationError("unknown", [("event", "must be a JSON object")])
    obj = dict(raw)
    obj["source"] = source
    obj.setdefault("eventId", uuid7())
    obj.setdefault("occurredAt", now.isoformat().replace("+00:00", "Z"))
    obj.setdefault("schemaVersion", events.SCHEMA_VERSION)
    # validated as JSON, as every record is (the contract's JSON mode):
    # pydantic-core's serializer writes it back several times faster than
    # json.dumps (the body's NaN and Infinity were refused when it was read)
    event = events.decode(to_json(obj))
    error = events.bound_error(event, int(now.timestamp() * 1000))
    if error is not None:
        raise error
    return event


async def _body(request: web.Request, limit: int) -> bytes | web.Response:
    length = request.content_length
    if length is not None and length > limit:
        return _error(413, "body_too_large", f"the body is {length} bytes; the limit is {limit}")
    data = bytearray()
    while chunk := await request.content.read(64 * 1024):
        data += chunk
        if len(data) > limit:
            return _error(413, "body_too_large", f"the body is over the limit of {limit} bytes")
    return bytes(data)


def build_app(collector: Collector) -> web.Application:
    limits = collector.limits

    @web.middleware
    async def counted(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The requests in progress, which a stop waits for (``serve``)."""
        collector.in_progress += 1
        collector._idle.clear()
        try:
            return await handler(request)
        finally:
            collector.in_progress -= 1
            if not collector.in_progress:
                collector._idle.set()

    @web.middleware
    async def cors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and (
            "*" in collector.cors_origins or origin in collector.cors_origins
        )
        if request.method == "OPTIONS" and request.path == "/v1/events":
            if not allowed:
                return _error(403, "origin_not_allowed", f"origin {origin!r} is not allowed")
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # aiohttp's own (404, 405): JSON too
                response = _error(exc.status, "http", exc.reason)
        if allowed:
            assert origin is not None
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        return response

    async def post_events(request: web.Request) -> web.Response:
        if collector.stopping:
            return _error(503, "stopping", "the collector is shutting down", **{"Retry-After": "5"})
        key = _key_of(request)
        source = collector.keys.source_for(key) if key else None
        if source is None:
            return _error(
                401,
                "unauthorized",
                "unknown or revoked API key"
                if key
                else "an API key is needed (Authorization: Bearer <key>, X-Usertrail-Key, "
                "or ?key=)",
                **{"WWW-Authenticate": 'Bearer realm="usertrail"'},
            )
        if request.content_type not in ALLOWED_TYPES:
            return _error(
                415, "unsupported_media_type", "send application/json (or text/plain for beacons)"
            )
        body = await _body(request, limits.max_body_bytes)
        if isinstance(body, web.Response):
            return body
        try:
            batch = json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return _error(400, "invalid_json", "the body is not JSON (UTF-8)")
        if not isinstance(batch, list):
            return _error(400, "not_an_array", "the body must be a JSON array of events")
        if len(batch) > limits.max_events:
            return _error(
                413,
                "too_many_events",
                f"{len(batch)} events in one request; the limit is {limits.max_events}",
            )
        now = datetime.now(UTC)
        results: list[dict[str, Any]] = []
        valid: list[events.EventBase] = []
        for raw in batch:
            try:
                event = admit(raw, source, now)
            except EventValidationError as exc:
                results.append(
                    {
                        "status": "rejected",
                        "errors": [{"field": f, "message": m} for f, m in exc.errors],
                    }
                )
                continue
            except (ValueError, RecursionError, PydanticSerializationError):  # too deep
                results.append(
                    {"status": "rejected", "errors": [{"field": "event", "message": "too deep"}]}
                )
                continue
            valid.append(event)
            results.append({"status": "accepted", "eventId": event.event_id})
        try:
            client = await collector.client(source)
        except (UsertrailError, KafkaError, OSError) as exc:
            log.error("the client of source %s did not start: %r", source, exc)
            return _error(
                503,
                "unavailable",
                f"the collector cannot send for source {source!r} now: retry later",
                **{"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        if valid and client.room < len(valid):
            return _error(
                429,
                "buffer_full",
                f"{len(valid)} events do not fit in the buffer now: retry later",
                **{"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        for i, event in enumerate(valid):
            try:
                await client.send_event(event)  # room checked: no wait, as a rule
            except (BufferFullError, ClientClosedError) as exc:
                # accepted all the same: the rest goes to the source's spool
                client.spool_events(valid[i:], exc)
                break
        collector.accepted += len(valid)
        collector.rejected += len(batch) - len(valid)
        return web.json_response(
            {"accepted": len(valid), "rejected": len(batch) - len(valid), "results": results},
            status=202,
        )

    async def health(request: web.Request) -> web.Response:
        ok = not collector.stopping
        return web.json_response(
            {
                "ok": ok,
                "status": "stopping" if collector.stopping else "serving",
                "sources": sorted(collector.clients),
                "accepted": collector.accepted,
                "rejected": collector.rejected,
            },
            status=200 if ok else 503,
        )

    spec = document(limits.max_events, limits.max_body_bytes)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(spec)

    # our own body limit (a JSON 413); aiohttp's would answer in text
    app = web.Application(middlewares=[counted, cors], client_max_size=limits.max_body_bytes + 1024)
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/health", health)
    app.router.add_get("/openapi.json", openapi)
    return app


async def serve(collector: Collector, host: str, port: int) -> None:
    """Answer until SIGTERM or SIGINT; then finish the requests in progress,
    deliver everything accepted (or spool it) and return.

    A stop closes the listening socket first and waits for the requests in
    progress (up to ``SHUTDOWN_SECONDS``) with their connections open:
    aiohttp's own shutdown stops reading every connection at once, so a
    request whose body was still arriving would never be finished. Meanwhile
    a new request on an open keep-alive connection is answered 503, and
    ``/health`` too."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("aiohttp.server").addFilter(_ClientErrors())
    collector.keys.load()
    collector.keys.start()
    runner = web.AppRunner(build_app(collector), access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    # what is loaded by now (modules, the app) stays: the garbage collector's
    # full passes, which stop every request, need not walk it again
    gc.collect()
    gc.freeze()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("collector on http://%s:%d/v1/events (OpenAPI: /openapi.json)", host, port)
        await stop.wait()
        collector.stopping = True
        await site.stop()  # no new connections
        log.info(
            "stopping: finishing the requests in progress (%d), delivering what was accepted",
            collector.in_progress,
        )
        if not await collector.finished(SHUTDOWN_SECONDS):
            log.warning(
                "%d requests still in progress after %g s: cut off",
                collector.in_progress,
                SHUTDOWN_SECONDS,
            )
    finally:
        await runner.cleanup()
        await collector.keys.stop()
        delivered, spooled = await collector.close()
        log.info(
            "collector stopped: %d accepted, %d rejected; on stop %d delivered, %d spooled",
            collector.accepted,
            collector.rejected,
            delivered,
            spooled,
        )
