"""The scorer's OpenAPI document: every response schema strict (required fields, no others)."""

from __future__ import annotations


def _object(properties: dict, required: list | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required or list(properties),
            "additionalProperties": False}


def openapi_document(settings) -> dict:
    """Return the OpenAPI 3.0 document of the scorer, with the limits from ``serving`` settings."""
    nullable_number = {"type": "number", "nullable": True}
    nullable_string = {"type": "string", "nullable": True}
    identifier = {"type": "string", "pattern": "^[A-Za-z0-9_.:@-]{1,128}$"}
    item = _object({"item_id": {"type": "string"}, "score": nullable_number, "title": nullable_string})
    ranking = _object({
        "request_id": {"type": "string"},
        "user_id": {"type": "string"},
        "model_version": nullable_string,
        "feature_set_version": nullable_string,
        "items": {"type": "array", "items": item},
        "fallback": {"type": "boolean"},
        "fallback_reason": {"type": "string", "nullable": True,
                            "enum": ["unknown_user", "redis_unavailable", "no_model", None]},
        "feature_age_seconds": nullable_number,
        "stale": {"type": "boolean"},
    })
    error = _object({"error": _object({"code": {"type": "string"}, "message": {"type": "string"},
                                       "field": {"type": "string"}}, ["code", "message"])})
    errors = {status: {"description": description, "content": {"application/json": {"schema": error}}}
              for status, description in (("400", "invalid request"), ("401", "missing or unknown API key"),
                                           ("404", "no such route"), ("405", "method not allowed"),
                                           ("413", "body too large"))}
    ranked = {"200": {"description": "ranked items (fallback says whether the model ranked them)",
                      "content": {"application/json": {"schema": ranking}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "streamrec scorer", "version": "1"},
        "paths": {
            "/v1/users/{user_id}/recommendations": {"get": {
                "summary": "Recommendations for a user from generated candidates",
                "parameters": [
                    {"name": "user_id", "in": "path", "required": True, "schema": identifier},
                    {"name": "k", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": settings.max_k, "default": 10}}],
                "responses": {**ranked, **{key: errors[key] for key in ("400", "401")}}}},
            "/v1/rank": {"post": {
                "summary": "Rank the caller's candidates for a user",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _object({
                    "user_id": identifier,
                    "candidates": {"type": "array", "items": identifier, "minItems": 1,
                                   "maxItems": settings.max_candidates},
                    "k": {"type": "integer", "minimum": 1, "maximum": settings.max_k}}, ["user_id", "candidates"])}}},
                "responses": {**ranked, **{key: errors[key] for key in ("400", "401", "413")}}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {
                "description": "alive", "content": {"application/json": {"schema": _object({"status": {"type": "string"}})}}}}}},
            "/readyz": {"get": {"summary": "Readiness: Redis reachable and a model loaded", "responses": {
                status: {"description": description, "content": {"application/json": {"schema": _object({
                    "ready": {"type": "boolean"}, "redis": {"type": "boolean"},
                    "model": _object({"name": {"type": "string"}, "alias": {"type": "string"},
                                      "version": nullable_string, "tracking_uri": {"type": "string"}}),
                    "reasons": {"type": "array", "items": {"type": "string"}}})}}}
                for status, description in (("200", "ready"), ("503", "not ready, with the reasons"))}}},
        },
    }
