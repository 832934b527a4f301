"""POST /interactions: online events, visible to the next recommendation (no retraining)."""

# No `from __future__ import annotations`: the body type is this app's own (schemas.request_models).

from typing import Annotated

from fastapi import APIRouter, Depends

from service.dependencies import get_engine, require_write_key
from service.engine import Engine
from service.schemas import (BODY_TOO_LARGE, BODY_UNREADABLE, STORE_UNAVAILABLE, UNAUTHORIZED, InteractionsResponse,
                             RequestModels)


def create_router(models: RequestModels) -> APIRouter:
    router = APIRouter(tags=["interactions"], dependencies=[Depends(require_write_key)],
                       responses={**UNAUTHORIZED, **BODY_TOO_LARGE, **BODY_UNREADABLE, **STORE_UNAVAILABLE})
    InteractionsRequest = models.interactions

    @router.post("/interactions", summary="Append a user's interactions to their history")
    async def add_interactions(body: InteractionsRequest,
                               engine: Annotated[Engine, Depends(get_engine)]) -> InteractionsResponse:
        """Appends the events (oldest first) to the user's stored history, which keeps the most recent
        CLLM4REC_HISTORY_MAX_LENGTH. A 200 means the store has the events; on any store failure or
        timeout the answer is 503 and the client should retry (at-least-once: after a timeout the
        events may have been stored all the same). The next recommendation for the user reflects
        them: a known user's prompt grows, and an unknown user gets history-only prompts from now on."""
        return await engine.add_interactions(body.user_id, body.item_ids)

    return router
