"""A limit on request bodies: a declared Content-Length over it is a 413 before anything is read,
and a body sent in chunks is cut off once it passes it."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException

from vibee.server.errors import APIError

Scope, Message = dict[str, Any], dict[str, Any]


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server takes ({limit} bytes; "
                         "vibee serve --max-request-mb).", code="request_too_large")


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _respond(send, too_large(self.max_bytes))
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # FastAPI passes an HTTPException from the body read through as is
                raise HTTPException(413, detail=too_large(self.max_bytes).message)
            return message

        await self.app(scope, counted, send)


async def _respond(send: Any, err: APIError) -> None:
    import json

    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
