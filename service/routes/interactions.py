"""POST /interactions: online events, visible to the next recommendation (no retraining)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.dependencies import get_engine
from service.engine import Engine
from service.schemas import STORE_UNAVAILABLE, InteractionsRequest, InteractionsResponse

router = APIRouter(tags=["interactions"], responses=STORE_UNAVAILABLE)


@router.post("/interactions", summary="Append a user's interactions to their history")
async def add_interactions(body: InteractionsRequest,
                           engine: Annotated[Engine, Depends(get_engine)]) -> InteractionsResponse:
    """Appends the events (oldest first) to the user's stored history, which keeps the most recent
    CLLM4REC_HISTORY_MAX_LENGTH. The next recommendation for the user reflects them: a known user's
    prompt grows, and an unknown user gets history-only prompts from now on."""
    return await engine.add_interactions(body.user_id, body.item_ids)
