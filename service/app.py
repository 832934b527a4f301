"""The FastAPI app: create_app(settings) and its lifespan.

Start-up, before the first request is accepted:
  1. load the checkpoint (CUDA in half precision when available, else CPU float32)
  2. open the history store (Redis, or in-process when no URL is set); seed it with the
     checkpoint's training histories unless this checkpoint already did (a background task retries
     while Redis is down and re-seeds a Redis that lost its data)
  3. start the batcher and score one warm-up request: from then on /readyz can answer 200
Shutdown: begin_shutdown (called by `cllm4rec serve` on SIGTERM) turns /readyz to 503 at once;
uvicorn stops accepting and lets in-flight requests finish; then the batcher and store close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import torch
from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from model.checkpoint import Checkpoint, load_recommender
from model.train import ConfigError
from service import metrics
from service.batcher import Overloaded
from service.engine import Engine, RequestTimeout
from service.histories import HistoryStore, HistoryStoreUnavailable, checkpoint_histories, open_history_store
from service.routes import health, interactions, recommend
from service.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """Recommendations from a CLLM4Rec checkpoint: a frozen causal LM with one token per user and per
item. One forward pass of the prompt `<user> has interacted with <items>, <user> will interact with` scores
every item; the best k are returned, the user's history excluded. Histories live in Redis (or in the
process) and grow with POST /interactions, without retraining. See docs/serving.md."""


def package_version() -> str:
    try:
        return version("cllm4rec")
    except PackageNotFoundError:
        return "unknown"


def model_device(setting: str) -> torch.device | None:
    """None: load_recommender's default (CUDA when available)."""
    if setting == "auto":
        return None
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CLLM4REC_DEVICE=cuda: no CUDA device is available")
    return torch.device(setting)


# --- histories -----------------------------------------------------------------------------------

async def seed_histories(store: HistoryStore, checkpoint: Checkpoint) -> None:
    """Copy the training histories in, unless this checkpoint's are there already. Never raises for
    an unreachable store: serving goes on, and the next attempt comes from keep_seeded."""
    try:
        if await store.seeded_version() == checkpoint.model_version:
            return
        started = time.perf_counter()
        written = await store.seed(checkpoint_histories(checkpoint), checkpoint.model_version)
        log.info("history store seeded from %s: %d users written (users with a history kept theirs) in %.1f s",
                 checkpoint.path, written, time.perf_counter() - started)
    except HistoryStoreUnavailable as e:
        log.warning("history store not seeded yet (will retry): %s", e)


async def keep_seeded(store: HistoryStore, checkpoint: Checkpoint, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await seed_histories(store, checkpoint)


# --- the app ---------------------------------------------------------------------------------------

@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    started = time.perf_counter()
    recommender = await asyncio.to_thread(load_recommender, settings.checkpoint, model_device(settings.device))
    checkpoint = recommender.checkpoint
    backbone = checkpoint.meta["backbone"]
    metrics.model_info.info({"model_version": checkpoint.model_version, "backbone": backbone["name"],
                             "backbone_layers": str(backbone["layers"]), "n_items": str(checkpoint.meta["n_items"]),
                             "n_users": str(checkpoint.meta["n_users"])})
    store = open_history_store(settings.redis_url, settings.redis_key_prefix, settings.history_max_length,
                               settings.redis_timeout_s)
    engine = Engine(recommender, store, settings)
    engine.start()
    seeding = None
    try:
        if settings.seed_histories:
            await seed_histories(store, checkpoint)
            seeding = asyncio.create_task(keep_seeded(store, checkpoint, settings.seed_check_interval_s))
        await engine.warm_up()
        app.state.engine = engine
        log.info("serving %s (model %s, %s with %d layers, %d items) on %s, %s threads, history store: %s; "
                 "ready in %.1f s", checkpoint.path, checkpoint.model_version, backbone["name"], backbone["layers"],
                 checkpoint.meta["n_items"], recommender.device, settings.resolved_torch_threads(),
                 "Redis" if settings.redis_url else "in-process", time.perf_counter() - started)
        yield
    finally:
        begin_shutdown(app)
        if seeding is not None:
            seeding.cancel()
        await engine.close()


def begin_shutdown(app: FastAPI) -> None:
    """From now on /readyz answers 503, so load balancers stop sending traffic while requests drain."""
    app.state.shutting_down = True


class RequestMetrics:
    """ASGI middleware: latency by route template, method and status; requests in flight."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_recording_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.requests_in_flight.inc()
        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            metrics.requests_in_flight.dec()
            route = scope.get("route")  # set by the router on a match: the template, never the user id
            metrics.http_request_duration.labels(route.path if route else "unmatched", scope["method"],
                                                 str(status)).observe(time.perf_counter() - started)


def error_response(status: int, kind: str, error: Exception, retry_after: bool = False) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    headers = {"Retry-After": "1"} if retry_after else None
    return JSONResponse({"detail": str(error)}, status_code=status, headers=headers)


async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    metrics.errors.labels("validation").inc()
    return await request_validation_exception_handler(request, error)


async def on_overloaded(request: Request, error: Overloaded) -> JSONResponse:
    return error_response(503, "overloaded", error, retry_after=True)


async def on_store_unavailable(request: Request, error: HistoryStoreUnavailable) -> JSONResponse:
    return error_response(503, "history_store", error, retry_after=True)


async def on_timeout(request: Request, error: RequestTimeout) -> JSONResponse:
    return error_response(504, "timeout", error)


async def on_internal_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(500, "internal", Exception("internal error (logged by the server)"))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.checkpoint is None:
        raise ConfigError("no checkpoint to serve: pass --checkpoint or set CLLM4REC_CHECKPOINT")
    model_device(settings.device)  # fail now, not in the lifespan, on a device that is not there
    app = FastAPI(title="cllm4rec", version=package_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = None
    app.state.shutting_down = False
    app.add_middleware(RequestMetrics)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Overloaded, on_overloaded)
    app.add_exception_handler(HistoryStoreUnavailable, on_store_unavailable)
    app.add_exception_handler(RequestTimeout, on_timeout)
    app.add_exception_handler(Exception, on_internal_error)
    for routes in (recommend, interactions, health):
        app.include_router(routes.router)
    return app
