"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every error a client can cause comes back as one of these with a one-line message, never a
traceback or FastAPI's default 422 body, so OpenAI clients raise their usual exception types.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("vibee.server")

# OpenAI's `type` for each status we send.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # OpenAI sends this type with code invalid_api_key
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to hand to the client as-is."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | int | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def service_unavailable(message: str = "The engine is shutting down and takes no new requests.") -> APIError:
    return APIError(503, message, code="engine_closed")


def is_engine_closed(exc: BaseException) -> bool:
    """The engine's EngineClosed, matched by name so the server need not import the engine
    (and any engine, real or fake, can raise its own class)."""
    return any(cls.__name__ == "EngineClosed" for cls in type(exc).__mro__)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# pydantic names the branch of a union in an error's location; none of these is a field name.
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "function-after", "function-before"}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; pydantic's union branch names
    (like "str" or "list[int]") are dropped."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "(" in part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or None


def validation_error_to_api_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic/FastAPI validation error as a 400 naming the field."""
    if not errors:
        return bad_request("Invalid request.")
    err = errors[0]
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx") or {}
        detail = ctx.get("error")
        return bad_request(f"The request body is not valid JSON{': ' + str(detail) if detail else ''}.")
    loc = tuple(err.get("loc") or ())
    param = _loc_to_param(loc)
    msg = one_line(err.get("msg", "invalid value"))
    if err.get("type") == "missing" and param is None:
        return bad_request("The request body is missing: send a JSON object.")
    if err.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    if param is None:
        # The body itself has the wrong shape (not a JSON object, or empty).
        if err.get("type") == "model_attributes_type" or "dict" in msg or "object" in msg:
            return bad_request("The request body must be a JSON object.")
        return bad_request(f"Invalid request body: {msg}.")
    if err.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}.", param=param)
    # A union field fails once per accepted type: say all of them.
    msgs = [one_line(e.get("msg", "")) for e in errors if _loc_to_param(tuple(e.get("loc") or ())) == param]
    if len(msgs) > 1:
        msg = " or ".join(dict.fromkeys(m.removeprefix("Input should be ") for m in msgs))
        msg = "Input should be " + msg
    return bad_request(f"Invalid value for '{param}': {msg}.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error_to_api_error(list(exc.errors()))
        content_type = request.headers.get("content-type", "")
        if err.param is None and "json" not in content_type:
            got = f"got {content_type!r}" if content_type else "got none"
            err = bad_request(f"Send the request body as JSON with 'Content-Type: application/json' ({got}).")
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else one_line(str(exc.detail))
        if exc.status_code == 404 and message == "Not Found":
            message = f"No such endpoint: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        err = APIError(exc.status_code, message)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_engine_closed(exc):
            err = service_unavailable()
        else:
            # A server bug: log the traceback here, hand the client one line.
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            err = APIError(500, f"Internal server error: {type(exc).__name__}: {one_line(str(exc))}")
        return JSONResponse(err.body(), status_code=err.status)
