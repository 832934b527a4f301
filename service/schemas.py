"""Request and response bodies of the HTTP API, with the examples the OpenAPI schema shows.

User and item ids are opaque strings; the id rule (ID_PATTERN, check_id) and the request models
are the one place their rules live. The request models are built per app by request_models(settings),
so the limits they enforce (CLLM4REC_MAX_*) are the ones the OpenAPI schema states.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from model.data import FORBIDDEN_ID_CHARACTERS, forbidden_id_character

if TYPE_CHECKING:
    from service.settings import Settings

DEFAULT_K = 20
MAX_TITLE_CHARACTERS = 1000
MAX_DESCRIPTION_CHARACTERS = 10_000

# The patterns the OpenAPI schema states. check_id also refuses lone UTF-16 surrogates (JSON can
# escape them, UTF-8 and so Redis keys cannot hold them); they are left out of the patterns because
# a JSON Schema regex works on UTF-16 code units, where every emoji is a surrogate pair.
ID_PATTERN = rf"^[^{FORBIDDEN_ID_CHARACTERS}]+$"
# In a URL path an id cannot hold "/" either (GET /recommend/{user_id}; such ids use POST /recommend).
PATH_ID_PATTERN = rf"^[^/{FORBIDDEN_ID_CHARACTERS}]+$"


def check_id(value: str) -> str:
    """The id rule with a message that says which character is refused (a pattern error would only
    repeat the pattern)."""
    found = forbidden_id_character(value)
    if found:
        raise ValueError(f"ids must not contain whitespace, control, invisible or surrogate characters: "
                         f"{ascii(found.group())} at position {found.start()}")
    return value


def check_path_id(value: str) -> str:
    if "/" in value:
        raise ValueError("this id is used in URL paths (/items/{item_id}): it must not contain '/'")
    return value


K_DESCRIPTION = "how many items to return (fewer when the catalogue, less the excluded items, is smaller)"
ExcludeSeen = Annotated[bool, Field(description="leave out the items of the user's history")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelled field is a 422, not silently ignored


class RecommendQuery(Protocol):
    """What the engine reads of a recommendation request (the per-app RecommendRequest model)."""

    user_id: str
    k: int
    exclude_seen: bool
    history: list[str] | None
    exclude_item_ids: list[str] | None
    candidate_item_ids: list[str] | None


@dataclass(frozen=True)
class RequestModels:
    """The request bodies and parameter types of one app, limited by its settings."""

    user_id_path: Any  # the user id as a URL path segment
    item_id_path: Any  # an item id as a URL path segment
    k: Any
    recommend: type[BaseModel]
    batch: type[BaseModel]
    interactions: type[BaseModel]
    live_item: type[BaseModel]


def request_models(settings: "Settings") -> RequestModels:
    def id_type(pattern: str, example: str) -> Any:
        return Annotated[str, StringConstraints(min_length=1, max_length=settings.max_id_length),
                         AfterValidator(check_id), Field(json_schema_extra={"pattern": pattern}, examples=[example])]

    UserId, ItemId = id_type(ID_PATTERN, "u42"), id_type(ID_PATTERN, "i7")
    K = Annotated[int, Field(ge=1, le=settings.max_k, description=K_DESCRIPTION)]

    class RecommendRequest(Strict):
        model_config = ConfigDict(json_schema_extra={"examples": [
            {"user_id": "u42", "k": 10},
            {"user_id": "new-visitor-1", "k": 5, "history": ["i3", "i17"]},
            {"user_id": "u42", "k": 3, "exclude_item_ids": ["i99"], "candidate_item_ids": ["i3", "i17", "i21", "i99"]},
        ]})

        user_id: UserId
        k: K = DEFAULT_K
        exclude_seen: ExcludeSeen = True
        history: list[ItemId] | None = Field(
            None, max_length=settings.max_history_items,
            description="item ids, oldest first, used instead of the stored history (the store is not read)")
        exclude_item_ids: list[ItemId] | None = Field(
            None, max_length=settings.max_rule_items, examples=[["i99"]],
            description="items never to return (e.g. out of stock), besides the history when `exclude_seen`")
        candidate_item_ids: list[ItemId] | None = Field(
            None, max_length=settings.max_rule_items, examples=[["i3", "i17", "i21"]],
            description="rank only these items (e.g. a category page); the other rules still apply. Fewer "
                        "than k may come back")

    class BatchRecommendRequest(Strict):
        model_config = ConfigDict(json_schema_extra={"examples": [
            {"requests": [{"user_id": "u1", "k": 5}, {"user_id": "u2", "k": 5, "exclude_seen": False}]},
        ]})

        requests: list[RecommendRequest] = Field(min_length=1, max_length=settings.max_batch_users)

    class InteractionsRequest(Strict):
        model_config = ConfigDict(json_schema_extra={"examples": [{"user_id": "u42", "item_ids": ["i5", "i9"]}]})

        user_id: UserId
        item_ids: list[ItemId] = Field(min_length=1, max_length=settings.max_history_items,
                                       description="items the user interacted with, oldest first")

    class LiveItemRequest(Strict):
        model_config = ConfigDict(json_schema_extra={"examples": [
            {"item_id": "i-new-1", "title": "travel tripod, carbon", "description": "1.2 kg, folds to 40 cm"}]})

        # A path segment too (GET /items/{item_id}): no "/".
        item_id: Annotated[id_type(PATH_ID_PATTERN, "i-new-1"), AfterValidator(check_path_id)]
        title: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TITLE_CHARACTERS)] = Field(
            description="what places the item's token (as training places items by their titles)")
        description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARACTERS)] | None = Field(
            None, description="stored with the item; used for its token only when the title is empty")

    return RequestModels(user_id_path=id_type(PATH_ID_PATTERN, "u42"), item_id_path=id_type(PATH_ID_PATTERN, "i7"),
                         k=K, recommend=RecommendRequest, batch=BatchRecommendRequest,
                         interactions=InteractionsRequest, live_item=LiveItemRequest)


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
    unknown_item_ids: list[str] = Field(description="ids the request sent (`history`, `exclude_item_ids`, "
                                        "`candidate_item_ids`) that the model does not know; they were skipped "
                                        "(never ids of the stored history)")


class BatchRecommendResponse(BaseModel):
    results: list[RecommendResponse] = Field(description="one per request, in the same order")


class InteractionsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"user_id": "u42", "history_length": 14, "unknown_item_ids": []}]})

    user_id: str
    history_length: int = Field(description="stored events of the user after this append (capped at "
                                "CLLM4REC_HISTORY_MAX_LENGTH)")
    unknown_item_ids: list[str] = Field(description="ids the served model does not know: stored, but skipped when "
                                        "prompting")


class HistoryResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"user_id": "u42", "item_ids": ["i3", "i17", "i5"]}]})

    user_id: str
    item_ids: list[str] = Field(description="the stored history, oldest first (newest last), at most "
                                "CLLM4REC_HISTORY_MAX_LENGTH items; empty when none is stored")


class ErasureResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"user_id": "u42", "erased": True}]})

    user_id: str
    erased: bool = Field(description="a stored history was deleted (false: there was none); either way none is "
                         "stored now, and seeding will not write the user's training history back")


class ItemResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"item_id": "i17", "title": "premium tripod", "source": "checkpoint", "available": True}]})

    item_id: str
    title: str | None = Field(description="the item's title from the training data, if it had one")
    source: Literal["checkpoint", "live"] = Field(description="where the item comes from: the served checkpoint, "
                                                  "or added from its text while serving (POST /items)")
    available: bool = Field(description="false once retired: it is left out of every recommendation")


class ItemAvailability(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"available": False}]})

    available: bool = Field(description="false retires the item (out of every recommendation), true restores it")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"ready": True, "model": True, "history_store": True, "shutting_down": False, "precision": "bfloat16",
         "detail": None},
        {"ready": True, "model": True, "history_store": False, "shutting_down": False, "precision": "float32",
         "detail": "history store (Redis) ping failed: Connection refused"}]})

    ready: bool = Field(description="the model is warm, its forward-pass worker runs, and shutdown has not begun")
    model: bool = Field(description="the model is loaded and has scored its warm-up request, and the worker runs")
    history_store: bool = Field(description="the history store answered a ping just now; without it the replica "
                                "stays ready: requests that bring their own history and the popularity fallback "
                                "still work, stored-history requests get 503")
    shutting_down: bool
    precision: str | None = Field(None, description="the served backbone's format: with CLLM4REC_DTYPE=auto the "
                                  "one measured fastest with the same rankings at load (float32, "
                                  "float32-onnxruntime, bfloat16, bfloat16-linear, float32-cuda-graphs, or "
                                  "SMALL+LARGE@N: SMALL for batches of fewer than N prompts, LARGE from N), or the "
                                  "one CLLM4REC_BACKBONE_FORMAT pins (it takes this value); else what "
                                  "CLLM4REC_DTYPE sets; none while loading")
    detail: str | None = Field(None, description="why not ready, or what is degraded")


class ErrorResponse(BaseModel):
    detail: str


def error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


class ReloadRequest(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{}, {"checkpoint": "/checkpoints/2025-02-01"}]})

    checkpoint: Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")] | None = Field(
        None, description="checkpoint directory on the server; default: the configured one (CLLM4REC_CHECKPOINT)")


class ReloadResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model_version": "20250201-9c0e61a2b4d3", "previous_model_version": "20250101-3f2a9c1d0b7e",
        "checkpoint": "/checkpoints/2025-02-01", "seconds": 4.2}]})

    model_version: str = Field(description="the model now serving")
    previous_model_version: str
    checkpoint: str
    seconds: float = Field(description="loading, warm-up and swap")


# Error answers for the OpenAPI schema, merged into each route's `responses`.
UNAUTHORIZED = {401: error("the key is missing or wrong (CLLM4REC_API_KEY or the endpoint's scoped key), with "
                           "`WWW-Authenticate: Bearer`")}
ADMIN_FORBIDDEN = {403: error("no admin key is set and the call comes from another host (admin calls are then "
                              "loopback only)")}
BODY_TOO_LARGE = {413: error("the request body is larger than CLLM4REC_MAX_BODY_BYTES")}
BODY_UNREADABLE = {400: error("the body could not be parsed at all (not UTF-8, or nested too deeply)")}
STORE_UNAVAILABLE = {503: error("the history store (Redis) is unreachable, or the request queue is full "
                                "(then with Retry-After)")}
RECOMMEND_ERRORS = {**STORE_UNAVAILABLE, 504: error("no answer within CLLM4REC_REQUEST_TIMEOUT_S")}
UNKNOWN_ITEM = {404: error("the item id is not in the served catalogue")}
ITEM_EXISTS = {409: error("an item of that id is in the catalogue already")}
RELOAD_FAILED = {400: error("the checkpoint could not be loaded or warmed up, and the previous model keeps "
                            "serving; or the body could not be parsed at all")}
