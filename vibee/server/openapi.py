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


def install_openapi(app: FastAPI) -> None:
    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _schema(app)
        return app.openapi_schema

    app.openapi = schema


def _schema(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for fastapi_own in ("HTTPValidationError", "ValidationError"):
        components.pop(fastapi_own, None)
    components["ErrorResponse"] = ERROR_RESPONSE_SCHEMA
    for ops in doc["paths"].values():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = _json("The request is malformed or asks for what the server cannot do", _ERROR)
    paths = doc["paths"]
    if "/health" in paths:
        paths["/health"]["get"]["responses"] = {
            "200": _json("The engine runs", {"type": "object", "properties": {"status": {"const": "ok"}}}),
            "503": _json("The engine is not running", _ERROR)}
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"] = {
            "200": {"description": "Prometheus text exposition (vibee: metrics named like vLLM's)",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}
    return doc
