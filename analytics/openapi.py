"""The OpenAPI description of the dashboard's JSON API (``GET /openapi.json``)."""

from __future__ import annotations

from typing import Any

from usertrail import __version__


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": required if required is not None else list(props),
    }


INT = {"type": "integer", "minimum": 0}
NUM_OR_NULL = {"type": ["number", "null"]}
STR = {"type": "string"}
ERROR = _obj({"error": _obj({"code": STR, "message": STR})})

SCHEMAS: dict[str, Any] = {
    "Services": {
        "type": "array",
        "description": "seed 000, Most Popular Services: most interactions first",
        "items": _obj(
            {
                "service": STR,
                "interactions": INT,
                "users": INT,
                "ratings": INT,
                "averageRating": NUM_OR_NULL,
            }
        ),
    },
    "Ratings": {
        "type": "array",
        "description": "seed 000, Average Rating by Service: rated services, best first",
        "items": _obj({"service": STR, "ratings": INT, "averageRating": {"type": "number"}}),
    },
    "Themes": {
        "type": "array",
        "items": _obj(
            {"theme": STR, "interactions": INT, "ratings": INT, "averageRating": NUM_OR_NULL}
        ),
    },
    "Engagement": _obj(
        {
            "timeZone": STR,
            "since": {"type": "string", "format": "date"},
            "until": {"type": "string", "format": "date"},
            "days": {
                "type": "array",
                "description": "every day of the range, oldest first",
                "items": _obj(
                    {
                        "day": {"type": "string", "format": "date"},
                        "total": INT,
                        "types": {"type": "object", "additionalProperties": INT},
                    }
                ),
            },
        }
    ),
    "Segments": _obj(
        {
            "total": INT,
            "withSegments": INT,
            "percentage": NUM_OR_NULL,
            "distribution": {
                "type": "array",
                "items": _obj({"segment": STR, "count": INT, "avgConfidence": NUM_OR_NULL}),
            },
        }
    ),
    "User": _obj(
        {
            "userId": STR,
            "profile": {"type": ["object", "null"]},
            "preferences": {"type": ["object", "null"]},
            "services": {
                "type": "array",
                "items": _obj({"service": STR, "interactions": INT}),
            },
            "latest": {"type": "array", "items": {"type": "object"}},
        }
    ),
    "Error": ERROR,
}


def _get(summary: str, schema: str, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": "the report",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        },
        "503": {
            "description": "the database cannot be reached",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        },
    }
    if params:
        responses["400"] = {
            "description": "a parameter out of range or malformed",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return {"get": {"summary": summary, "parameters": params or [], "responses": responses}}


def document(tz: str) -> dict[str, Any]:
    date_param = {"type": "string", "format": "date"}
    engagement = [
        {
            "name": "days",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 3660, "default": 30},
        },
        {"name": "since", "in": "query", "schema": date_param, "description": "first day"},
        {"name": "until", "in": "query", "schema": date_param, "description": "last day"},
        {
            "name": "tz",
            "in": "query",
            "schema": {"type": "string", "default": tz},
            "description": "IANA time zone of the days",
        },
    ]
    user = _get("one user's profile, segments and interactions", "User")
    user["get"]["parameters"] = [{"name": "user_id", "in": "path", "required": True, "schema": STR}]
    user["get"]["responses"]["404"] = {
        "description": "nothing known of the user",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "usertrail analytics",
            "version": __version__,
            "description": "The seeds' analytics, read from rollups kept in the same "
            "transaction as the rows they summarise.",
        },
        "paths": {
            "/api/v1/services": _get("interactions, users and ratings per service", "Services"),
            "/api/v1/ratings": _get("average rating by service", "Ratings"),
            "/api/v1/engagement": _get("interactions per day and type", "Engagement", engagement),
            "/api/v1/themes": _get("interactions and ratings per theme", "Themes"),
            "/api/v1/segments": _get("segment coverage and distribution", "Segments"),
            "/api/v1/users/{user_id}": user,
        },
        "components": {"schemas": SCHEMAS},
    }
