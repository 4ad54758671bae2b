"""The HTTP and WebSocket app of `voxtral-run serve`, over any StreamHub.

/v1/realtime (WebSocket, vLLM's dialect or OpenAI's), POST /v1/audio/transcriptions, GET /v1/models, /health
(200 only while the hub takes streams), /metrics (Prometheus) and a page at / that transcribes the browser's
microphone.
"""

from __future__ import annotations

import time
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from voxtral_run.runner.serve.hub import StreamHub
from voxtral_run.runner.serve.metrics import ServeMetrics
from voxtral_run.runner.serve.protocol import ModelCard, ModelList
from voxtral_run.runner.serve.realtime import RealtimeSession
from voxtral_run.runner.serve.settings import ServeSettings
from voxtral_run.runner.serve.upload import transcriptions

STATIC_DIR = Path(__file__).resolve().parent / "static"
# uvicorn reads WebSocket messages up to this many times the app's own limit, so that a message somewhat over
# it gets the app's error event and the session goes on; a larger one closes its connection (1009, too big).
WS_READ_FACTOR = 4


def create_app(hub: StreamHub, settings: ServeSettings | None = None) -> Starlette:
    """The app serving `hub`; `app.state.metrics` holds its figures."""
    settings = settings or ServeSettings()
    metrics = ServeMetrics(hub)
    started = int(time.time())

    async def realtime(websocket: WebSocket) -> None:
        await RealtimeSession(websocket, hub, settings, metrics).run()

    async def audio_transcriptions(request: Request) -> Response:
        return await transcriptions(request, hub, settings, metrics)

    async def models(request: Request) -> Response:
        return JSONResponse(ModelList(data=[ModelCard(id=settings.model_name, created=started)]).model_dump())

    async def health(request: Request) -> Response:
        body = {"status": "ready" if hub.ready else "not ready", "streams": hub.active, "capacity": hub.capacity}
        return JSONResponse(body, status_code=200 if hub.ready else 503)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/health", health),
            Route("/metrics", prometheus),
            Route("/v1/models", models),
            Route("/v1/audio/transcriptions", audio_transcriptions, methods=["POST"]),
            WebSocketRoute("/v1/realtime", realtime),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
    )
    app.state.metrics = metrics
    return app


def uvicorn_config(app: Starlette, settings: ServeSettings, *, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings for the app: its own message limit, pings that find dead peers, quiet access logs."""
    return uvicorn.Config(
        app, host=host, port=port, ws_max_size=WS_READ_FACTOR * settings.max_message_bytes, ws_ping_interval=20.0,
        ws_ping_timeout=20.0, lifespan="off", access_log=False, log_level="warning",
    )  # fmt: skip
