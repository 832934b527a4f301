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

Around the routes: the middleware (service/middleware.py) and the error answers (service/errors.py);
the API key is checked by the routes' dependencies (service/dependencies.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from model.config import ConfigError
from service.engine import Engine
from service.served_model import ServedModel, model_device
from service.errors import install_error_handlers
from service.heap import freeze_long_lived
from service.histories import open_history_store
from service.middleware import BodySizeLimit, RequestMetrics
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
        freeze_long_lived()
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
    install_error_handlers(app)
    models = request_models(settings)
    app.include_router(recommend.create_router(models))
    app.include_router(interactions.create_router(models))
    app.include_router(histories.create_router(models))
    app.include_router(items.create_router(models))
    app.include_router(admin.router)
    app.include_router(health.router)
    return app
