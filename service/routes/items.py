"""POST /items: an item added from its text; GET, PATCH and DELETE /items/{item_id}: an item of the
catalogue, and retiring it; GET /items/{item_id}/similar: the items most likely after it."""

# No `from __future__ import annotations`: the path parameter type is this app's own (schemas.request_models).

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from service.dependencies import get_engine, require_read_key, require_write_key
from service.engine import Engine
from service.catalogue import LiveItem
from service.schemas import (BODY_TOO_LARGE, DEFAULT_K, ITEM_EXISTS, RECOMMEND_ERRORS, STORE_UNAVAILABLE,
                             UNAUTHORIZED, UNKNOWN_ITEM, ItemAvailability, ItemResponse, RecommendResponse,
                             RequestModels)

EngineDep = Annotated[Engine, Depends(get_engine)]


def create_router(models: RequestModels) -> APIRouter:
    router = APIRouter(tags=["catalogue"], responses={**UNAUTHORIZED, **UNKNOWN_ITEM})
    ItemId = Annotated[models.item_id_path, Path()]
    LiveItemRequest = models.live_item

    @router.post("/items", summary="Add an item from its text", status_code=201,
                 responses={**ITEM_EXISTS, **STORE_UNAVAILABLE, **BODY_TOO_LARGE},
                 dependencies=[Depends(require_write_key)])
    async def add_item(body: LiveItemRequest, engine: EngineDep) -> ItemResponse:
        """The item gets a token placed by its title with the function training uses to start items
        from their titles, and head rows placed by the similarity of its title and description to the
        catalogue's texts (docs/serving.md); the next /recommend can return it, on every replica sharing
        the Redis, without retraining or reloading. It is kept in Redis (or the process) and added again
        to a reloaded or restarted model. The first item added to a loaded model waits for a few seconds
        of fitting."""
        return await engine.add_item(LiveItem(body.item_id, body.title, body.description))

    @router.get("/items/{item_id}", summary="An item of the catalogue", dependencies=[Depends(require_read_key)])
    async def get_item(item_id: ItemId, engine: EngineDep) -> ItemResponse:
        return await engine.item(item_id)

    @router.get("/items/{item_id}/similar", summary="Items most likely after this one", responses=RECOMMEND_ERRORS,
                dependencies=[Depends(require_read_key)], response_model=RecommendResponse)
    async def similar(item_id: ItemId, engine: EngineDep,
                      k: Annotated[models.k, Query()] = DEFAULT_K) -> Response:
        """One forward pass of the trainer's history-only prompt holding this item alone, scored by the
        same item head as /recommend; the item itself and retired items are left out. `user_id` in
        the answer is the item's id."""
        return Response(await engine.similar_items(item_id, k), media_type="application/json")

    @router.patch("/items/{item_id}", summary="Retire or restore an item", responses={**STORE_UNAVAILABLE,
                                                                                     **BODY_TOO_LARGE},
                  dependencies=[Depends(require_write_key)])
    async def patch_item(item_id: ItemId, body: ItemAvailability, engine: EngineDep) -> ItemResponse:
        """`{"available": false}` leaves the item out of every recommendation (single, batch, the
        fallback) from the next request on, on every replica sharing the Redis; `true` restores it."""
        return await engine.set_item_available(item_id, body.available)

    @router.delete("/items/{item_id}", summary="Retire an item", responses=STORE_UNAVAILABLE,
                   dependencies=[Depends(require_write_key)])
    async def retire_item(item_id: ItemId, engine: EngineDep) -> ItemResponse:
        """The same as PATCH with `{"available": false}`: the model keeps the item's token (a
        restore brings it back as it was); it is no longer recommended."""
        return await engine.set_item_available(item_id, False)

    return router
