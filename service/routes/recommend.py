"""POST /recommend, GET /recommend/{user_id}, POST /recommend/batch.

The engine returns each answer as JSON already (service.served_model.ServedModel.response_json), built off
the event loop when large, so that a batch of k = 1000 answers does not hold the loop (and the probes).
"""

# No `from __future__ import annotations`: the body and parameter types are this app's own
# (schemas.request_models), and FastAPI reads them from the annotations when the routes are made.

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from service.dependencies import get_engine, require_read_key
from service.engine import Engine
from service.schemas import (BODY_TOO_LARGE, BODY_UNREADABLE, DEFAULT_K, RECOMMEND_ERRORS, UNAUTHORIZED,
                             BatchRecommendResponse, ExcludeSeen, RecommendResponse, RequestModels)

EngineDep = Annotated[Engine, Depends(get_engine)]


def json_response(bodies: list[bytes], batch: bool = False) -> Response:
    """One answer's JSON, or a batch's {"results": [...]}: the engine encodes each answer (a join of
    fragments encoded at load, off the event loop when large), so this is one join."""
    return Response(bodies[0] if not batch else b'{"results":[' + b",".join(bodies) + b"]}",
                    media_type="application/json")


def create_router(models: RequestModels) -> APIRouter:
    router = APIRouter(tags=["recommend"], dependencies=[Depends(require_read_key)],
                       responses={**UNAUTHORIZED, **RECOMMEND_ERRORS})
    RecommendRequest, BatchRecommendRequest = models.recommend, models.batch
    body_errors = {**BODY_TOO_LARGE, **BODY_UNREADABLE}

    @router.post("/recommend", summary="Top-k items for one user", responses=body_errors,
                 response_model=RecommendResponse)
    async def recommend(body: RecommendRequest, engine: EngineDep) -> Response:
        """Scores every item with one forward pass of the model over the user's prompt (stored history,
        or `history` when given) and returns the best `k`, the user's history excluded unless
        `exclude_seen` is false."""
        return json_response(await engine.recommend([body]))

    @router.get("/recommend/{user_id}", summary="Top-k items for one user (stored history)",
                response_model=RecommendResponse)
    async def recommend_get(user_id: Annotated[models.user_id_path, Path()], engine: EngineDep,
                            k: Annotated[models.k, Query()] = DEFAULT_K,
                            exclude_seen: Annotated[ExcludeSeen, Query()] = True) -> Response:
        return json_response(await engine.recommend([RecommendRequest(user_id=user_id, k=k,
                                                                            exclude_seen=exclude_seen)]))

    @router.post("/recommend/batch", summary="Top-k items for many users at once", responses=body_errors,
                 response_model=BatchRecommendResponse)
    async def recommend_batch(body: BatchRecommendRequest, engine: EngineDep) -> Response:
        """Each request as for POST /recommend; the histories are read in one store round trip and the
        prompts share forward passes."""
        return json_response(await engine.recommend(body.requests), batch=True)

    return router
