"""What the server serves and how it is doing: /health, /metrics, /v1/models, /v1/inference/info
and /v1/inference/stats."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vibee.server.errors import APIError
from vibee.server.protocol import ModelCard, ModelList
from vibee.server.state import ServerState, State

router = APIRouter()


@router.get("/health")
async def health(state: State) -> Response:
    if state.is_alive():
        return JSONResponse({"status": "ok"})
    err = APIError(503, "The engine is not running.", code="engine_dead")
    return JSONResponse(err.body(), status_code=503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_name, created=state.created, root=state.model_name,
                     max_model_len=state.max_model_len)


@router.get("/v1/models")
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_model_card(state)])


@router.get("/v1/models/{model:path}")
async def get_model(model: str, state: State) -> ModelCard:
    state.check_model(model)
    return _model_card(state)


@router.get("/v1/inference/info")
async def inference_info(state: State) -> JSONResponse:
    """The engine's account of itself: the served model under "model" (its shape, dtype, context,
    the quantization applied and its KV blocks), then each optimization as specs and flags set it."""
    return JSONResponse(await state.ask("info"))


@router.get("/v1/inference/stats")
async def inference_stats(state: State) -> JSONResponse:
    return JSONResponse(await state.ask("stats"))
