"""GET /healthz (liveness), GET /readyz (readiness), GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.histories import HistoryStoreUnavailable
from service.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    """Touches neither the model nor the store, so a slow dependency never gets the pod restarted."""
    return Health()


@router.get("/readyz", summary="Readiness: send traffic here?", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "not ready; `detail` says why"}})
async def readyz(request: Request) -> JSONResponse:
    """200 once the model has scored its warm-up request, while its forward-pass worker runs, until
    shutdown begins. The history store's state is reported (`history_store`, and the metric
    cllm4rec_history_store_up) but does not make the replica unready: a Redis outage must not take
    every replica out of the Service while they can still answer requests that bring their own
    history, and the popularity fallback."""
    engine = request.app.state.engine
    shutting_down = request.app.state.shutting_down
    model_ready = engine is not None and engine.ready
    store_ready, detail = False, None
    if engine is not None:
        try:
            await engine.store.ping()
            store_ready = True
        except HistoryStoreUnavailable as e:
            detail = str(e)
    metrics.history_store_up.set(int(store_ready))
    if shutting_down:
        detail = "shutting down"
    elif engine is not None and engine.failure:
        detail = engine.failure
    elif not model_ready:
        detail = "the model is loading or warming up"
    ready = model_ready and not shutting_down
    body = Readiness(ready=ready, model=model_ready, history_store=store_ready, shutting_down=shutting_down,
                     precision=engine.model.precision.precision if engine is not None else None, detail=detail)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition format"}})
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
