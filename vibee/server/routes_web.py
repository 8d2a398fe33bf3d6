"""The page at `/`: a playground and a live dashboard (vibee/server/web/, plain HTML, CSS and
JavaScript: nothing to build). It calls the API like any client, with the key typed into it."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from vibee.server.errors import APIError

router = APIRouter(include_in_schema=False)

WEB_DIR = Path(__file__).parent / "web"
FILES = {"app.js": "text/javascript", "style.css": "text/css"}


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


@router.get("/web/{name}")
async def asset(name: str) -> FileResponse:
    if name not in FILES:  # only the page's own files, never a path
        raise APIError(404, f"There is no /web/{name}.", code="not_found")
    return FileResponse(WEB_DIR / name, media_type=FILES[name])
