"""/openapi.json as the server behaves: a bad request is a 400 with OpenAI's error body (FastAPI
would document its own 422), /health answers JSON or a 503 error, /metrics is Prometheus text."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
ERROR_RESPONSE_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}}}},
}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def install_openapi(app: FastAPI, *, auth: bool = False) -> None:
    """auth: the app wants an API key (401 documented where the key is asked for)."""
    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _schema(app, auth)
        return app.openapi_schema

    app.openapi = schema


def _non_empty(schema: dict[str, Any] | None) -> None:
    """A prompt needs a token: every list in it non-empty (checked in the handler, whose message
    says so; documented here). An empty string may still be a BOS token."""
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "array":
        schema["minItems"] = 1
        _non_empty(schema.get("items"))
    for option in schema.get("anyOf", ()):
        _non_empty(option)


def _schema(app: FastAPI, auth: bool) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for fastapi_own in ("HTTPValidationError", "ValidationError"):
        components.pop(fastapi_own, None)
    components["ErrorResponse"] = ERROR_RESPONSE_SCHEMA
    _non_empty(components.get("CompletionRequest", {}).get("properties", {}).get("prompt"))
    for ops in doc["paths"].values():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = _json("The request is malformed or asks for what the server cannot do", _ERROR)
    paths = doc["paths"]
    for path, ops in paths.items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            if path.startswith("/v1/models/") or method == "post":  # they name a model
                responses["404"] = _json("The request names a model this server does not serve", _ERROR)
            if method == "post":
                responses["413"] = _json("The body is larger than the server takes (--max-request-mb)", _ERROR)
            if path in GENERATION_PATHS:
                responses["503"] = _json("The server is shutting down or its engine stopped", _ERROR)
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok.setdefault("content", {})["text/event-stream"] = {"schema": {  # one server-sent event
                    "type": "object", "required": ["data"],
                    "description": "With stream true: each chunk as JSON in an event's data, then `[DONE]`",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}}
            if auth:
                responses["401"] = _json("The API key is missing or wrong", _ERROR)
    if "/health" in paths:
        paths["/health"]["get"]["responses"] = {
            "200": _json("The engine runs", {"type": "object", "properties": {"status": {"const": "ok"}}}),
            "503": _json("The engine is not running", _ERROR)}
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"] = {
            "200": {"description": "Prometheus text exposition (vibee: metrics named like vLLM's)",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}
    return doc
