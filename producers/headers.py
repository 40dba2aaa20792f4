"""The Kafka headers on every event the SDK sends: what the value is
(``content-type``), which version of the contract it follows
(``usertrail-schema-version``, as its ``schemaVersion``), and, when the app
traces with OpenTelemetry, the W3C trace context of the span it was sent in
(``traceparent``, ``tracestate``). OpenTelemetry is optional
(``usertrail[tracing]``): without it nothing is looked up per event."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from usertrail.producers.events import SCHEMA_VERSION

Headers = tuple[tuple[str, bytes], ...]

CONTENT_TYPE = "content-type"
SCHEMA_VERSION_HEADER = "usertrail-schema-version"
TRACE_HEADERS = ("traceparent", "tracestate")

STATIC: Headers = (
    (CONTENT_TYPE, b"application/json"),
    (SCHEMA_VERSION_HEADER, str(SCHEMA_VERSION).encode()),
)


def _injector() -> tuple[Callable[[dict[str, Any]], None], Callable[[], bool]] | None:
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None

    def in_span() -> bool:
        # what the W3C propagator checks before it writes traceparent: no
        # valid span, no trace headers, and the propagators are not asked
        # (measured: they were a sixth of the SDK's time per event)
        return bool(trace.get_current_span().get_span_context().is_valid)

    return propagate.inject, in_span


_tracing = _injector()


def for_event() -> Headers:
    """The headers of an event sent now (in the current span, if any)."""
    if _tracing is None:
        return STATIC
    _inject, in_span = _tracing
    if not in_span():
        return STATIC
    carrier: dict[str, Any] = {}
    _inject(carrier)
    trace = tuple((name, str(carrier[name]).encode()) for name in TRACE_HEADERS if name in carrier)
    return STATIC + trace if trace else STATIC
