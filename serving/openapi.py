"""The scorer's OpenAPI document: every response schema strict (required fields, no others)."""

from __future__ import annotations

API_KEY_HEADER = "X-API-Key"
API_KEY_SCHEME = "ApiKeyAuth"


def _object(properties: dict, required: list | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required or list(properties),
            "additionalProperties": False}


def openapi_document(settings, api_keys_required: bool = False) -> dict:
    """Return the OpenAPI 3.0 document of the scorer, with the limits from ``serving`` settings.

    With ``api_keys_required`` the /v1 operations declare the API key header and their 401 response.
    """
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
                            "enum": ["unknown_user", "redis_unavailable", "over_budget", "no_model", None]},
        "feature_age_seconds": nullable_number,
        "stale": {"type": "boolean"},
    })
    error = _object({"error": _object({"code": {"type": "string"}, "message": {"type": "string"},
                                       "field": {"type": "string"}}, ["code", "message"])})
    errors = {status: {"description": description, "content": {"application/json": {"schema": error}}}
              for status, description in (
                  ("400", "invalid request: the error names the field and the rule"),
                  ("401", f"missing or unknown API key in the {API_KEY_HEADER} header"),
                  ("404", "no such route, as for a user_id that contains a slash"),
                  ("405", "the path does not support the request's method"),
                  ("413", f"request body larger than {settings.max_body_bytes} bytes"))}
    errors["405"]["headers"] = {"Allow": {"description": "the methods the path supports", "required": True,
                                          "schema": {"type": "string"}}}
    ranked = {"200": {"description": "ranked items (fallback says whether the model ranked them)",
                      "content": {"application/json": {"schema": ranking}}}}
    # The API key check runs before routing, so every /v1 operation can return 401 when keys are set.
    keyed = ("401",) if api_keys_required else ()
    security = {"security": [{API_KEY_SCHEME: []}]} if api_keys_required else {}

    def responses(success: dict, *statuses: str) -> dict:
        return {**success, **{status: errors[status] for status in statuses}}

    alive = {"200": {"description": "alive", "content": {"application/json": {
        "schema": _object({"status": {"type": "string"}})}}}}
    readiness = {status: {"description": description, "content": {"application/json": {"schema": _object({
        "ready": {"type": "boolean"}, "redis": {"type": "boolean"},
        "model": _object({"name": {"type": "string"}, "alias": {"type": "string"},
                          "version": nullable_string, "tracking_uri": {"type": "string"}}),
        "reasons": {"type": "array", "items": {"type": "string"}}})}}}
        for status, description in (("200", "ready"), ("503", "not ready, with the reasons"))}
    document = {
        "openapi": "3.0.3",
        "info": {"title": "streamrec scorer", "version": "1"},
        "paths": {
            "/v1/users/{user_id}/recommendations": {"get": {
                "summary": "Recommendations for a user from generated candidates",
                **security,
                "parameters": [
                    {"name": "user_id", "in": "path", "required": True, "schema": identifier},
                    {"name": "k", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": settings.max_k, "default": 10}}],
                "responses": responses(ranked, "400", *keyed, "404", "405")}},
            "/v1/rank": {"post": {
                "summary": "Rank the caller's candidates for a user",
                **security,
                "requestBody": {
                    "required": True,
                    # JSON Schema cannot bound the size of the whole body, so the byte limit is stated here.
                    # The default limit (256 KiB) holds max_candidates ids of the longest length; a smaller
                    # configured limit can refuse a body that fits the schema.
                    "description": (f"at most {settings.max_body_bytes} bytes; a larger body gets 413, "
                                    "even when it fits the schema"),
                    "content": {"application/json": {"schema": _object({
                        "user_id": identifier,
                        "candidates": {"type": "array", "items": identifier, "minItems": 1,
                                       "maxItems": settings.max_candidates},
                        "k": {"type": "integer", "minimum": 1, "maximum": settings.max_k}},
                        ["user_id", "candidates"])}}},
                "responses": responses(ranked, "400", *keyed, "405", "413")}},
            "/healthz": {"get": {"summary": "Liveness", "responses": responses(alive, "405")}},
            "/readyz": {"get": {"summary": "Readiness: Redis reachable and a model loaded",
                                "responses": responses(readiness, "405")}},
        },
    }
    if api_keys_required:
        document["components"] = {"securitySchemes": {API_KEY_SCHEME: {
            "type": "apiKey", "in": "header", "name": API_KEY_HEADER}}}
    return document
