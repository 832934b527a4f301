"""POST /admin/reload: serve another checkpoint (or the configured one again) without a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request

from service.dependencies import get_engine, require_admin_key_or_loopback
from service.engine import Engine
from service.schemas import (ADMIN_FORBIDDEN, BODY_TOO_LARGE, RELOAD_FAILED, UNAUTHORIZED, ReloadRequest,
                             ReloadResponse)

router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin_key_or_loopback)],
                   responses={**UNAUTHORIZED, **ADMIN_FORBIDDEN, **RELOAD_FAILED, **BODY_TOO_LARGE})


@router.post("/admin/reload", summary="Load a checkpoint and swap it in")
async def reload(request: Request, engine: Annotated[Engine, Depends(get_engine)],
                 body: Annotated[ReloadRequest | None, Body()] = None) -> ReloadResponse:
    """Loads the checkpoint (default: CLLM4REC_CHECKPOINT again) and scores one prompt with it while
    the current model keeps serving, then swaps it in between two batches: no request fails, each
    is answered by the model it started with. On failure (400) the current model stays. SIGHUP to
    `cllm4rec serve` does the same for the configured checkpoint."""
    checkpoint = (body.checkpoint if body is not None else None) or request.app.state.settings.checkpoint
    return await engine.reload(Path(checkpoint))
