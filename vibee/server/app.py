"""The OpenAI-compatible HTTP server: `create_app(engine, api_key=None) -> FastAPI`.

The engine is anything with the AsyncEngine interface (state.EngineClient). Routes live in one
file per group (routes_*.py) and read the engine through the app's ServerState.
"""

from __future__ import annotations

from fastapi import FastAPI

from vibee.runtime.jit_compiles import JitCompiles
from vibee.server import routes_completions, routes_info, routes_tokenize, routes_web
from vibee.server.auth import APIKeyMiddleware
from vibee.server.body_limit import BodyLimitMiddleware
from vibee.server.errors import install_error_handlers
from vibee.server.metrics import PrometheusObserver
from vibee.server.openapi import install_openapi
from vibee.server.state import EngineClient, ServerLimits, ServerState


def create_app(engine: EngineClient, *, api_key: str | None = None, limits: ServerLimits | None = None) -> FastAPI:
    """The OpenAI-compatible app around `engine`. With `api_key`, every endpoint but /health,
    /metrics and the docs needs `Authorization: Bearer <api_key>`; limits: what one request may
    ask (body size, completions), the defaults of ServerLimits when None."""
    state = ServerState.for_engine(engine, limits)
    engine.add_observer(PrometheusObserver(state.registry, model_name=state.model_name,
                                           compiles=JitCompiles.process_wide()))

    app = FastAPI(title="vibee", summary="OpenAI-compatible LLM inference server")
    app.state.server = state
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.limits.max_request_bytes)
    for routes in (routes_info, routes_tokenize, routes_completions, routes_web):
        app.include_router(routes.router)
    install_openapi(app, auth=bool(api_key))
    return app
