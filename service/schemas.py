"""Request and response bodies of the HTTP API, with the examples the OpenAPI schema shows.

User and item ids are opaque strings; UserId and ItemId are the one place their rules live.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_ID_LENGTH = 256
MAX_K = 1000
DEFAULT_K = 20
MAX_ITEMS_PER_REQUEST = 10_000  # history items in a request body, or events in one POST /interactions
MAX_USERS_PER_BATCH = 1000

UserId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH), Field(examples=["u42"])]
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH), Field(examples=["i7"])]
K = Annotated[int, Field(ge=1, le=MAX_K, description="how many items to return (fewer when the catalogue, less "
                         "the excluded items, is smaller)")]
ExcludeSeen = Annotated[bool, Field(description="leave out the items of the user's history")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelled field is a 422, not silently ignored


class RecommendRequest(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"user_id": "u42", "k": 10},
        {"user_id": "new-visitor-1", "k": 5, "history": ["i3", "i17"]},
    ]})

    user_id: UserId
    k: K = DEFAULT_K
    exclude_seen: ExcludeSeen = True
    history: list[ItemId] | None = Field(
        None, max_length=MAX_ITEMS_PER_REQUEST,
        description="item ids, oldest first, used instead of the stored history (the store is not read)")


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="the model's score (a logit; higher is better), or the item's training "
                         "interaction count on the most-popular fallback")
    title: str | None = Field(description="the item's title from the training data, if it had one")


class RecommendResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "user_id": "u42",
        "items": [{"item_id": "i17", "score": 3.21, "title": "premium tripod"},
                  {"item_id": "i3", "score": 2.87, "title": "classic camera bag"}],
        "model_version": "20250101-3f2a9c1d0b7e",
        "cold_start": False,
        "fallback": None,
        "unknown_item_ids": [],
    }]})

    user_id: str
    items: list[RecommendedItem] = Field(description="best first")
    model_version: str
    cold_start: bool = Field(description="the model has no token for this user: the prompt was the history alone, "
                             "or the fallback was used")
    fallback: Literal["most_popular"] | None = Field(
        description="set when the model could not be prompted (unknown user without a known history item)")
    unknown_item_ids: list[str] = Field(description="history item ids the model does not know; they were skipped")


class BatchRecommendRequest(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"requests": [{"user_id": "u1", "k": 5}, {"user_id": "u2", "k": 5, "exclude_seen": False}]},
    ]})

    requests: list[RecommendRequest] = Field(min_length=1, max_length=MAX_USERS_PER_BATCH)


class BatchRecommendResponse(BaseModel):
    results: list[RecommendResponse] = Field(description="one per request, in the same order")


class InteractionsRequest(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"user_id": "u42", "item_ids": ["i5", "i9"]}]})

    user_id: UserId
    item_ids: list[ItemId] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST,
                                   description="items the user interacted with, oldest first")


class InteractionsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"user_id": "u42", "history_length": 14, "unknown_item_ids": []}]})

    user_id: str
    history_length: int = Field(description="stored events of the user after this append (capped at "
                                "CLLM4REC_HISTORY_MAX_LENGTH)")
    unknown_item_ids: list[str] = Field(description="ids the served model does not know: stored, but skipped when "
                                        "prompting")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"ready": True, "model": True, "history_store": True, "shutting_down": False, "detail": None}]})

    ready: bool
    model: bool = Field(description="the model is loaded and has scored its warm-up request")
    history_store: bool = Field(description="the history store answered a ping just now")
    shutting_down: bool
    detail: str | None = Field(None, description="why not ready")


class ErrorResponse(BaseModel):
    detail: str


def error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


# Error answers of the routes that read the model or the store, for the OpenAPI schema.
STORE_UNAVAILABLE = {503: error("the history store (Redis) is unreachable, or the request queue is full "
                                "(then with Retry-After)")}
RECOMMEND_ERRORS = {**STORE_UNAVAILABLE, 504: error("no answer within CLLM4REC_REQUEST_TIMEOUT_S")}
