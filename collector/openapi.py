"""The collector's OpenAPI 3.1 description (``GET /openapi.json``), made
from the contract's JSON Schemas so that the two never disagree."""

from __future__ import annotations

import copy
import json
from typing import Any

from usertrail.producers.events import json_schemas

from usertrail import __version__

FILLED_IN = ("eventId", "occurredAt", "schemaVersion", "source")
"""Optional in a request: the collector fills them in (``source`` from the key)."""


def _component(kind: str) -> str:
    return "".join(part.capitalize() for part in kind.replace(".", "_").split("_"))


def _refs(value: Any) -> Any:
    """Point the schemas' own ``#/$defs/`` references at the components."""
    text = json.dumps(value).replace('"#/$defs/', '"#/components/schemas/')
    return json.loads(text)


def event_schemas() -> dict[str, dict[str, Any]]:
    """Each kind's schema as a request takes it, by component name; plus the
    definitions they share."""
    components: dict[str, dict[str, Any]] = {}
    for kind, schema in json_schemas().items():
        schema = copy.deepcopy(schema)
        components.update(schema.pop("$defs", {}))
        schema.pop("$id", None)
        schema.pop("$schema", None)
        schema["required"] = [name for name in schema["required"] if name not in FILLED_IN]
        schema["properties"]["source"]["description"] = (
            "ignored: the collector sets it from the API key"
        )
        components[_component(kind)] = schema
    rewritten: dict[str, dict[str, Any]] = _refs(components)
    return rewritten


def _error() -> dict[str, Any]:
    return {
        "description": "an error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def document(max_events: int, max_body_bytes: int) -> dict[str, Any]:
    kinds = [_component(kind) for kind in json_schemas()]
    schemas = event_schemas()
    schemas["EventBatch"] = {
        "type": "array",
        "maxItems": max_events,
        "items": {"oneOf": [{"$ref": f"#/components/schemas/{name}"} for name in kinds]},
    }
    schemas["Result"] = {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"enum": ["accepted", "rejected"]},
            "eventId": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    }
    schemas["Accepted"] = {
        "type": "object",
        "required": ["accepted", "rejected", "results"],
        "properties": {
            "accepted": {"type": "integer", "minimum": 0},
            "rejected": {"type": "integer", "minimum": 0},
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}},
        },
    }
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    }
    schemas["Health"] = {
        "type": "object",
        "required": ["ok", "status"],
        "properties": {
            "ok": {"type": "boolean"},
            "status": {"enum": ["serving", "stopping"]},
            "sources": {"type": "array", "items": {"type": "string"}},
            "accepted": {"type": "integer"},
            "rejected": {"type": "integer"},
        },
    }
    batch = {"schema": {"$ref": "#/components/schemas/EventBatch"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "usertrail collector",
            "version": __version__,
            "description": "Events from apps that cannot speak Kafka, validated with the "
            "usertrail event contract and published to the events topic. "
            f"At most {max_events} events and {max_body_bytes} bytes per request.",
        },
        "paths": {
            "/v1/events": {
                "post": {
                    "operationId": "postEvents",
                    "summary": "Send a batch of events",
                    "description": "The valid events are accepted (delivered, or spooled "
                    "and delivered later); each invalid one gets its own verdict. "
                    "Browsers' sendBeacon: a text/plain body and the key in ?key=.",
                    "security": [{"bearer": []}, {"header": []}, {"query": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": batch, "text/plain": batch},
                    },
                    "responses": {
                        "202": {
                            "description": "a verdict per event, in order",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Accepted"}
                                }
                            },
                        },
                        "400": _error(),
                        "401": _error(),
                        "413": _error(),
                        "415": _error(),
                        "429": {
                            **_error(),
                            "headers": {
                                "Retry-After": {
                                    "schema": {"type": "integer"},
                                    "description": "seconds to wait before sending again",
                                }
                            },
                        },
                        "503": _error(),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Whether the collector takes events",
                    "responses": {
                        "200": {
                            "description": "serving",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Health"}
                                }
                            },
                        },
                        "503": {
                            "description": "stopping",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Health"}
                                }
                            },
                        },
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "header": {"type": "apiKey", "in": "header", "name": "X-Usertrail-Key"},
                "query": {"type": "apiKey", "in": "query", "name": "key"},
            },
        },
    }
