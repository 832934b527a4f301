"""The FastAPI app: create_app(settings) and its lifespan.

Start-up, before the first request is accepted:
  1. load the checkpoint (CUDA with bfloat16 compute when available, else CPU float32), unless the
     caller loaded it already (`cllm4rec serve` does, so a bad checkpoint is one line before
     anything listens)
  2. open the history store (Redis, or in-process when no URL is set); merge the checkpoint's
     training histories in unless this model version already did (a background task retries while
     Redis is down and re-seeds a Redis that lost its data)
  3. start the batcher and score one warm-up request: from then on /readyz answers 200 while the
     batcher runs (a dead batcher calls app.state.on_fatal: `cllm4rec serve` then exits 1)
Shutdown: begin_shutdown (called by `cllm4rec serve` on SIGTERM) turns /readyz to 503 at once;
uvicorn stops accepting and lets in-flight requests finish; then the batcher and store close.

Around the routes: RequestMetrics (latency, in flight) outside BodySizeLimit (413 before any
parsing); the API key is checked by the routes' dependencies (service/dependencies.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from model.config import ConfigError
from service import metrics
from service.batcher import Overloaded
from service.dependencies import Forbidden, Unauthorized
from service.engine import (Engine, ItemExists, ReloadFailed, RequestTimeout, ServedModel, UnknownItem,
                            model_device)
from service.histories import HistoryStoreUnavailable, open_history_store
from service.routes import admin, health, histories, interactions, items, recommend
from service.schemas import request_models
from service.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """Recommendations from a CLLM4Rec checkpoint: a frozen causal LM with one token per user and per
item. One forward pass of the prompt `<user> has interacted with <items>, <user> will interact with` scores
every item; the best k are returned, the user's history excluded. Histories live in Redis (or in the
process) and grow with POST /interactions, without retraining; GET and DELETE /users/{user_id}/history show and
erase one. With CLLM4REC_API_KEY set, every endpoint but the probes and /metrics needs the key (`Authorization:
Bearer KEY` or `X-API-Key: KEY`); scoped read, write and admin keys can stand in for it. See docs/serving.md."""


def package_version() -> str:
    try:
        return version("cllm4rec")
    except PackageNotFoundError:
        return "unknown"


async def keep_seeded(engine: Engine, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await engine.seed_histories()


# --- the app ---------------------------------------------------------------------------------------

@asynccontextmanager
async def lifespan(app: FastAPI):
    # No local variable here may hold the model: this frame lives as long as the server, and a
    # reload must be able to free the model it replaces.
    settings: Settings = app.state.settings
    started = time.perf_counter()
    store = open_history_store(settings.redis_url, settings.redis_key_prefix, settings.history_max_length,
                               settings.redis_timeout_s, settings.history_ttl_s)
    engine = Engine(app.state.preloaded or await asyncio.to_thread(ServedModel.load, settings.checkpoint,
                                                                   settings), store, settings)
    app.state.preloaded = None
    engine.on_fatal = app.state.on_fatal
    engine.start()
    seeding = None
    try:
        await engine.seed_histories()
        if settings.seed_histories:
            seeding = asyncio.create_task(keep_seeded(engine, settings.seed_check_interval_s))
        await engine.warm_up()
        app.state.engine = engine
        log.info("%s; ready in %.1f s", describe(engine), time.perf_counter() - started)
        yield
    finally:
        begin_shutdown(app)
        if seeding is not None:
            seeding.cancel()
        await engine.close()


def describe(engine: Engine) -> str:
    """The start-up log line: what is served, where, and how access is set."""
    settings, recommender = engine.settings, engine.model.recommender
    checkpoint, backbone = recommender.checkpoint, recommender.checkpoint.meta["backbone"]
    access = ", ".join(f"{scope}s {'need a key' if settings.scope_keys(scope) else 'open'}"
                       for scope in ("read", "write")) + \
        (", admin needs a key" if settings.scope_keys("admin") else ", admin from this host only")
    return (f"serving {checkpoint.path} (model {checkpoint.model_version}, {backbone['name']} with "
            f"{backbone['layers']} layers, {checkpoint.meta['n_items']} items) on {recommender.device}, "
            f"{settings.resolved_torch_threads()} threads, history store: "
            f"{'Redis' if settings.redis_url else 'in-process'}, access: {access}; "
            f"precision: {engine.model.precision.reason}")


def begin_shutdown(app: FastAPI) -> None:
    """From now on /readyz answers 503, so load balancers stop sending traffic while requests drain."""
    app.state.shutting_down = True


# The status recorded when the client leaves before it is answered (nginx's convention); never sent.
CLIENT_CLOSED_REQUEST = 499


class RequestMetrics:
    """ASGI middleware: latency by route template, method and status; requests in flight."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        answered = disconnected = False

        async def send_recording_status(message):
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            await send(message)

        async def receive_noting_disconnect():
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        metrics.requests_in_flight.inc()
        try:
            await self.app(scope, receive_noting_disconnect, send_recording_status)
        finally:
            metrics.requests_in_flight.dec()
            if disconnected and not answered:
                status = CLIENT_CLOSED_REQUEST  # the client left first (e.g. mid-body): not a server error
            route = scope.get("route")  # set by the router on a match: the template, never the user id
            metrics.http_request_duration.labels(route.path if route else "unmatched", scope["method"],
                                                 str(status)).observe(time.perf_counter() - started)


class BodySizeLimit:
    """ASGI middleware: a request body larger than max_bytes gets 413 before the app parses any of
    it: at once when Content-Length says so, else as soon as a streamed (chunked) body passes the
    limit. Bodies within it are read here and handed on, so no route reads an unbounded body."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was complete
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_sent = False

        async def replay():
            nonlocal body_sent
            if body_sent:
                return await receive()  # from now on: the disconnect, when it comes
            body_sent = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        response = error_response(413, "too_large", Exception(
            f"the request body is larger than {self.max_bytes} bytes (CLLM4REC_MAX_BODY_BYTES)"))
        # The rest of the body is never read, so the connection cannot carry another request.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def error_response(status: int, kind: str, error: Exception, retry_after: bool = False,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    headers = {**(headers or {}), **({"Retry-After": "1"} if retry_after else {})}
    return JSONResponse({"detail": str(error)}, status_code=status, headers=headers or None)


async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    metrics.errors.labels("validation").inc()
    return await request_validation_exception_handler(request, error)


async def on_unauthorized(request: Request, error: Unauthorized) -> JSONResponse:
    return error_response(401, "unauthorized", error, headers={"WWW-Authenticate": "Bearer"})


async def on_forbidden(request: Request, error: Forbidden) -> JSONResponse:
    return error_response(403, "forbidden", error)


async def on_reload_failed(request: Request, error: ReloadFailed) -> JSONResponse:
    return error_response(400, "reload_failed", error)


async def on_unknown_item(request: Request, error: UnknownItem) -> JSONResponse:
    return error_response(404, "unknown_item", error)


async def on_item_exists(request: Request, error: ItemExists) -> JSONResponse:
    return error_response(409, "item_exists", error)


async def on_overloaded(request: Request, error: Overloaded) -> JSONResponse:
    return error_response(503, "overloaded", error, retry_after=True)


async def on_store_unavailable(request: Request, error: HistoryStoreUnavailable) -> JSONResponse:
    return error_response(503, "history_store", error, retry_after=True)


async def on_timeout(request: Request, error: RequestTimeout) -> JSONResponse:
    return error_response(504, "timeout", error)


async def on_internal_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(500, "internal", Exception("internal error (logged by the server)"))


def create_app(settings: Settings | None = None, model: ServedModel | None = None) -> FastAPI:
    """The app for `settings`; `model` is the checkpoint already loaded (else the lifespan loads it)."""
    settings = settings or Settings()
    if settings.checkpoint is None:
        raise ConfigError("no checkpoint to serve: pass --checkpoint or set CLLM4REC_CHECKPOINT")
    model_device(settings.device)  # fail now, not in the lifespan, on a device that is not there
    app = FastAPI(title="cllm4rec", version=package_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.preloaded = model
    app.state.engine = None
    app.state.shutting_down = False
    app.state.on_fatal = None  # `cllm4rec serve` sets it: stop the process when the replica cannot serve
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics)  # added last: the outermost, so it also times 413s
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Unauthorized, on_unauthorized)
    app.add_exception_handler(Forbidden, on_forbidden)
    app.add_exception_handler(ReloadFailed, on_reload_failed)
    app.add_exception_handler(UnknownItem, on_unknown_item)
    app.add_exception_handler(ItemExists, on_item_exists)
    app.add_exception_handler(Overloaded, on_overloaded)
    app.add_exception_handler(HistoryStoreUnavailable, on_store_unavailable)
    app.add_exception_handler(RequestTimeout, on_timeout)
    app.add_exception_handler(Exception, on_internal_error)
    models = request_models(settings)
    app.include_router(recommend.create_router(models))
    app.include_router(interactions.create_router(models))
    app.include_router(histories.create_router(models))
    app.include_router(items.create_router(models))
    app.include_router(admin.router)
    app.include_router(health.router)
    return app
