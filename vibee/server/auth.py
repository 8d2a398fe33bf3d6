"""The optional API key: `Authorization: Bearer <key>` on every path but probes, metrics, docs and
the page (which asks for the key and sends it with its API calls)."""

from __future__ import annotations

import secrets

from fastapi.responses import JSONResponse

from vibee.server.errors import APIError

# Paths open without the key: probes and scrapers don't carry it.
OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect",
                        "/", "/web/app.js", "/web/style.css"})


class APIKeyMiddleware:
    """Plain ASGI, so it runs before body parsing (a bad key is a 401 even with a malformed body)
    and leaves streaming responses alone."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS:
            got = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    got = value.strip()
                    break
            if not secrets.compare_digest(got, self.expected):
                message = ("Missing API key: send it as 'Authorization: Bearer <key>'." if not got
                           else "Incorrect API key provided.")
                err = APIError(401, message, code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
