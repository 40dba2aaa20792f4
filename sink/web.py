"""The sink's HTTP server (``usertrail sink --web-port``): ``GET /metrics``
for Prometheus and ``GET /health`` for a supervisor or a container's health
check (200 with what the sink is doing, 503 with what it waits for).

It runs on the sink's own event loop, so a sink whose loop is blocked does
not answer at all: what a liveness probe should see."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from usertrail.sink.consumer import Sink

log = logging.getLogger("usertrail.sink")


async def serve(sink: Sink, host: str, port: int) -> web.AppRunner:
    """Start answering on ``host:port``; the caller cleans the runner up."""

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(sink.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(request: web.Request) -> web.Response:
        ok, state = sink.health()
        return web.json_response({"ok": ok, **state}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics, health on /health", host, port)
    return runner
