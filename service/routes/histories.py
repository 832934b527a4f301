"""GET and DELETE /users/{user_id}/history: what is stored about a user, and its erasure."""

# No `from __future__ import annotations`: the path parameter type is this app's own (schemas.request_models).

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from service.dependencies import get_engine, require_read_key, require_write_key
from service.engine import Engine
from service.schemas import STORE_UNAVAILABLE, UNAUTHORIZED, ErasureResponse, HistoryResponse, RequestModels

EngineDep = Annotated[Engine, Depends(get_engine)]


def create_router(models: RequestModels) -> APIRouter:
    router = APIRouter(tags=["histories"], responses={**UNAUTHORIZED, **STORE_UNAVAILABLE})
    UserId = Annotated[models.user_id_path, Path()]

    @router.get("/users/{user_id}/history", summary="A user's stored history",
                dependencies=[Depends(require_read_key)])
    async def get_history(user_id: UserId, engine: EngineDep) -> HistoryResponse:
        """The item ids stored for the user, oldest first (newest last): the training history the
        server seeded, then the events of POST /interactions, capped at CLLM4REC_HISTORY_MAX_LENGTH."""
        return await engine.history(user_id)

    @router.delete("/users/{user_id}/history", summary="Erase a user's stored history",
                   dependencies=[Depends(require_write_key)])
    async def erase_history(user_id: UserId, engine: EngineDep) -> ErasureResponse:
        """Deletes the stored history: the next recommendation finds none (the user's own token, if the
        model has one, stays until the next training run). Seeding never writes the user's training
        history back. New events start a new history."""
        return await engine.erase_history(user_id)

    return router
