"""POST /recommend, GET /recommend/{user_id}, POST /recommend/batch."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from service.dependencies import get_engine
from service.engine import Engine
from service.schemas import (DEFAULT_K, K, MAX_ID_LENGTH, RECOMMEND_ERRORS, BatchRecommendRequest,
                             BatchRecommendResponse, ExcludeSeen, RecommendRequest, RecommendResponse)

router = APIRouter(tags=["recommend"], responses=RECOMMEND_ERRORS)
EngineDep = Annotated[Engine, Depends(get_engine)]


@router.post("/recommend", summary="Top-k items for one user")
async def recommend(body: RecommendRequest, engine: EngineDep) -> RecommendResponse:
    """Scores every item with one forward pass of the model over the user's prompt (stored history,
    or `history` when given) and returns the best `k`, the user's history excluded unless
    `exclude_seen` is false."""
    return (await engine.recommend([body]))[0]


@router.get("/recommend/{user_id}", summary="Top-k items for one user (stored history)")
async def recommend_get(user_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, examples=["u42"])],
                        engine: EngineDep, k: Annotated[K, Query()] = DEFAULT_K,
                        exclude_seen: Annotated[ExcludeSeen, Query()] = True) -> RecommendResponse:
    return (await engine.recommend([RecommendRequest(user_id=user_id, k=k, exclude_seen=exclude_seen)]))[0]


@router.post("/recommend/batch", summary="Top-k items for many users at once")
async def recommend_batch(body: BatchRecommendRequest, engine: EngineDep) -> BatchRecommendResponse:
    """Each request as for POST /recommend; the histories are read in one store round trip and the
    prompts share forward passes."""
    return BatchRecommendResponse(results=await engine.recommend(body.requests))
