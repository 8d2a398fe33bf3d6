"""vibee's OpenAI-compatible HTTP server (FastAPI): `create_app(engine, api_key=None)`."""

from vibee.server.app import create_app
from vibee.server.metrics import PrometheusObserver

__all__ = ["create_app", "PrometheusObserver"]
