"""POST /recommend, GET /recommend/{user_id}, POST /recommend/batch."""

# No `from __future__ import annotations`: the body and parameter types are this app's own
# (schemas.request_models), and FastAPI reads them from the annotations when the routes are made.

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from service.dependencies import get_engine, require_key_for_reads
from service.engine import Engine
from service.schemas import (BODY_TOO_LARGE, BODY_UNREADABLE, DEFAULT_K, RECOMMEND_ERRORS, UNAUTHORIZED,
                             BatchRecommendResponse, ExcludeSeen, RecommendResponse, RequestModels)

EngineDep = Annotated[Engine, Depends(get_engine)]


def create_router(models: RequestModels) -> APIRouter:
    router = APIRouter(tags=["recommend"], dependencies=[Depends(require_key_for_reads)],
                       responses={**UNAUTHORIZED, **RECOMMEND_ERRORS})
    RecommendRequest, BatchRecommendRequest = models.recommend, models.batch
    body_errors = {**BODY_TOO_LARGE, **BODY_UNREADABLE}

    @router.post("/recommend", summary="Top-k items for one user", responses=body_errors)
    async def recommend(body: RecommendRequest, engine: EngineDep) -> RecommendResponse:
        """Scores every item with one forward pass of the model over the user's prompt (stored history,
        or `history` when given) and returns the best `k`, the user's history excluded unless
        `exclude_seen` is false."""
        return (await engine.recommend([body]))[0]

    @router.get("/recommend/{user_id}", summary="Top-k items for one user (stored history)")
    async def recommend_get(user_id: Annotated[models.user_id_path, Path()], engine: EngineDep,
                            k: Annotated[models.k, Query()] = DEFAULT_K,
                            exclude_seen: Annotated[ExcludeSeen, Query()] = True) -> RecommendResponse:
        return (await engine.recommend([RecommendRequest(user_id=user_id, k=k, exclude_seen=exclude_seen)]))[0]

    @router.post("/recommend/batch", summary="Top-k items for many users at once", responses=body_errors)
    async def recommend_batch(body: BatchRecommendRequest, engine: EngineDep) -> BatchRecommendResponse:
        """Each request as for POST /recommend; the histories are read in one store round trip and the
        prompts share forward passes."""
        return BatchRecommendResponse(results=await engine.recommend(body.requests))

    return router
